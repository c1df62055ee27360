//! Stop strings: text that ends generation and is never emitted.
//!
//! Streaming makes this subtle: a stop string can arrive split over several tokens, so
//! text that could still become a stop string is held back until it cannot.

/// Holds back text that might be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    /// The stop string that ended generation, once one has.
    matched: Option<String>,
}

/// What to emit after pushing a delta.
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    pub emit: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            matched: None,
        }
    }

    pub fn push(&mut self, delta: &str) -> StopStep {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return StopStep {
                emit: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        // Earliest complete stop string wins (the longest, of several that start there).
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())))
        {
            let emit = self.pending[..at].to_string();
            self.matched = Some(stop.clone());
            self.pending.clear();
            return StopStep {
                emit,
                stopped: true,
            };
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// The stop string that ended generation, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Text still held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(
            m.push("abc"),
            StopStep {
                emit: "abc".into(),
                stopped: false
            }
        );
    }

    #[test]
    fn split_stop_string_is_held_then_dropped() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(
            m.push("hello E"),
            StopStep {
                emit: "hello ".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("N"),
            StopStep {
                emit: "".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("D and more"),
            StopStep {
                emit: "".into(),
                stopped: true
            }
        );
        assert_eq!(m.matched(), Some("END"));
    }

    #[test]
    fn the_earliest_stop_string_is_the_one_reported() {
        let mut m = StopMatcher::new(vec!["zz".into(), "b".into(), "ab".into()]);
        assert_eq!(m.matched(), None);
        let step = m.push("xxabzz");
        assert_eq!((step.emit.as_str(), step.stopped), ("xx", true));
        assert_eq!(m.matched(), Some("ab"));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(
            m.push("E"),
            StopStep {
                emit: "".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("X"),
            StopStep {
                emit: "EX".into(),
                stopped: false
            }
        );
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        let mut m = StopMatcher::new(vec!["ü!".into(), "b".into()]);
        assert_eq!(
            m.push("aü"),
            StopStep {
                emit: "a".into(),
                stopped: false
            }
        );
        assert_eq!(m.finish(), "ü");
        let mut m = StopMatcher::new(vec!["c".into(), "b".into()]);
        assert_eq!(
            m.push("abc"),
            StopStep {
                emit: "a".into(),
                stopped: true
            }
        );
    }
}

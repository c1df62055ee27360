//! Session cache store: named sessions (`prompt_cache_key`) and an anonymous pool, each a
//! [`SeqCache`] kept between requests so a conversation's next turn only prefills what
//! is new. A byte budget bounds the resident caches; past it, the least recently used
//! idle, unpinned caches are evicted.
//!
//! A cache is checked out for the length of one request and checked back in after it;
//! while out, its session is busy and a second request on it is refused.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::Device;

use super::{CacheLayout, SeqCache};

/// Anonymous caches kept for prefix reuse by requests without a session key.
pub const ANON_MAX: usize = 8;
/// Shortest shared prefix worth reusing from the anonymous pool.
pub const ANON_MIN_PREFIX: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("session `{0}` is busy with another request; retry when it finishes")]
    Busy(String),
    #[error("session `{0}` not found")]
    NotFound(String),
}

/// What the sessions API shows about a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub tokens: usize,
    pub bytes: usize,
    pub tier: &'static str,
    pub busy: bool,
    pub pinned: bool,
    pub created: u64,
    pub last_used: u64,
    pub hits: u64,
}

#[derive(Debug)]
struct Entry {
    /// None while a request has it checked out.
    cache: Option<SeqCache>,
    tokens: usize,
    bytes: usize,
    created: u64,
    last_used: u64,
    lru: Instant,
    hits: u64,
    pinned: bool,
    /// Deleted while busy: drop it at check-in instead of storing it.
    doomed: bool,
}

#[derive(Debug)]
struct Anon {
    cache: SeqCache,
    lru: Instant,
}

/// A cache handed to one request.
#[derive(Debug)]
pub struct Checkout {
    pub cache: SeqCache,
    /// Prompt tokens whose K/V were already cached.
    pub reused: usize,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub resident_bytes: usize,
    pub budget_bytes: usize,
    pub sessions_busy: usize,
    pub sessions_idle: usize,
    pub anon: usize,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Outcome of a lookup, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Partial,
    Miss,
}

#[derive(Debug)]
pub struct SessionStore {
    budget: usize,
    sessions: HashMap<String, Entry>,
    anon: Vec<Anon>,
    /// Evictions since start, for tests and metrics.
    pub evictions: u64,
}

impl SessionStore {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            sessions: HashMap::new(),
            anon: Vec::new(),
            evictions: 0,
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Take the cache for a request. The cache is cut back to the longest prefix it shares
    /// with `prompt`, leaving at least one prompt token to compute (its logits are needed).
    pub fn checkout(
        &mut self,
        key: Option<&str>,
        prompt: &[u32],
        layout: CacheLayout,
        device: &Device,
    ) -> Result<(Checkout, Lookup), KvError> {
        let fresh = || SeqCache::new(layout, device);
        let mut cache = match key {
            Some(k) => match self.sessions.get_mut(k) {
                Some(e) if e.cache.is_none() => return Err(KvError::Busy(k.to_string())),
                Some(e) => {
                    e.lru = Instant::now();
                    e.last_used = now_secs();
                    e.cache.take().unwrap_or_else(fresh)
                }
                None => {
                    let now = now_secs();
                    self.sessions.insert(
                        k.to_string(),
                        Entry {
                            cache: None,
                            tokens: 0,
                            bytes: 0,
                            created: now,
                            last_used: now,
                            lru: Instant::now(),
                            hits: 0,
                            pinned: false,
                            doomed: false,
                        },
                    );
                    fresh()
                }
            },
            None => {
                let best = self
                    .anon
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (i, a.cache.common_prefix(prompt)))
                    .filter(|&(_, n)| n >= ANON_MIN_PREFIX)
                    .max_by_key(|&(_, n)| n);
                match best {
                    Some((i, _)) => self.anon.swap_remove(i).cache,
                    None => fresh(),
                }
            }
        };
        if cache.layout() != layout {
            cache = fresh();
        }
        let reused = cache
            .common_prefix(prompt)
            .min(prompt.len().saturating_sub(1));
        cache.truncate(reused);
        let lookup = match reused {
            0 => Lookup::Miss,
            n if n + 1 >= prompt.len() => Lookup::Hit,
            _ => Lookup::Partial,
        };
        if let (Some(k), true) = (key, reused > 0) {
            if let Some(e) = self.sessions.get_mut(k) {
                e.hits += 1;
            }
        }
        Ok((Checkout { cache, reused }, lookup))
    }

    /// Return a cache after its request; then keep the resident bytes under budget.
    pub fn checkin(&mut self, key: Option<&str>, cache: SeqCache) {
        match key.and_then(|k| self.sessions.get_mut(k).map(|e| (k, e))) {
            Some((k, e)) => {
                if e.doomed {
                    self.sessions.remove(k);
                } else {
                    e.tokens = cache.len();
                    e.bytes = cache.allocated_bytes();
                    e.lru = Instant::now();
                    e.last_used = now_secs();
                    e.cache = Some(cache);
                }
            }
            None if key.is_none() && !cache.is_empty() => {
                self.anon.push(Anon {
                    cache,
                    lru: Instant::now(),
                });
                if self.anon.len() > ANON_MAX {
                    let oldest = self
                        .anon
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, a)| a.lru)
                        .map(|(i, _)| i);
                    if let Some(i) = oldest {
                        self.anon.swap_remove(i);
                        self.evictions += 1;
                    }
                }
            }
            None => {}
        }
        self.enforce_budget();
    }

    /// Bytes of every cache the store holds (idle ones; busy ones are counted by their
    /// requests until check-in).
    pub fn resident_bytes(&self) -> usize {
        self.sessions
            .values()
            .filter(|e| e.cache.is_some())
            .map(|e| e.bytes)
            .sum::<usize>()
            + self
                .anon
                .iter()
                .map(|a| a.cache.allocated_bytes())
                .sum::<usize>()
    }

    /// Evict least recently used idle, unpinned caches until under budget.
    pub fn enforce_budget(&mut self) {
        while self.resident_bytes() > self.budget {
            let anon = self
                .anon
                .iter()
                .enumerate()
                .map(|(i, a)| (a.lru, None, Some(i)));
            let named = self
                .sessions
                .iter()
                .filter(|(_, e)| e.cache.is_some() && !e.pinned)
                .map(|(k, e)| (e.lru, Some(k.clone()), None));
            let Some((_, name, idx)) = anon.chain(named).min_by_key(|c| c.0) else {
                break; // only pinned or busy caches left
            };
            match (name, idx) {
                (Some(k), _) => {
                    self.sessions.remove(&k);
                }
                (None, Some(i)) => {
                    self.anon.swap_remove(i);
                }
                _ => break,
            }
            self.evictions += 1;
        }
    }

    fn info(id: &str, e: &Entry) -> SessionInfo {
        SessionInfo {
            id: id.to_string(),
            tokens: e.tokens,
            bytes: e.bytes,
            tier: "memory",
            busy: e.cache.is_none(),
            pinned: e.pinned,
            created: e.created,
            last_used: e.last_used,
            hits: e.hits,
        }
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<_> = self
            .sessions
            .iter()
            .map(|(k, e)| Self::info(k, e))
            .collect();
        v.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.id.cmp(&b.id)));
        v
    }

    pub fn get(&self, id: &str) -> Result<SessionInfo, KvError> {
        self.sessions
            .get(id)
            .map(|e| Self::info(id, e))
            .ok_or_else(|| KvError::NotFound(id.to_string()))
    }

    /// Delete a session; a busy one goes when its request finishes.
    pub fn delete(&mut self, id: &str) -> Result<(), KvError> {
        match self.sessions.get_mut(id) {
            None => Err(KvError::NotFound(id.to_string())),
            Some(e) if e.cache.is_none() => {
                e.doomed = true;
                Ok(())
            }
            Some(_) => {
                self.sessions.remove(id);
                Ok(())
            }
        }
    }

    pub fn set_pinned(&mut self, id: &str, pinned: bool) -> Result<SessionInfo, KvError> {
        let e = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| KvError::NotFound(id.to_string()))?;
        e.pinned = pinned;
        Ok(Self::info(id, e))
    }

    pub fn stats(&self) -> StoreStats {
        let busy = self.sessions.values().filter(|e| e.cache.is_none()).count();
        StoreStats {
            resident_bytes: self.resident_bytes(),
            budget_bytes: self.budget,
            sessions_busy: busy,
            sessions_idle: self.sessions.len() - busy,
            anon: self.anon.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    fn layout() -> CacheLayout {
        CacheLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
        }
    }

    /// Pretend a request computed `tokens` into the cache.
    fn fill(c: &mut SeqCache, tokens: &[u32]) {
        let pos = c.len();
        c.reserve(tokens.len()).unwrap();
        let t = Tensor::zeros((1, 1, tokens.len(), 4), DType::F32, &Device::Cpu).unwrap();
        c.write_layer(0, pos, &t, &t).unwrap();
        c.commit(tokens);
    }

    fn turn(s: &mut SessionStore, key: Option<&str>, prompt: &[u32]) -> usize {
        let (mut co, _) = s.checkout(key, prompt, layout(), &Device::Cpu).unwrap();
        let reused = co.reused;
        fill(&mut co.cache, &prompt[reused..]);
        s.checkin(key, co.cache);
        reused
    }

    #[test]
    fn reuse_after_append_and_cut_back_after_edit() {
        let mut s = SessionStore::new(usize::MAX);
        assert_eq!(turn(&mut s, Some("a"), &[1, 2, 3, 4]), 0);
        assert_eq!(turn(&mut s, Some("a"), &[1, 2, 3, 4, 5, 6]), 4);
        // An edit in the middle: only the shared prefix is reused.
        assert_eq!(turn(&mut s, Some("a"), &[1, 2, 9, 9, 9]), 2);
        // The same prompt again: all but the last token (its logits are needed).
        assert_eq!(turn(&mut s, Some("a"), &[1, 2, 9, 9, 9]), 4);
        assert_eq!(s.get("a").unwrap().tokens, 5);
        assert_eq!(s.get("a").unwrap().hits, 3);
    }

    #[test]
    fn busy_session_is_refused_and_deleted_busy_session_goes_at_checkin() {
        let mut s = SessionStore::new(usize::MAX);
        let (co, _) = s
            .checkout(Some("a"), &[1, 2], layout(), &Device::Cpu)
            .unwrap();
        assert_eq!(
            s.checkout(Some("a"), &[1], layout(), &Device::Cpu)
                .unwrap_err(),
            KvError::Busy("a".into())
        );
        assert!(s.get("a").unwrap().busy);
        s.delete("a").unwrap();
        s.checkin(Some("a"), co.cache);
        assert_eq!(s.get("a").unwrap_err(), KvError::NotFound("a".into()));
    }

    #[test]
    fn anonymous_pool_reuses_longest_prefix() {
        let mut s = SessionStore::new(usize::MAX);
        let long: Vec<u32> = (0..40).collect();
        turn(&mut s, None, &long);
        let mut next = long.clone();
        next.extend([100, 101]);
        assert_eq!(turn(&mut s, None, &next), 40);
        // A short shared prefix is not worth it.
        assert_eq!(turn(&mut s, None, &[0, 1, 2, 77]), 0);
    }

    #[test]
    fn budget_never_exceeded_lru_first_pinned_kept() {
        let per = 256 * layout().bytes_per_token();
        let mut s = SessionStore::new(2 * per);
        turn(&mut s, Some("old"), &[1; 10]);
        turn(&mut s, Some("pinned"), &[2; 10]);
        s.set_pinned("pinned", true).unwrap();
        turn(&mut s, Some("new"), &[3; 10]);
        assert!(s.resident_bytes() <= s.budget());
        assert!(s.get("old").is_err(), "least recently used goes first");
        assert!(s.get("pinned").is_ok());
        assert!(s.get("new").is_ok());
        // Randomised sequence: the budget holds after every step.
        let mut x = 7u32;
        for _ in 0..200 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let key = format!("s{}", x % 5);
            let len = 1 + (x >> 8) as usize % 300;
            let prompt: Vec<u32> = (0..len as u32).collect();
            turn(&mut s, Some(&key), &prompt);
            assert!(s.resident_bytes() <= s.budget().max(per), "over budget");
        }
    }
}

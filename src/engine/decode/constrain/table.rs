//! [`TokenTable`]: what constrained decoding needs to know about a vocabulary, built
//! once per model from the tokens' bytes.

/// A set of token ids, one bit each.
pub(super) type Bits = Vec<u64>;

pub(super) fn set(bits: &mut [u64], id: u32) {
    if let Some(w) = bits.get_mut(id as usize / 64) {
        *w |= 1 << (id % 64);
    }
}

pub(super) fn get(bits: &[u64], id: usize) -> bool {
    bits.get(id / 64).is_some_and(|w| w >> (id % 64) & 1 == 1)
}

/// A token that may continue a string but is not plain content.
pub(super) struct NonPlain {
    pub id: u32,
    /// Characters before its first `"` or `\`, when those bytes are whole UTF-8
    /// characters (then only `bytes[rest..]` needs the automaton); None: feed it all.
    pub split: Option<(u32, usize)>,
}

/// Per-model facts about the vocabulary, built once.
pub struct TokenTable {
    /// Bytes of each token; empty: never allowed as text (control tokens).
    pub(super) bytes: Vec<Box<[u8]>>,
    /// Usable token ids sorted by their bytes, each with the length of the prefix it
    /// shares with the one before (the token trie, flattened in walk order).
    pub(super) sorted: Vec<(u32, u16)>,
    /// Tokens that are plain string content (no `"`, `\`, control bytes; whole UTF-8
    /// characters) with their character counts, fewest characters first.
    pub(super) plain: Vec<(u32, u32)>,
    /// All of `plain`, as a set.
    pub(super) plain_bits: Bits,
    /// Usable tokens that are not plain and may still continue a string (no control
    /// byte before their first `"` or `\`), sorted so that equal `(rest, chars)` are
    /// adjacent.
    pub(super) nonplain: Vec<NonPlain>,
    /// End-of-generation ids.
    pub(super) eog: Vec<u32>,
}

fn special(c: u8) -> bool {
    c == b'"' || c == b'\\' || c < 0x20
}

impl TokenTable {
    /// `bytes[id]`: the token's bytes, or None for a control token.
    pub fn new(bytes: Vec<Option<Vec<u8>>>, eog: Vec<u32>) -> Self {
        let bytes: Vec<Box<[u8]>> = bytes
            .into_iter()
            .enumerate()
            .map(|(id, b)| match b {
                Some(b) if !b.is_empty() && !eog.contains(&(id as u32)) => b.into_boxed_slice(),
                _ => Box::default(),
            })
            .collect();
        let words = bytes.len().div_ceil(64);
        let mut plain = Vec::new();
        let mut plain_bits = vec![0u64; words];
        let mut nonplain = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        for (id, b) in bytes.iter().enumerate() {
            if b.is_empty() {
                continue;
            }
            let id = id as u32;
            ids.push(id);
            let first = b.iter().position(|&c| special(c));
            // A raw control byte can never come inside a string.
            if first.is_some_and(|i| b[i] < 0x20) {
                continue;
            }
            let rest = first.unwrap_or(b.len());
            match std::str::from_utf8(&b[..rest]) {
                Ok(s) if first.is_none() => {
                    plain.push((id, s.chars().count() as u32));
                    set(&mut plain_bits, id);
                }
                Ok(s) => nonplain.push(NonPlain {
                    id,
                    split: Some((s.chars().count() as u32, rest)),
                }),
                Err(_) => nonplain.push(NonPlain { id, split: None }),
            }
        }
        plain.sort_by_key(|&(_, n)| n);
        let tail = |n: &NonPlain| match n.split {
            Some((k, r)) => (Some((&bytes[n.id as usize][r..], k)), n.id),
            None => (None, n.id),
        };
        nonplain.sort_by(|x, y| tail(x).cmp(&tail(y)));
        ids.sort_by(|&x, &y| bytes[x as usize].cmp(&bytes[y as usize]));
        let mut sorted = Vec::with_capacity(ids.len());
        let mut prev: &[u8] = &[];
        for &id in &ids {
            let b = &bytes[id as usize];
            let lcp = b.iter().zip(prev).take_while(|(a, c)| a == c).count();
            sorted.push((id, lcp.min(u16::MAX as usize) as u16));
            prev = b;
        }
        Self {
            bytes,
            sorted,
            plain,
            plain_bits,
            nonplain,
            eog,
        }
    }

    pub fn vocab(&self) -> usize {
        self.bytes.len()
    }

    /// Words of a [`Bits`] over the vocabulary.
    pub(super) fn words(&self) -> usize {
        self.bytes.len().div_ceil(64)
    }
}

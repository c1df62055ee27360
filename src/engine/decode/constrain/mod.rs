//! Grammar-constrained decoding: a byte-level pushdown automaton ([`automaton`]) over
//! a [`Grammar`] that says, before each sampling step, which tokens may come next, so
//! the output always parses and matches the schema. End-of-generation tokens are
//! allowed only when the JSON (or the last tool call) is complete.
//!
//! Masks are cheap because most tokens never go through the automaton one by one:
//! inside a plain string (the common case by far) a token without `"`, `\` or control
//! bytes is allowed by its character count alone, and the others are judged once per
//! distinct rest after their plain prefix; elsewhere the token trie is walked, so a
//! shared prefix is fed once and a refused one prunes everything under it. A mask is
//! a bitset, kept per automaton state, so recurring states cost a lookup.
//!
//! Depends only on [`super::grammar`]; the token table is built from plain byte strings.

use std::collections::HashMap;
use std::sync::Arc;

use super::grammar::Grammar;

mod automaton;
mod table;

use automaton::{add_chars, feed, in_plain_string, mask_key, stack_can_end, Stack};
pub use table::TokenTable;
use table::{get, set, Bits};

pub const CALL_OPEN: &[u8] = b"<tool_call>";
pub const CALL_CLOSE: &[u8] = b"</tool_call>";

/// Masks one constraint keeps, by automaton state (a Qwen mask is 19 KB).
const MASK_CACHE: usize = 64;

/// The live constraint of one sequence.
pub struct Constraint {
    g: Arc<Grammar>,
    stacks: Vec<Stack>,
    /// Masks of states seen before: a string's body, the spot after a comma, … recur
    /// token after token.
    cache: HashMap<Vec<Stack>, Arc<Bits>>,
    /// Set once an end-of-generation token was accepted.
    ended: bool,
}

fn feed_all(g: &Grammar, stacks: &[Stack], c: u8) -> Vec<Stack> {
    let mut out = Vec::new();
    for s in stacks {
        feed(g, s.clone(), c, &mut out);
    }
    out
}

fn accepts(g: &Grammar, stacks: &[Stack], bytes: &[u8]) -> bool {
    let mut cur = stacks.to_vec();
    for &c in bytes {
        let mut next = Vec::with_capacity(cur.len());
        for s in cur {
            feed(g, s, c, &mut next);
        }
        if next.is_empty() {
            return false;
        }
        cur = next;
    }
    true
}

/// Which tokens `stacks` accept, computed from scratch.
fn compute(g: &Grammar, stacks: &[Stack], t: &TokenTable) -> Bits {
    let mut bits = vec![0u64; t.words()];
    if let Some((count, min, max)) = in_plain_string(stacks) {
        string_body(g, stacks, t, (count, min, max), &mut bits);
    } else {
        walk_trie(g, stacks, t, &mut bits);
    }
    if stacks.iter().any(stack_can_end) {
        for &e in &t.eog {
            set(&mut bits, e);
        }
    }
    bits
}

/// Inside a string at a character boundary: plain tokens by their character count
/// alone; the others by what follows their plain prefix, once per distinct rest.
fn string_body(
    g: &Grammar,
    stacks: &[Stack],
    t: &TokenTable,
    s: (u32, u32, u32),
    bits: &mut [u64],
) {
    let (count, min, max) = s;
    let room = max - count;
    if t.plain.last().is_some_and(|&(_, n)| n <= room) {
        bits.copy_from_slice(&t.plain_bits);
    } else {
        for &(id, _) in t.plain.iter().take_while(|&&(_, n)| n <= room) {
            set(bits, id);
        }
    }
    // Without a maximum and past the minimum, how many characters come first does
    // not matter.
    let free = max == u32::MAX && count >= min;
    let mut last: Option<(&[u8], u32, bool)> = None;
    for np in &t.nonplain {
        let b = &t.bytes[np.id as usize];
        let ok = match np.split {
            None => accepts(g, stacks, b),
            Some((k, _)) if k > room => false,
            Some((k, r)) => {
                let key = (&b[r..], if free { 0 } else { k });
                match last {
                    Some((lr, lk, ok)) if (lr, lk) == key => ok,
                    _ => {
                        let ok = accepts(g, &add_chars(stacks, k), key.0);
                        last = Some((key.0, key.1, ok));
                        ok
                    }
                }
            }
        };
        if ok {
            set(bits, np.id);
        }
    }
}

/// Every token through the automaton, walking the token trie: a prefix shared by
/// neighbours in byte order is fed once, and once refused, every token under it is
/// skipped.
fn walk_trie(g: &Grammar, stacks: &[Stack], t: &TokenTable, bits: &mut [u64]) {
    // levels[d]: the stacks after the first d bytes of the current token.
    let mut levels: Vec<Vec<Stack>> = vec![stacks.to_vec()];
    // levels[..=live] hold for the previous token; its first `dead` bytes are refused.
    let mut live = 0usize;
    let mut dead = usize::MAX;
    for &(id, lcp) in &t.sorted {
        let lcp = lcp as usize;
        if lcp >= dead {
            continue;
        }
        dead = usize::MAX;
        let b = &t.bytes[id as usize];
        let mut d = lcp.min(live);
        loop {
            if d == b.len() {
                set(bits, id);
                live = d;
                break;
            }
            let next = feed_all(g, &levels[d], b[d]);
            if next.is_empty() {
                live = d;
                dead = d + 1;
                break;
            }
            if levels.len() == d + 1 {
                levels.push(next);
            } else {
                levels[d + 1] = next;
            }
            d += 1;
        }
    }
}

impl Constraint {
    pub fn new(g: Arc<Grammar>) -> Self {
        let root = g.root;
        Self {
            g,
            stacks: vec![Stack::at(root)],
            cache: HashMap::new(),
            ended: false,
        }
    }

    /// Whether the output so far is complete (an end token may come now).
    pub fn can_end(&self) -> bool {
        self.stacks.iter().any(stack_can_end)
    }

    /// The set of tokens that may come next.
    fn bits(&mut self, t: &TokenTable) -> Arc<Bits> {
        if self.ended {
            return Arc::new(vec![0; t.words()]);
        }
        let key = mask_key(&self.stacks);
        if let Some(b) = self.cache.get(&key) {
            return b.clone();
        }
        let b = Arc::new(compute(&self.g, &self.stacks, t));
        if self.cache.len() >= MASK_CACHE {
            self.cache.clear();
        }
        self.cache.insert(key, b.clone());
        b
    }

    /// Which tokens may come next (indexed by id; ids past the table are never allowed).
    pub fn allowed(&mut self, t: &TokenTable) -> Vec<bool> {
        let bits = self.bits(t);
        (0..t.vocab()).map(|i| get(&bits, i)).collect()
    }

    /// Set the logits of forbidden tokens to -inf; returns how many stay allowed.
    pub fn mask(&mut self, t: &TokenTable, logits: &mut [f32]) -> usize {
        let bits = self.bits(t);
        let mut n = 0;
        for (w, chunk) in logits.chunks_mut(64).enumerate() {
            let word = bits.get(w).copied().unwrap_or(0);
            if word == u64::MAX && chunk.len() == 64 {
                n += 64;
                continue;
            }
            if word == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (j, l) in chunk.iter_mut().enumerate() {
                if word >> j & 1 == 1 {
                    n += 1;
                } else {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        n
    }

    /// Take the sampled token. False if the grammar does not allow it.
    pub fn advance(&mut self, t: &TokenTable, id: u32) -> bool {
        if t.eog.contains(&id) {
            let ok = self.can_end();
            self.ended = ok;
            return ok;
        }
        let Some(b) = t.bytes.get(id as usize).filter(|b| !b.is_empty()) else {
            return false;
        };
        let mut cur = std::mem::take(&mut self.stacks);
        for &c in b.iter() {
            let mut next = Vec::with_capacity(cur.len());
            for s in cur {
                feed(&self.g, s, c, &mut next);
            }
            let mut i = 0;
            while i < next.len() {
                if next[..i].contains(&next[i]) {
                    next.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            cur = next;
        }
        let ok = !cur.is_empty();
        self.stacks = cur;
        ok
    }

    /// Feed text directly (tests and tools).
    pub fn accepts_text(&self, text: &[u8]) -> bool {
        accepts(&self.g, &self.stacks, text)
    }
}

#[cfg(test)]
mod tests;

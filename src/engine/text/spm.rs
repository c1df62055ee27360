//! SentencePiece-style vocabularies from GGUF metadata (`tokenizer.ggml.model = llama`:
//! Llama 2, Mistral, Gemma), tokenized as llama.cpp's SPM tokenizer does: split off the
//! special (control and user-defined) tokens, prefix a space where the vocabulary asks
//! for it, turn spaces into `▁`, then merge adjacent pieces greedily — always the pair
//! whose merged piece has the highest score, the leftmost on ties — and spell pieces the
//! vocabulary lacks as byte tokens (`<0xNN>`).
//!
//! Decoding goes through a `tokenizers::Tokenizer` over the same vocabulary (see
//! [`Spm::decoder`]); only encoding needs the merge loop.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

use crate::engine::EngineError;

/// GGUF token types.
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// A SentencePiece vocabulary and what encoding needs of it.
#[derive(Debug)]
pub struct Spm {
    /// Piece text → (id, score). The first id wins for a repeated text.
    pieces: HashMap<String, (u32, f32)>,
    /// `<0xNN>` ids.
    bytes: [Option<u32>; 256],
    add_space_prefix: bool,
    /// Control and user-defined tokens, longest text first: split off before merging.
    specials: Vec<(String, u32)>,
}

/// One symbol of the merge loop: a byte range of the text, linked to its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge: higher score first, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| Reverse(self.left).cmp(&Reverse(o.left)))
    }
}

impl Spm {
    /// From the GGUF arrays `tokenizer.ggml.tokens`, `.scores` and `.token_type`.
    pub fn new(tokens: &[String], scores: &[f32], types: &[i32], add_space_prefix: bool) -> Self {
        let mut pieces = HashMap::with_capacity(tokens.len());
        let mut bytes = [None; 256];
        let mut specials = Vec::new();
        for (id, text) in tokens.iter().enumerate() {
            let id = id as u32;
            let ty = types.get(id as usize).copied().unwrap_or(1);
            let score = scores.get(id as usize).copied().unwrap_or(0.0);
            pieces.entry(text.clone()).or_insert((id, score));
            if ty == TYPE_BYTE {
                if let Some(b) = text
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    bytes[b as usize] = Some(id);
                }
            }
            if (ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED) && !text.is_empty() {
                specials.push((text.clone(), id));
            }
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Self {
            pieces,
            bytes,
            add_space_prefix,
            specials,
        }
    }

    /// Token ids of `text`, special-token texts becoming their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        let mut rest = text;
        while !rest.is_empty() {
            // The next special token in the text (the longest at the earliest start).
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (plain, special) = match next {
                Some((at, len, id)) => (&rest[..at], Some((id, at + len))),
                None => (rest, None),
            };
            if !plain.is_empty() {
                let mut t = String::with_capacity(plain.len() + 1);
                if self.add_space_prefix && prev_special {
                    t.push(' ');
                }
                t.push_str(plain);
                self.merge(&t.replace(' ', "\u{2581}"), &mut out);
            }
            match special {
                Some((id, end)) => {
                    out.push(id);
                    prev_special = true;
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on one fragment.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            let end = start + c.len_utf8();
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (end < text.len()).then_some(i + 1),
            });
        }
        if syms.is_empty() {
            return;
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<String, (usize, usize)> = HashMap::new();
        let try_add = |l: Option<usize>,
                       r: Option<usize>,
                       syms: &[Sym],
                       queue: &mut BinaryHeap<Bigram>,
                       rev: &mut HashMap<String, (usize, usize)>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (s, n) = (syms[l].start, syms[l].len + syms[r].len);
            let piece = &text[s..s + n];
            if let Some(&(_, score)) = self.pieces.get(piece) {
                queue.push(Bigram {
                    score,
                    left: l,
                    right: r,
                    size: n,
                });
                rev.insert(piece.to_string(), (l, r));
            }
        };
        for i in 1..syms.len() {
            try_add(Some(i - 1), Some(i), &syms, &mut queue, &mut rev_merge);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(b.left);
            }
            let (p, n) = (syms[b.left].prev, syms[b.left].next);
            try_add(p, Some(b.left), &syms, &mut queue, &mut rev_merge);
            try_add(Some(b.left), n, &syms, &mut queue, &mut rev_merge);
        }
        let mut at = Some(0);
        while let Some(i) = at {
            self.resegment(text, &syms, i, &rev_merge, out);
            at = syms[i].next;
        }
    }

    fn resegment(
        &self,
        text: &str,
        syms: &[Sym],
        i: usize,
        rev: &HashMap<String, (usize, usize)>,
        out: &mut Vec<u32>,
    ) {
        let s = syms[i];
        let piece = &text[s.start..s.start + s.len];
        if let Some(&(id, _)) = self.pieces.get(piece) {
            out.push(id);
            return;
        }
        match rev.get(piece) {
            Some(&(l, r)) => {
                self.resegment(text, syms, l, rev, out);
                self.resegment(text, syms, r, rev, out);
            }
            None => out.extend(piece.bytes().filter_map(|b| self.bytes[b as usize])),
        }
    }

    /// A `tokenizers::Tokenizer` over the same vocabulary, for decoding, piece lookups
    /// and the added (special) tokens: a merge-less byte-fallback BPE whose decoder
    /// turns `▁` back into spaces and byte pieces into bytes.
    pub fn decoder(&self, tokens: &[String], types: &[i32]) -> Result<Tokenizer, EngineError> {
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (id, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .byte_fallback(true)
            .build()
            .map_err(|e| EngineError::Load(format!("SentencePiece vocabulary: {e}")))?;
        let mut t = Tokenizer::new(bpe);
        let mut steps = vec![
            DecoderWrapper::Replace(
                tokenizers::normalizers::replace::Replace::new("\u{2581}", " ")
                    .map_err(|e| EngineError::Load(e.to_string()))?,
            ),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        if self.add_space_prefix {
            steps.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(steps))));
        let special: Vec<AddedToken> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                matches!(
                    types.get(*i).copied(),
                    Some(TYPE_CONTROL) | Some(TYPE_USER_DEFINED)
                )
            })
            .map(|(_, s)| AddedToken::from(s.clone(), true))
            .collect();
        t.add_special_tokens(special)
            .map_err(|e| EngineError::Load(format!("SentencePiece special tokens: {e}")))?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let mut toks: Vec<(&str, f32, i32)> = vec![
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("<start_of_turn>", 0.0, 3),
            ("\u{2581}", -1.0, 1),
            ("h", -2.0, 1),
            ("e", -2.0, 1),
            ("l", -2.0, 1),
            ("o", -2.0, 1),
            ("he", -3.0, 1),
            ("ll", -1.5, 1),
            ("llo", -1.0, 1),
            ("hello", -0.5, 1),
            ("\u{2581}hello", -0.4, 1),
        ];
        let bytes: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
        for b in &bytes {
            toks.push((b.as_str(), 0.0, TYPE_BYTE));
        }
        (
            toks.iter().map(|t| t.0.to_string()).collect(),
            toks.iter().map(|t| t.1).collect(),
            toks.iter().map(|t| t.2).collect(),
        )
    }

    #[test]
    fn pieces_merge_by_score_and_unknown_characters_become_bytes() {
        let (t, s, ty) = vocab();
        let spm = Spm::new(&t, &s, &ty, false);
        // "hello": ll (-1.5) first, then llo (-1.0), he (-3.0), hello (-0.5).
        assert_eq!(spm.encode("hello"), vec![11]);
        // With a space: ▁hello.
        assert_eq!(spm.encode(" hello"), vec![12]);
        // "é" is not in the vocabulary: its two UTF-8 bytes.
        let e_acute = [0xC3u32, 0xA9].map(|b| 13 + b);
        assert_eq!(spm.encode("é"), e_acute.to_vec());
        // Special tokens split the text; a prefix space only where asked.
        assert_eq!(spm.encode("<start_of_turn>hello"), vec![2, 11]);
        let prefixed = Spm::new(&t, &s, &ty, true);
        assert_eq!(prefixed.encode("hello"), vec![12]);
        assert_eq!(prefixed.encode("<start_of_turn>hello"), vec![2, 12]);
    }

    #[test]
    fn the_decoder_restores_spaces_and_bytes() {
        let (t, s, ty) = vocab();
        let spm = Spm::new(&t, &s, &ty, false);
        let dec = spm.decoder(&t, &ty).unwrap();
        let ids: Vec<u32> = [12u32, 12]
            .into_iter()
            .chain([0xC3u32, 0xA9].map(|b| 13 + b))
            .collect();
        assert_eq!(dec.decode(&ids, true).unwrap(), " hello helloé");
        assert_eq!(dec.decode(&[2, 11], true).unwrap(), "hello");
        assert_eq!(dec.decode(&[2, 11], false).unwrap(), "<start_of_turn>hello");
    }
}

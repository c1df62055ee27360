//! Tokenizer: a `tokenizers::Tokenizer` built from GGUF metadata (or a `tokenizer.json`),
//! plus what generation needs around it: BOS handling the way llama.cpp does it, the set
//! of end-of-generation ids, and an incremental detokenizer for streaming.

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Tokenizer;

use super::spm::Spm;
use crate::engine::EngineError;

/// Token texts that end a turn in common chat formats.
const EOG_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

pub struct Tok {
    inner: Tokenizer,
    /// SentencePiece vocabularies (GGUF `llama` tokenizer model) encode through our own
    /// merge loop, as llama.cpp does; `inner` then only decodes.
    spm: Option<Spm>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    /// Ids that end generation (EOS and the chat formats' end-of-turn tokens).
    pub eog: HashSet<u32>,
    pub vocab_size: usize,
    /// Added tokens that are text, not control (GGUF token type 4, "user defined", e.g.
    /// Qwen's `<tool_call>`): kept when decoding, usable by constrained decoding.
    pub textual: HashSet<u32>,
}

fn meta_u32(ct: &gguf_file::Content, k: &str) -> Option<u32> {
    ct.metadata.get(k).and_then(|v| v.to_u32().ok())
}

impl Tok {
    /// Build from GGUF metadata; a `tokenizer.json` beside the model file wins if present.
    pub fn from_gguf(
        ct: &gguf_file::Content,
        sibling_json: Option<&Path>,
    ) -> Result<Self, EngineError> {
        let model = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let mut spm = None;
        let inner = match sibling_json.filter(|p| p.exists()) {
            Some(p) => Tokenizer::from_file(p)
                .map_err(|e| EngineError::Load(format!("{}: {e}", p.display())))?,
            None if model == "llama" => {
                let (s, t) = spm_from_gguf(ct)?;
                spm = Some(s);
                t
            }
            None => {
                let mut t = Tokenizer::from_gguf(ct)
                    .map_err(|e| EngineError::Load(format!("tokenizer from GGUF: {e}")))?;
                let pre = ct
                    .metadata
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.to_string().ok())
                    .cloned()
                    .unwrap_or_default();
                fix_pre_tokenizer(&mut t, &pre);
                // candle gives `qwen2` Hugging Face's NFC normalizer; llama.cpp normalizes
                // nothing for BPE vocabularies, so a decomposed "e\u{301}" keeps its two
                // code points there. Match llama.cpp (case in llama_ref_qwen.json).
                t.with_normalizer(None::<NormalizerWrapper>)
                    .map_err(|e| EngineError::Load(format!("tokenizer normalizer: {e}")))?;
                t
            }
        };
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos_id = meta_u32(ct, "tokenizer.ggml.bos_token_id");
        let eos_id = meta_u32(ct, "tokenizer.ggml.eos_token_id");
        let mut tok = Self::assemble(inner, bos_id, eos_id, add_bos);
        tok.spm = spm;
        if let Some(gguf_file::Value::Array(types)) = ct.metadata.get("tokenizer.ggml.token_type") {
            tok.textual = types
                .iter()
                .enumerate()
                .filter(|(_, t)| t.to_i32().ok() == Some(4) || t.to_u32().ok() == Some(4))
                .map(|(i, _)| i as u32)
                .collect();
        }
        Ok(tok)
    }

    /// Build from a `tokenizer.json` (safetensors model directories).
    pub fn from_file(
        path: &Path,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self, EngineError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        Ok(Self::assemble(inner, bos_id, eos_id, false))
    }

    /// Build from a Hugging Face model directory: `tokenizer.json`, with BOS/EOS and
    /// `add_bos_token` from `tokenizer_config.json`, and every EOS id that `config.json`
    /// (given parsed) and `generation_config.json` name. Returns the tokenizer and the
    /// texts of BOS and EOS (for the chat template).
    pub fn from_hf_dir(
        dir: &Path,
        config: &serde_json::Value,
    ) -> Result<(Self, String, String), EngineError> {
        let json = |name: &str| {
            crate::engine::model::hf::read_json(dir, name)
                .map_err(|e| EngineError::Load(e.to_string()))
        };
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(EngineError::Load(format!(
                "{}: no tokenizer.json",
                dir.display()
            )));
        }
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let tc = json("tokenizer_config.json")?.unwrap_or_default();
        let gen = json("generation_config.json")?.unwrap_or_default();
        // `bos_token` / `eos_token` are a string or an added-token object.
        let text = |k: &str| match &tc[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        };
        let id_of = |k: &str, fallback: &serde_json::Value| {
            text(k).and_then(|t| inner.token_to_id(&t)).or_else(|| {
                crate::engine::model::hf::ids_of(Some(fallback))
                    .first()
                    .copied()
            })
        };
        let bos_id = id_of("bos_token", &config["bos_token_id"]);
        let eos_id = id_of("eos_token", &config["eos_token_id"]);
        // Without `add_bos_token`, ask the tokenizer's post-processor.
        let add_bos = tc["add_bos_token"].as_bool().unwrap_or_else(|| {
            let with = inner.encode_fast("a", true).ok();
            bos_id.is_some() && with.is_some_and(|e| e.get_ids().first() == bos_id.as_ref())
        });
        let mut tok = Self::assemble(inner, bos_id, eos_id, add_bos);
        let extra = [&config["eos_token_id"], &gen["eos_token_id"]];
        for v in extra {
            tok.eog.extend(crate::engine::model::hf::ids_of(Some(v)));
        }
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let bos = text("bos_token").unwrap_or_else(|| name(bos_id));
        let eos = text("eos_token").unwrap_or_else(|| name(eos_id));
        Ok((tok, bos, eos))
    }

    /// Write the underlying `tokenizers` tokenizer as a `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<(), EngineError> {
        self.inner
            .save(path, true)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    fn assemble(inner: Tokenizer, bos_id: Option<u32>, eos_id: Option<u32>, add_bos: bool) -> Self {
        let mut eog: HashSet<u32> = eos_id.into_iter().collect();
        for t in EOG_TEXTS {
            if let Some(id) = inner.token_to_id(t) {
                eog.insert(id);
            }
        }
        let vocab_size = inner.get_vocab_size(true);
        Self {
            inner,
            spm: None,
            bos_id,
            eos_id,
            add_bos,
            eog,
            vocab_size,
            textual: HashSet::new(),
        }
    }

    /// Token ids of `text`. Special-token texts in it (e.g. `<|im_start|>`) become their
    /// ids, as llama.cpp's server does for prompts. `with_bos` adds BOS when the model
    /// asks for it and the text does not already start with it.
    pub fn encode(&self, text: &str, with_bos: bool) -> Result<Vec<u32>, EngineError> {
        let mut ids = match &self.spm {
            Some(spm) => spm.encode(text),
            None => self
                .inner
                .encode_fast(text, false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec(),
        };
        if with_bos && self.add_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are kept only when `keep_special`.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String, EngineError> {
        if ids.iter().any(|&i| i as usize >= self.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id out of range (vocabulary has {} ids)",
                self.vocab_size
            )));
        }
        let dec = |ids: &[u32]| {
            self.inner
                .decode(ids, !keep_special)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))
        };
        if keep_special || !ids.iter().any(|i| self.textual.contains(i)) {
            return dec(ids);
        }
        // Textual added tokens are marked special in the tokenizer; keep their text.
        let mut out = String::new();
        for part in ids.split_inclusive(|i| self.textual.contains(i)) {
            match part.split_last() {
                Some((last, rest)) if self.textual.contains(last) => {
                    out.push_str(&dec(rest)?);
                    out.push_str(&self.inner.id_to_token(*last).unwrap_or_default());
                }
                _ => out.push_str(&dec(part)?),
            }
        }
        Ok(out)
    }

    /// The raw bytes of every token id, for constrained decoding: None for control
    /// tokens (never part of generated text). Byte-level BPE pieces are mapped back
    /// through GPT-2's byte table; SentencePiece pieces turn `▁` into a space and
    /// `<0xNN>` into that byte.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let unmap = gpt2_unicode_to_byte();
        let added = self.inner.get_added_tokens_decoder();
        let n = self.inner.get_vocab_size(true);
        (0..n as u32)
            .map(|id| {
                let piece = self.inner.id_to_token(id)?;
                if let Some(a) = added.get(&id) {
                    if a.special && !self.textual.contains(&id) {
                        return None;
                    }
                    return Some(a.content.as_bytes().to_vec());
                }
                if byte_level {
                    piece
                        .chars()
                        .map(|c| unmap.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                } else if let Some(hex) =
                    piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
                {
                    u8::from_str_radix(hex, 16).ok().map(|b| vec![b])
                } else {
                    Some(piece.replace('\u{2581}', " ").into_bytes())
                }
            })
            .collect()
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }
}

/// A SentencePiece vocabulary from GGUF metadata and its decoding tokenizer.
fn spm_from_gguf(ct: &gguf_file::Content) -> Result<(Spm, Tokenizer), EngineError> {
    let arr = |k: &str| match ct.metadata.get(k) {
        Some(gguf_file::Value::Array(a)) => Ok(a),
        _ => Err(EngineError::Load(format!(
            "GGUF metadata lacks the array `{k}`"
        ))),
    };
    let tokens = arr("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| EngineError::Load(format!("tokenizer.ggml.tokens: {e}")))?;
    let scores: Vec<f32> = arr("tokenizer.ggml.scores")
        .map(|a| a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    let types: Vec<i32> = arr("tokenizer.ggml.token_type")
        .map(|a| {
            a.iter()
                .map(|v| {
                    v.to_i32()
                        .or_else(|_| v.to_u32().map(|u| u as i32))
                        .unwrap_or(1)
                })
                .collect()
        })
        .unwrap_or_default();
    // llama.cpp's default for SentencePiece vocabularies is to prefix a space.
    let prefix = ct
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let spm = Spm::new(&tokens, &scores, &types, prefix);
    let dec = spm.decoder(&tokens, &types)?;
    Ok((spm, dec))
}

/// GPT-2's byte-to-unicode table, inverted: the character a byte-level BPE vocabulary
/// uses for each byte.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let c = if printable {
            char::from_u32(b as u32)
        } else {
            n += 1;
            char::from_u32(255 + n)
        };
        if let Some(c) = c {
            map.insert(c, b);
        }
    }
    map
}

/// candle's GGUF tokenizer falls back to GPT-2's byte-level pre-tokenizer with a prefix
/// space for pre-tokenizer names it does not know; llama.cpp adds no prefix space and
/// splits digits one by one for `smollm`. Match llama.cpp (checked against its ids in
/// `tests/fixtures/llama_ref.json`). `qwen2` keeps candle's pipeline: the same split
/// regex as llama.cpp's (single digits, no prefix space), checked in
/// `tests/fixtures/llama_ref_qwen.json`.
fn fix_pre_tokenizer(t: &mut Tokenizer, pre: &str) {
    match pre {
        "qwen2" | "llama3" | "llama-bpe" | "smaug-bpe" | "lfm2" => {}
        "smollm" | "starcoder" | "refact" => {
            let seq = Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]);
            t.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
        }
        _ => {
            t.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
                false, true, true,
            ))));
        }
    }
}

/// Incremental detokenizer: turns a growing list of ids into text deltas without ever
/// emitting half a UTF-8 character (a byte-level BPE token can end mid-character).
#[derive(Debug, Default)]
pub struct DetokStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl DetokStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], false)?;
        let now = tok.decode(&self.ids[self.prefix..], false)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let delta = now.get(before.len()..).unwrap_or_default().to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text held back because it did not yet form whole characters.
    pub fn flush(&mut self, tok: &Tok) -> Result<String, EngineError> {
        let before = tok.decode(&self.ids[self.prefix..self.read], false)?;
        let now = tok.decode(&self.ids[self.prefix..], false)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests;

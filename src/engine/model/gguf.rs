//! Reading a GGUF's metadata: the model's hyper-parameters and plain string values.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::Result;

use super::ModelConfig;

impl ModelConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let get = |k: &str| {
            ct.metadata
                .get(k)
                .ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata lacks `{k}`")))
        };
        let arch = get("general.architecture")?.to_string()?.clone();
        let rope_neox = match arch.as_str() {
            "llama" | "mistral" => false,
            "qwen2" => true,
            other => candle_core::bail!(
                "unsupported architecture `{other}` (supported: llama, mistral, qwen2)"
            ),
        };
        let u = |k: &str| -> Result<usize> { Ok(get(&format!("{arch}.{k}"))?.to_u32()? as usize) };
        let n_heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = u("attention.key_length").unwrap_or(hidden / n_heads);
        let vocab = match get("tokenizer.ggml.tokens")? {
            gguf_file::Value::Array(a) => a.len(),
            _ => candle_core::bail!("tokenizer.ggml.tokens is not an array"),
        };
        Ok(Self {
            n_layers: u("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden,
            vocab,
            train_ctx: u("context_length").unwrap_or(4096),
            rms_eps: get(&format!("{arch}.attention.layer_norm_rms_epsilon"))?.to_f32()? as f64,
            rope_base: get(&format!("{arch}.rope.freq_base"))
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0),
            rope_neox,
            arch,
        })
    }
}

/// GGUF metadata as plain strings/numbers, for the tokenizer and the chat template.
pub fn metadata_strings(ct: &gguf_file::Content) -> HashMap<String, String> {
    ct.metadata
        .iter()
        .filter_map(|(k, v)| {
            let s = match v {
                gguf_file::Value::String(s) => s.clone(),
                gguf_file::Value::U32(x) => x.to_string(),
                gguf_file::Value::I32(x) => x.to_string(),
                gguf_file::Value::U64(x) => x.to_string(),
                gguf_file::Value::Bool(x) => x.to_string(),
                gguf_file::Value::F32(x) => x.to_string(),
                _ => return None,
            };
            Some((k.clone(), s))
        })
        .collect()
}

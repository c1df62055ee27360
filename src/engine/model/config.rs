//! The model's hyper-parameters, read from a GGUF's metadata (a Hugging Face
//! directory's `config.json` is read in [`super::hf`]).

use candle_core::quantized::gguf_file;
use candle_core::Result;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub train_ctx: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// NEOX rotary layout (pairs `i`, `i + d/2`) instead of interleaved pairs.
    pub rope_neox: bool,
}

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

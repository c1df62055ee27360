//! The model's hyper-parameters, read from a GGUF's metadata (a Hugging Face
//! directory's `config.json` is read in [`super::hf`]): the architecture family and
//! what sets it apart — rotary scaling, QK-norm, sliding-window layers, the activation,
//! the embedding scale, mixture-of-experts routing.

use candle_core::quantized::gguf_file;
use candle_core::Result;

/// The GGUF architectures this engine runs.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, qwen3moe, gemma3";

/// Architecture families: what the forward pass does differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// llama, mistral: interleaved rotary pairs.
    Llama,
    /// qwen2: QKV biases, NEOX rotary pairs.
    Qwen2,
    /// qwen3: RMSNorm of each Q and K head before RoPE.
    Qwen3,
    /// qwen3moe: qwen3 attention, a routed mixture of experts as the MLP.
    Qwen3Moe,
    /// gemma3: QK-norm, norms after attention and MLP too, GELU-gated MLP, the embedding
    /// scaled by sqrt(hidden), local (sliding-window) and global layers.
    Gemma3,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU, tanh approximation (GeGLU), as ggml computes it through an f16 table.
    GeluTanh,
}

/// How rotary angles are scaled beyond the base frequency (llama.cpp's `rope_yarn`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    /// Multiplies every angle: `1 / factor` for linear and YaRN scaling, else 1.
    pub freq_scale: f32,
    /// YaRN's extrapolation mix (1 for YaRN, else 0).
    pub ext_factor: f32,
    /// Magnitude scaling of cos/sin (YaRN's attention factor; 1 otherwise).
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// The context the model was trained with before scaling (YaRN's correction dims).
    pub n_ctx_orig: usize,
}

impl Default for RopeScaling {
    fn default() -> Self {
        Self {
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 0,
        }
    }
}

/// Local layers see only the last `window` positions.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    /// Per layer: whether it is local (sliding window) rather than global.
    pub local: Vec<bool>,
    /// Rotary base of the local layers (the global ones use `rope_base`).
    pub rope_base: f32,
}

/// Mixture-of-experts MLP: a softmax router picks `used` of `experts` per token.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    pub experts: usize,
    pub used: usize,
    /// Hidden width of one expert.
    pub ffn: usize,
    /// Renormalize the picked experts' weights to sum to 1 (`norm_topk_prob`).
    pub norm_topk: bool,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub family: Family,
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
    pub rope_scaling: RopeScaling,
    pub act: Act,
    /// Attention scores are scaled by this (1/sqrt(head_dim) unless the family says).
    pub attn_scale: f32,
    /// Scale Q by `attn_scale` after RoPE instead of scaling the scores (gemma3, as
    /// llama.cpp does: the rounding differs).
    pub q_prescale: bool,
    /// The embedding rows are multiplied by this (gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// `tanh(logits / c) * c` on the output logits, when the file declares it.
    pub final_softcap: Option<f32>,
    pub sliding: Option<SlidingWindow>,
    pub moe: Option<Moe>,
}

impl ModelConfig {
    /// A plain llama-family configuration; the GGUF and Hugging Face readers fill in
    /// the rest.
    #[allow(clippy::too_many_arguments)]
    pub fn llama_like(
        arch: &str,
        family: Family,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        hidden: usize,
        vocab: usize,
    ) -> Self {
        Self {
            arch: arch.to_string(),
            family,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden,
            vocab,
            train_ctx: 4096,
            rms_eps: 1e-6,
            rope_base: 10_000.0,
            rope_neox: !matches!(family, Family::Llama),
            rope_scaling: RopeScaling::default(),
            act: Act::Silu,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            q_prescale: false,
            embed_scale: None,
            final_softcap: None,
            sliding: None,
            moe: None,
        }
    }

    /// Whether layer `layer` attends over a sliding window, and its width.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding
            .as_ref()
            .filter(|s| s.local.get(layer).copied().unwrap_or(false))
            .map(|s| s.window)
    }

    /// Which rotary table layer `layer` uses: 0 the global one, 1 the local one.
    pub fn rope_table(&self, layer: usize) -> usize {
        usize::from(self.window(layer).is_some())
    }

    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let get = |k: &str| {
            ct.metadata
                .get(k)
                .ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata lacks `{k}`")))
        };
        let arch = get("general.architecture")?.to_string()?.clone();
        let family = match arch.as_str() {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "qwen3moe" => Family::Qwen3Moe,
            "gemma3" => Family::Gemma3,
            other => {
                candle_core::bail!("unsupported architecture `{other}` (supported: {SUPPORTED})")
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| -> Result<usize> { Ok(get(&key(k))?.to_u32()? as usize) };
        let f = |k: &str| -> Option<f32> { get(&key(k)).and_then(|v| v.to_f32()).ok() };
        let n_heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        if n_heads == 0 {
            candle_core::bail!("{arch}.attention.head_count is 0");
        }
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = u("attention.key_length").unwrap_or(hidden / n_heads);
        let vocab = match get("tokenizer.ggml.tokens")? {
            gguf_file::Value::Array(a) => a.len(),
            _ => candle_core::bail!("tokenizer.ggml.tokens is not an array"),
        };
        let n_layers = u("block_count")?;
        let mut c = Self::llama_like(
            &arch, family, n_layers, n_heads, n_kv_heads, head_dim, hidden, vocab,
        );
        c.train_ctx = u("context_length").unwrap_or(4096);
        c.rms_eps = get(&key("attention.layer_norm_rms_epsilon"))?.to_f32()? as f64;
        c.rope_base = f("rope.freq_base").unwrap_or(10_000.0);
        c.rope_scaling = rope_scaling(ct, &arch, c.train_ctx)?;
        if family == Family::Gemma3 {
            c.act = Act::GeluTanh;
            c.q_prescale = true;
            c.embed_scale = Some((hidden as f32).sqrt());
            c.final_softcap = f("final_logit_softcapping").filter(|&v| v > 0.0);
            if let Some(window) = u("attention.sliding_window").ok().filter(|&w| w > 0) {
                // Every sixth layer is global unless the file says otherwise.
                let pattern = u("attention.sliding_window_pattern").unwrap_or(6).max(1);
                c.sliding = Some(SlidingWindow {
                    window,
                    local: (0..n_layers).map(|l| l % pattern < pattern - 1).collect(),
                    rope_base: f("rope.freq_base_swa").unwrap_or(10_000.0),
                });
            }
        }
        if family == Family::Qwen3Moe {
            let experts = u("expert_count")?;
            let used = u("expert_used_count")?;
            if used == 0 || used > experts {
                candle_core::bail!("{arch}: expert_used_count {used} of {experts} experts");
            }
            c.moe = Some(Moe {
                experts,
                used,
                ffn: u("expert_feed_forward_length")?,
                // llama.cpp normalizes the picked weights of qwen3moe always.
                norm_topk: true,
            });
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 || head_dim % 2 != 0 {
            candle_core::bail!(
                "unusable head layout: {n_heads} heads, {n_kv_heads} KV heads, head_dim {head_dim}"
            );
        }
        Ok(c)
    }
}

/// `rope.scaling.*` as llama.cpp reads them: `linear` and `yarn` scale every angle by
/// `1 / factor`, YaRN also mixes in extrapolation and scales the magnitude; `none` (and
/// llama3's scaling, which comes as per-pair factors in the `rope_freqs` tensor) leave
/// the angles alone here.
fn rope_scaling(ct: &gguf_file::Content, arch: &str, train_ctx: usize) -> Result<RopeScaling> {
    let meta = |k: &str| ct.metadata.get(&format!("{arch}.rope.scaling.{k}"));
    let kind = match meta("type") {
        Some(v) => v.to_string()?.clone(),
        None => "none".to_string(),
    };
    let factor = meta("factor")
        .and_then(|v| v.to_f32().ok())
        .filter(|&f| f > 0.0);
    let mut s = RopeScaling {
        n_ctx_orig: meta("original_context_length")
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .unwrap_or(train_ctx),
        ..RopeScaling::default()
    };
    match kind.as_str() {
        "none" => {}
        "linear" => s.freq_scale = factor.map(|f| 1.0 / f).unwrap_or(1.0),
        "yarn" => {
            s.freq_scale = factor.map(|f| 1.0 / f).unwrap_or(1.0);
            // As llama.cpp recovers it from the frequency scale.
            let factor = 1.0 / s.freq_scale;
            s.ext_factor = 1.0;
            // llama.cpp's context setup: mscale 0.1 ln(factor) + 1 (unless a log
            // multiplier says otherwise), then cancelled against the same term that
            // `rope_yarn` multiplies in, then the file's attention factor.
            let mscale = |m: f32| super::rope::yarn_mscale(factor, m);
            let log_mul = meta("yarn_log_multiplier")
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(0.0);
            let total = if log_mul != 0.0 {
                mscale(1.0) / mscale(log_mul)
            } else {
                mscale(1.0)
            };
            s.attn_factor = super::rope::yarn_attn_factor(factor, total);
            if let Some(b) = meta("yarn_beta_fast").and_then(|v| v.to_f32().ok()) {
                s.beta_fast = b;
            }
            if let Some(b) = meta("yarn_beta_slow").and_then(|v| v.to_f32().ok()) {
                s.beta_slow = b;
            }
        }
        other => candle_core::bail!(
            "rope scaling type `{other}` is not supported (none, linear, yarn; llama3 \
             scaling comes as the rope_freqs tensor)"
        ),
    }
    if let Some(a) = meta("attn_factor").and_then(|v| v.to_f32().ok()) {
        s.attn_factor *= a;
    }
    Ok(s)
}

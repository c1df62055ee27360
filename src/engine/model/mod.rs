//! Decoder-only transformer (llama family: Llama 2/3, Mistral, SmolLM, TinyLlama; and
//! qwen2 with its QKV biases) over quantized GGUF weights, or dense weights from a
//! Hugging Face directory ([`hf`]).
//!
//! Unlike candle's `quantized_llama`, the model holds no state: every forward pass
//! borrows the callers' [`SeqCache`]s, so a cache can outlive a request, be measured and
//! be spilled. One pass takes several sequences at once (prefill chunks or one decode
//! token each): the projections and the MLP run once over all their rows, attention runs
//! per sequence against that sequence's cache.

mod batch_plan;
mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(test)]
mod cuda_emu;
mod cuda_pack;
#[cfg(feature = "cuda")]
mod fused;
mod gguf;
pub mod hf;
mod host;
mod logits;
mod moe;
mod rope;
mod swiglu;

pub use batch_plan::Sum8;
pub use config::{Act, Family, ModelConfig, Moe, RopeScaling, SlidingWindow, SUPPORTED};
pub use gguf::metadata_strings;
pub use logits::{HostRows, Logits};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::kernels::quant::{KWeight, Q5Weight, QWeight};
use crate::kv::{CacheLayout, KvDtype, LocalWindow, SeqCache};

/// A weight matrix: our ggml-exact kernels where they cover the type, else candle's.
#[derive(Debug)]
enum Weight {
    /// Q4_0, Q4_1, Q8_0.
    Ours(QWeight),
    /// Q5_0 (Q8_0 activations, like `Ours`).
    Q5(Q5Weight),
    /// Q4_K, Q6_K (Q8_K activations).
    K(KWeight),
    Candle(QMatMul),
}

impl Weight {
    fn new(t: QTensor, dequantize: bool) -> Result<Self> {
        if dequantize {
            return Ok(Self::Candle(QMatMul::Tensor(t.dequantize(&t.device())?)));
        }
        if t.device().is_cpu() {
            if let Some(w) = QWeight::from_qtensor(&t)? {
                return Ok(Self::Ours(w));
            }
            if let Some(w) = Q5Weight::from_qtensor(&t)? {
                return Ok(Self::Q5(w));
            }
            if let Some(w) = KWeight::from_qtensor(&t)? {
                return Ok(Self::K(w));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Ours(w) => w.matmul(x),
            Self::Q5(w) => w.matmul(x),
            Self::K(w) => w.matmul(x),
            Self::Candle(w) => w.forward(x),
        }
    }
}

/// One weight matrix with its optional bias; the bias also as host floats.
#[derive(Debug)]
struct Linear {
    w: Weight,
    b: Option<(Tensor, Vec<f32>)>,
    /// Output width.
    n: usize,
}

/// Projections that read the same input, run as one matrix where their types allow:
/// Q|K|V and gate|up are concatenated at load (their rows are whole blocks), so a
/// step does one matmul (one pass of the thread pool) instead of three or two.
#[derive(Debug)]
struct Proj {
    parts: Vec<Linear>,
}

impl Proj {
    fn width(&self) -> usize {
        self.parts.iter().map(|p| p.n).sum()
    }

    /// `(rows, width)`: the parts' outputs side by side.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ys = self
            .parts
            .iter()
            .map(|p| {
                let y = p.w.forward(x)?;
                match &p.b {
                    Some((b, _)) => y.broadcast_add(b),
                    None => Ok(y),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        match <[Tensor; 1]>::try_from(ys) {
            Ok([y]) => Ok(y),
            Err(ys) => Tensor::cat(&ys, 1),
        }
    }
}

/// An RMSNorm weight, on the device and as host floats.
#[derive(Debug)]
struct Norm {
    t: Tensor,
    v: Vec<f32>,
}

#[derive(Debug)]
struct Layer {
    attn_norm: Norm,
    /// Q, K and V (widths `n_heads*head_dim`, `n_kv_heads*head_dim` twice).
    qkv: Proj,
    /// QK-norm: an RMSNorm (width `head_dim`) of every Q head and every K head, before
    /// RoPE (qwen3, gemma3).
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    wo: Proj,
    /// A norm of the attention output before the residual add (gemma3).
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    mlp: Mlp,
    /// A norm of the MLP output before the residual add (gemma3).
    post_ffn_norm: Option<Norm>,
}

/// A layer's MLP: one gated MLP, or a routed mixture of them.
#[derive(Debug)]
enum Mlp {
    Dense(Expert),
    Moe(MoeMlp),
}

/// One gated MLP: gate and up as one matrix (width `2 * ffn`), then down.
#[derive(Debug)]
struct Expert {
    gate_up: Proj,
    down: Proj,
}

/// A mixture of experts: the router's logits (one per expert) pick the experts each
/// token goes through.
#[derive(Debug)]
struct MoeMlp {
    router: Proj,
    experts: Vec<Expert>,
}

/// The token embedding table: host floats on the CPU, a device tensor elsewhere.
#[derive(Debug)]
enum Embed {
    Host(Vec<f32>),
    Dev(Tensor),
}

/// How the CUDA wide prefill multiplies a pass's projections
/// (`CANDELA_CUDA_WIDE_GEMM=f16|int8`, f16 by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WideGemm {
    /// Each weight matrix dequantized to f16 once a pass, the activations rounded to
    /// f16, cuBLAS with f32 sums (the default: faster at every size timed).
    F16,
    /// int8 tensor-core GEMMs on activations quantized per 32 values, as the decode
    /// kernels quantize them.
    Int8,
}

impl WideGemm {
    /// The environment's choice, else [`WideGemm::F16`].
    pub fn from_env() -> Self {
        match std::env::var("CANDELA_CUDA_WIDE_GEMM").as_deref() {
            Ok("int8") => Self::Int8,
            _ => Self::F16,
        }
    }
}

/// Device bytes the CUDA wide prefill would hold for the GGUF model `ct` (whose
/// configuration is `cfg`) on a card that has it — 0 where it would not run: a family or
/// head size the fused kernels do not take, a projection in a layout not checked wide
/// (unless `CANDELA_CUDA_WIDE=1`), or `CANDELA_CUDA_WIDE=0`. For `candela plan`; a
/// server asks its loaded model ([`Model::pass_scratch_bytes`]).
pub fn wide_scratch_estimate(ct: &gguf_file::Content, cfg: &ModelConfig) -> usize {
    let forced = std::env::var("CANDELA_CUDA_WIDE").ok();
    let fused = matches!(cfg.family, Family::Llama | Family::Qwen2)
        && cfg.sliding.is_none()
        && matches!(cfg.head_dim, 64 | 128);
    if !fused || forced.as_deref() == Some("0") {
        return 0;
    }
    // Elements of each layer's projections, and whether all are in checked layouts (Q|K|V
    // counted as one matrix: an upper bound where the engine splits it by layout).
    let mut largest = 0;
    let mut checked = true;
    for i in 0..cfg.n_layers {
        let mut group = |names: &[&str]| -> Option<usize> {
            let mut n = 0;
            for name in names {
                let t = ct.tensor_infos.get(&format!("blk.{i}.{name}.weight"))?;
                let pack = cuda_pack::Pack::of(t.ggml_dtype)?;
                checked &= pack.wide_checked();
                n += t.shape.elem_count();
            }
            Some(n)
        };
        let groups = [
            group(&["attn_q", "attn_k", "attn_v"]),
            group(&["attn_output"]),
            group(&["ffn_gate", "ffn_up"]),
            group(&["ffn_down"]),
        ];
        // A missing tensor or a type the fused kernels do not take: no fused path.
        let Some(groups) = groups.into_iter().collect::<Option<Vec<usize>>>() else {
            return 0;
        };
        largest = groups.into_iter().fold(largest, usize::max);
    }
    if !checked && forced.as_deref() != Some("1") {
        return 0;
    }
    let ffn = ct
        .tensor_infos
        .get("blk.0.ffn_gate.weight")
        .map_or(0, |t| t.shape.elem_count() / cfg.hidden.max(1));
    let shape = batch_plan::WideShape {
        hidden: cfg.hidden,
        q: cfg.n_heads * cfg.head_dim,
        kv: cfg.n_kv_heads * cfg.head_dim,
        ffn,
        n_layers: cfg.n_layers,
        largest,
    };
    shape.scratch_bytes(WideGemm::from_env() == WideGemm::F16)
}

/// One sequence's share of a forward pass.
pub struct SeqInput<'a> {
    /// New tokens; they take the positions after `cache.len()`.
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    /// Return logits for every new token instead of only the last.
    pub all_logits: bool,
}

/// Weights of a loaded model.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    embed: Embed,
    layers: Vec<Layer>,
    norm: Norm,
    output: Weight,
    /// Rotary tables `(ctx, head_dim / 2)`: index 0 for global layers, 1 for local
    /// (sliding-window) layers when their base differs ([`ModelConfig::rope_table`]).
    cos: Vec<Tensor>,
    sin: Vec<Tensor>,
    /// The same tables as host floats.
    rope_host: Vec<(Vec<f32>, Vec<f32>)>,
    device: Device,
    /// Reused buffers of the CPU path.
    scratch: Mutex<host::Scratch>,
    /// Bytes of the weights as held: quantized as stored for GGUF, f32 for dense.
    pub weight_bytes: usize,
    pub ctx_size: usize,
    /// Our fused CUDA decode path (see `engine::model::cuda`), when the model's types allow it.
    #[cfg(feature = "cuda")]
    fused: Option<cuda::FusedDecoder>,
    /// Whether [`Model::forward`] may take the fused path (on by default).
    fused_on: AtomicBool,
    /// Whether the tensor path's prompt chunks attend through the CUDA flash kernel (where
    /// it covers the card and head size, 64 or 128; by default, `0` never; `candela doctor`
    /// compares it with the matmul-softmax-matmul attention)...
    flash_on: AtomicBool,
    /// ...and whether local (sliding-window) layers do too (`CANDELA_CUDA_FLASH=1`).
    flash_everywhere: bool,
}

/// With batched prefill off (`CANDELA_CUDA_PREFILL=0`), sequences of at most this many
/// new tokens go through the fused CUDA path one token at a time (longer prompts take
/// the tensor path); with it on, the limit is the decoder's `prefill_max`.
#[cfg(feature = "cuda")]
const FUSED_MAX_TOKENS: usize = 64;

impl Model {
    /// The finished model: rotary tables for `ctx_size` positions around the weights
    /// (`freq_factors`: llama3's per-pair frequency factors).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: ModelConfig,
        embed: Embed,
        layers: Vec<Layer>,
        norm: Norm,
        output: Weight,
        device: &Device,
        ctx_size: usize,
        weight_bytes: usize,
        freq_factors: Option<Vec<f32>>,
    ) -> Result<Self> {
        let half = config.head_dim / 2;
        if let Some(f) = &freq_factors {
            if f.len() != half {
                candle_core::bail!("rope_freqs has {} values, expected {half}", f.len());
            }
        }
        let mut bases = vec![config.rope_base];
        if let Some(sw) = &config.sliding {
            bases.push(sw.rope_base);
        }
        let (mut cos, mut sin, mut rope_host) = (Vec::new(), Vec::new(), Vec::new());
        for (i, base) in bases.into_iter().enumerate() {
            // Local layers rotate unscaled (llama.cpp's `rope_freq_scale_train_swa`).
            let plain = RopeScaling::default();
            let scaling = if i == 0 { &config.rope_scaling } else { &plain };
            let (c, s) = rope::tables(
                config.head_dim,
                base,
                ctx_size,
                scaling,
                freq_factors.as_deref().filter(|_| i == 0),
            );
            cos.push(Tensor::from_slice(&c, (ctx_size, half), device)?);
            sin.push(Tensor::from_slice(&s, (ctx_size, half), device)?);
            rope_host.push((c, s));
        }
        let mut model = Self {
            #[cfg(feature = "cuda")]
            fused: None,
            fused_on: AtomicBool::new(true),
            flash_on: AtomicBool::new(false),
            flash_everywhere: false,
            weight_bytes,
            config,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            rope_host,
            device: device.clone(),
            scratch: Mutex::new(host::Scratch::default()),
            ctx_size,
        };
        // On by default for the head sizes and layers it has been checked with on a GPU
        // (64 and 128, global layers); `CANDELA_CUDA_FLASH=1` for sliding windows too.
        let flash_env = std::env::var("CANDELA_CUDA_FLASH").ok();
        let all = flash_env.as_deref() == Some("1");
        model.flash_everywhere = all;
        model.set_flash_attention(flash_env.as_deref() != Some("0"));
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Allow or forbid the fused GPU decode path; returns whether the model has one.
    pub fn set_fused_decode(&self, on: bool) -> bool {
        self.fused_on.store(on, Ordering::Relaxed);
        self.has_fused_decode()
    }

    /// Whether this model runs decode steps through our fused GPU kernels.
    pub fn has_fused_decode(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.fused.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// The longest prompt chunk the fused GPU path takes, so that chunks of several
    /// sequences go through one pass (0: no fused path): their rows packed into batched
    /// prefill steps, or with batched prefill off stepped together one token position
    /// at a time.
    pub fn fused_chunk(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            if self.fused_on.load(Ordering::Relaxed) {
                return if d.prefill() {
                    d.prefill_max()
                } else {
                    FUSED_MAX_TOKENS
                };
            }
        }
        0
    }

    /// The longest prompt chunk the fused GPU path prefills in batched steps (longer
    /// ones take the tensor path): set it, returning the one before (None without a
    /// fused path).
    pub fn set_fused_prefill_max(&self, n: usize) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            let was = d.prefill_max();
            d.set_prefill_max(n);
            return Some(was);
        }
        let _ = n;
        None
    }

    /// The longest prompt chunk past the batched limit that takes the tensor path even
    /// where the fused path prefills wide: set it, returning the one before (None without
    /// a fused path).
    pub fn set_fused_wide_min(&self, n: usize) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            let was = d.wide_min();
            d.set_wide_min(n);
            return Some(was);
        }
        let _ = n;
        None
    }

    /// Run the fused path's decode attention on the tensor cores (the default;
    /// `CANDELA_CUDA_ATT_TC=0` off) or in its per-head kernels; returns whether this card
    /// and model have the tensor-core kernels at all (if not, nothing changes).
    pub fn set_attn_tc(&self, on: bool) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.set_attn_tc(on);
        }
        let _ = on;
        false
    }

    /// Which projections of the fused path sum in eight parts (`CANDELA_CUDA_SUM8`);
    /// returns whether this card has the eight-part kernels (if not, nothing changes).
    pub fn set_sum8(&self, s: batch_plan::Sum8) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.set_sum8(s);
        }
        let _ = s;
        false
    }

    /// Which projections of the fused path sum in eight parts (Off without it).
    pub fn sum8(&self) -> batch_plan::Sum8 {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.sum8();
        }
        batch_plan::Sum8::Off
    }

    /// Set the fused path's tensor-core attention's least chunk length in positions (64,
    /// 128, 192 or 256); returns the previous one, or None without that path or for
    /// another value.
    pub fn set_attn_tc_chunk(&self, n: usize) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.set_attn_tc_chunk(n);
        }
        let _ = n;
        None
    }

    /// Whether the fused path's decode attention runs on the tensor cores.
    pub fn attn_tc(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.attn_tc();
        }
        false
    }

    /// Split the fused path's decode attention over position chunks at long contexts
    /// (the default) or not; returns whether this model's fused path splits at all.
    pub fn set_attn_split(&self, on: bool) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.set_attn_split(on);
        }
        let _ = on;
        false
    }

    /// Whether prompt chunks past the fused limit prefill wide (int8 tensor-core GEMMs
    /// and flash attention) rather than on the tensor path: set it, returning whether the
    /// card and model have it.
    pub fn set_fused_wide(&self, on: bool) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.set_wide(on);
        }
        let _ = on;
        false
    }

    /// How the wide prefill multiplies the projections: set it, returning the previous
    /// choice (None without a fused path).
    pub fn set_wide_gemm(&self, gemm: WideGemm) -> Option<WideGemm> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return Some(d.set_wide_gemm(gemm));
        }
        let _ = gemm;
        None
    }

    /// Whether long prompt chunks prefill wide in a forward pass now (the fused path on,
    /// its wide prefill on).
    pub fn prefills_wide(&self) -> bool {
        self.fused_on.load(Ordering::Relaxed) && self.fused_wide()
    }

    /// Whether a prefill pass of several sequences past the fused limit's rows runs as
    /// shared wide passes (by default; `CANDELA_CUDA_WIDE_PACK=0` turns it off).
    pub fn fused_wide_pack(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return self.fused_on.load(Ordering::Relaxed) && d.wide_pack();
        }
        false
    }

    /// Turn packed wide passes on or off, returning whether the card has the wide
    /// prefill at all.
    pub fn set_fused_wide_pack(&self, on: bool) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.set_wide_pack(on);
        }
        let _ = on;
        false
    }

    /// Whether prompt chunks past the fused limit prefill wide.
    pub fn fused_wide(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.wide();
        }
        false
    }

    /// Device bytes the model's passes allocate as they first need them, beyond the weights
    /// and the caches: the wide prefill's buffers where long prompts prefill wide (0
    /// otherwise). A server keeps them out of the session caches' device budget.
    pub fn pass_scratch_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return d.wide_scratch_bytes();
        }
        0
    }

    /// Which of the GPU paths this model takes, for the start-up log (None on a CPU):
    /// fused decode or candle's tensor path, the batched step's mat-mat kernels, how long
    /// prompts prefill, and whether their attention is the flash kernel.
    pub fn gpu_paths(&self) -> Option<String> {
        if self.device.is_cpu() {
            return None;
        }
        let flash = if self.flash_attention_on() {
            "on"
        } else {
            "off"
        };
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return Some(format!(
                "fused decode, batched mat-mats on {}, long prompts {}, flash attention {flash}, decode attention {}",
                match d.sum8() {
                    batch_plan::Sum8::All => "tensor cores (sums in eight parts)",
                    batch_plan::Sum8::GateUp => "tensor cores (gate|up summed in eight parts)",
                    batch_plan::Sum8::Off if d.tensor_cores() => "tensor cores",
                    batch_plan::Sum8::Off => "dp4a",
                },
                match (d.wide(), d.wide_gemm()) {
                    (true, WideGemm::F16) => "wide (f16 GEMMs)",
                    (true, WideGemm::Int8) => "wide (int8 GEMMs)",
                    (false, _) => "on the tensor path",
                },
                if d.attn_tc() {
                    "on tensor cores"
                } else {
                    "a block per query head"
                }
            ));
        }
        Some(format!("candle's tensor path, flash attention {flash}"))
    }

    /// Per-kernel costs of the fused GPU path with the attention at each of `positions`
    /// (report lines for `candela doctor`); None without a fused path.
    pub fn fused_bench(&self, positions: &[usize]) -> Result<Option<String>> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            let mut cache = SeqCache::new(self.cache_layout(KvDtype::F16), &self.device);
            return d.bench_report(&mut cache, positions).map(Some);
        }
        let _ = positions;
        Ok(None)
    }

    /// Where the host's time of the fused path's batched decode steps went since the
    /// last call (see `FusedDecoder::take_phases`); None without a fused path.
    pub fn fused_host_phases(&self) -> Option<(u64, [f64; 3])> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.fused {
            return Some(d.take_phases());
        }
        None
    }

    /// Shape of this model's KV cache with the given element type.
    pub fn cache_layout(&self, dtype: KvDtype) -> CacheLayout {
        CacheLayout {
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            dtype,
            window: self
                .config
                .sliding
                .as_ref()
                .and_then(|s| LocalWindow::new(s.window, &s.local)),
        }
    }

    /// Run new tokens of several sequences through the model, appending their K/V to
    /// each sequence's cache. Returns, per sequence, logits `(rows, vocab)` in f32: one
    /// row (the last token) or one per new token when `all_logits` is set.
    pub fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
        self.forward_logits(batch)?
            .into_iter()
            .map(Logits::into_tensor)
            .collect()
    }

    /// [`Self::forward`], each sequence's logits as the pass left them: a tensor, or rows
    /// of a host buffer the batch shares (a batched decode step on the fused GPU path),
    /// which the next pass may reuse once every sequence's rows are dropped.
    pub fn forward_logits(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Logits>> {
        let cfg = &self.config;
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            if s.tokens.is_empty() {
                candle_core::bail!("forward called with an empty sequence");
            }
            let pos = s.cache.len();
            if pos + s.tokens.len() > self.ctx_size {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the context size {}",
                    pos + s.tokens.len(),
                    self.ctx_size
                );
            }
            s.cache.reserve(s.tokens.len())?;
            spans.push((ids.len(), s.tokens.len(), pos));
            ids.extend_from_slice(s.tokens);
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({})", cfg.vocab);
        }
        #[cfg(feature = "cuda")]
        if let Some(out) = self.forward_fused(batch)? {
            return Ok(out);
        }
        let tensors = |v: Vec<Tensor>| v.into_iter().map(Logits::from).collect();
        if self.device.is_cpu() && batch.iter().all(|s| s.cache.is_host()) {
            // The whole pass runs on a pool thread: a parallel loop started from outside
            // the pool hands off to it and sleeps on a latch (a futex round trip per
            // loop, ~100 per decode step); from inside, the caller works along.
            return if rayon::current_thread_index().is_some() {
                self.forward_host(batch, &spans, &ids)
            } else {
                rayon::scope(|_| self.forward_host(batch, &spans, &ids))
            }
            .map(tensors);
        }
        let total = ids.len();
        let mut x = match &self.embed {
            Embed::Dev(table) => {
                table.index_select(&Tensor::from_vec(ids, total, &self.device)?, 0)?
            }
            Embed::Host(table) => {
                let h = cfg.hidden;
                let mut rows = Vec::with_capacity(total * h);
                for &t in &ids {
                    rows.extend_from_slice(&table[t as usize * h..(t as usize + 1) * h]);
                }
                Tensor::from_vec(rows, (total, h), &self.device)?
            }
        };
        if let Some(scale) = cfg.embed_scale {
            x = x.affine(scale as f64, 0.0)?;
        }
        let n_rep = cfg.n_heads / cfg.n_kv_heads;
        // Prompt chunks over f16 device caches attend through the flash kernel (no masks).
        let flash = self.flash_on.load(Ordering::Relaxed)
            && batch.iter().all(|s| {
                s.tokens.len() > 1 && s.cache.layout().dtype == KvDtype::F16 && !s.cache.is_host()
            });
        // Masks per sequence: [global layers, local layers].
        let mut masks = Vec::with_capacity(spans.len());
        for (s, &(_, n, pos)) in batch.iter().zip(&spans) {
            let global = if flash {
                None
            } else {
                self.mask(n, pos, 0, n_rep, None)?
            };
            let local = match &cfg.sliding {
                Some(_) if flash && self.flash_everywhere => None,
                Some(sw) => self.mask(n, pos, s.cache.local_base(), n_rep, Some(sw.window))?,
                None => None,
            };
            masks.push([global, local]);
        }
        let eps = cfg.rms_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let table = cfg.rope_table(li);
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm.t, eps)?;
            let qkv = layer.qkv.forward(&h)?;
            let (nq, nkv) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
            let q = qkv.narrow(1, 0, nq)?;
            let k = qkv.narrow(1, nq, nkv)?;
            let v = qkv.narrow(1, nq + nkv, nkv)?;
            let mut ys = Vec::with_capacity(batch.len());
            for (si, s) in batch.iter_mut().enumerate() {
                let (off, n, pos) = spans[si];
                let heads = |t: &Tensor, nh: usize| -> Result<Tensor> {
                    t.narrow(0, off, n)?
                        .reshape((1, n, nh, cfg.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let qk_norm = |t: Tensor, norm: &Option<Norm>| -> Result<Tensor> {
                    match norm {
                        Some(w) => candle_nn::ops::rms_norm(&t, &w.t, eps),
                        None => Ok(t),
                    }
                };
                let qs = qk_norm(heads(&q, cfg.n_heads)?, &layer.q_norm)?;
                let ks = qk_norm(heads(&k, cfg.n_kv_heads)?, &layer.k_norm)?;
                let mut qs = self.rope(&qs, pos, table)?;
                let ks = self.rope(&ks, pos, table)?;
                if cfg.q_prescale {
                    qs = qs.affine(cfg.attn_scale as f64, 0.0)?;
                }
                let vs = heads(&v, cfg.n_kv_heads)?;
                let (kc, vc) = s.cache.write_layer(li, pos, &ks, &vs)?;
                if flash && (self.flash_everywhere || cfg.window(li).is_none()) {
                    ys.push(self.flash_attention(&qs, &kc, &vc, li, pos, s.cache.local_base())?);
                    continue;
                }
                let mask = masks[si][usize::from(cfg.window(li).is_some())].as_ref();
                ys.push(self.attention(&qs, &kc, &vc, mask, n)?);
            }
            let y = if ys.len() == 1 {
                ys.swap_remove(0)
            } else {
                Tensor::cat(&ys, 0)?
            };
            let post = |t: Tensor, norm: &Option<Norm>| -> Result<Tensor> {
                match norm {
                    Some(w) => candle_nn::ops::rms_norm(&t, &w.t, eps),
                    None => Ok(t),
                }
            };
            x = (post(layer.wo.forward(&y)?, &layer.post_attn_norm)? + &x)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm.t, eps)?;
            let y = match &layer.mlp {
                Mlp::Dense(e) => self.expert_forward(e, &h)?,
                Mlp::Moe(m) => self.moe_forward(m, &h)?,
            };
            x = (post(y, &layer.post_ffn_norm)? + &x)?;
        }
        // Only the rows whose logits are wanted go through the norm and the vocab matmul.
        let mut rows = Vec::new();
        for (si, s) in batch.iter().enumerate() {
            let (off, n, _) = spans[si];
            if s.all_logits {
                rows.extend((off..off + n).map(|r| r as u32));
            } else {
                rows.push((off + n - 1) as u32);
            }
        }
        let nrows = rows.len();
        let sel = x.index_select(&Tensor::from_vec(rows, nrows, &self.device)?, 0)?;
        let h = candle_nn::ops::rms_norm(&sel, &self.norm.t, eps)?;
        let mut logits = self.output.forward(&h)?.to_dtype(DType::F32)?;
        if let Some(c) = cfg.final_softcap {
            logits = logits
                .affine((1.0 / c) as f64, 0.0)?
                .tanh()?
                .affine(c as f64, 0.0)?;
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for s in batch.iter_mut() {
            let k = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(Logits::from(logits.narrow(0, r, k)?));
            r += k;
            s.cache.commit(s.tokens);
        }
        Ok(out)
    }

    /// One gated MLP (tensor path): `down(act(gate) * up)`.
    fn expert_forward(&self, e: &Expert, h: &Tensor) -> Result<Tensor> {
        let gu = e.gate_up.forward(h)?;
        let ffn = gu.dim(1)? / 2;
        let g = gu.narrow(1, 0, ffn)?;
        let g = match self.config.act {
            Act::Silu => candle_nn::ops::silu(&g)?,
            Act::GeluTanh => {
                let v: Vec<f32> = g.flatten_all()?.to_vec1()?;
                let v: Vec<f32> = v.into_iter().map(swiglu::gelu_ggml).collect();
                Tensor::from_vec(v, g.shape(), g.device())?
            }
        };
        let u = gu.narrow(1, ffn, ffn)?;
        e.down.forward(&(g * u)?)
    }

    /// A mixture of experts (tensor path): per row, the router's softmax picks the top
    /// experts, whose outputs are summed with their (renormalized) weights.
    fn moe_forward(&self, m: &MoeMlp, h: &Tensor) -> Result<Tensor> {
        let Some(cfg) = &self.config.moe else {
            candle_core::bail!("a mixture-of-experts layer in a model without one");
        };
        let rows = h.dim(0)?;
        let logits: Vec<Vec<f32>> = m.router.forward(h)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut out = Vec::with_capacity(rows);
        for (r, l) in logits.iter().enumerate() {
            let picks = moe::route(l, cfg.used, cfg.norm_topk);
            let hr = h.narrow(0, r, 1)?;
            let mut acc: Option<Tensor> = None;
            for (e, w) in picks {
                let y = self
                    .expert_forward(&m.experts[e], &hr)?
                    .affine(w as f64, 0.0)?;
                acc = Some(match acc {
                    Some(a) => (a + y)?,
                    None => y,
                });
            }
            match acc {
                Some(a) => out.push(a),
                None => candle_core::bail!("no expert picked"),
            }
        }
        Tensor::cat(&out, 0)
    }

    fn rope(&self, x: &Tensor, pos: usize, table: usize) -> Result<Tensor> {
        let n = x.dim(2)?;
        let cos = self.cos[table].narrow(0, pos, n)?;
        let sin = self.sin[table].narrow(0, pos, n)?;
        if self.config.rope_neox {
            candle_nn::rotary_emb::rope(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin)
        }
    }

    /// Additive causal mask for `n` new tokens at `pos` over keys at positions
    /// `start..pos + n` (a local layer's cache starts at its base), tiled for the `n_rep`
    /// query heads that share one KV head: shape `(n_rep * n, pos + n - start)`; with a
    /// `window`, a position sees only the `window` last positions (itself included).
    /// None when nothing is masked (one token, no window reached).
    fn mask(
        &self,
        n: usize,
        pos: usize,
        start: usize,
        n_rep: usize,
        window: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let len = pos + n - start;
        if n == 1 && window.is_none_or(|w| len <= w) {
            return Ok(None);
        }
        let mut m = vec![0f32; n_rep * n * len];
        for r in 0..n_rep {
            for s in 0..n {
                let row = (r * n + s) * len;
                // Key slot j holds position start + j.
                for j in (pos + s + 1 - start)..len {
                    m[row + j] = f32::NEG_INFINITY;
                }
                if let Some(w) = window {
                    for j in 0..(pos + s + 1).saturating_sub(w).saturating_sub(start) {
                        m[row + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (n_rep * n, len), &self.device)?))
    }

    /// [`Self::attention`] for new positions from `pos` over an f16 device cache, by the
    /// flash kernel: the same products (Q and the weights rounded to f16, sums in f32)
    /// under an online softmax. `local_base`: the first position a local layer holds.
    #[cfg(feature = "cuda")]
    fn flash_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        pos: usize,
        local_base: usize,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let window = cfg.window(layer);
        let op = cuda::flash::Flash {
            n_rep: cfg.n_heads / cfg.n_kv_heads,
            pos,
            start: if window.is_some() { local_base } else { 0 },
            window: window.unwrap_or(0),
            scale: if cfg.q_prescale { 1.0 } else { cfg.attn_scale },
        };
        q.contiguous()?.apply_op3_no_bwd(k, v, &op)
    }

    #[cfg(not(feature = "cuda"))]
    fn flash_attention(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<Tensor> {
        candle_core::bail!("flash attention needs the cuda feature")
    }

    /// Whether prompt chunks on the device attend through the flash kernel: set it (the
    /// doctor compares the two), returning whether this model and device have it.
    pub fn set_flash_attention(&self, on: bool) -> bool {
        let covered = self.flash_covered();
        self.flash_on.store(on && covered, Ordering::Relaxed);
        covered
    }

    /// Whether prompt chunks on the device attend through the flash kernel.
    pub fn flash_attention_on(&self) -> bool {
        self.flash_on.load(Ordering::Relaxed)
    }

    fn flash_covered(&self) -> bool {
        #[cfg(feature = "cuda")]
        return cuda::flash::covers(&self.device, self.config.head_dim);
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Grouped-query attention without copying K/V per query head: the query heads of a
    /// group are stacked as rows against their one KV head. Returns `(n, n_heads*head_dim)`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        n: usize,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n_rep = cfg.n_heads / cfg.n_kv_heads;
        let q = q.reshape((1, cfg.n_kv_heads, n_rep * n, cfg.head_dim))?;
        // With an f16 cache, attention runs the way ggml's flash-attention kernel does:
        // Q and the attention weights rounded to f16 like K and V, products summed in f32.
        let half = k.dtype() == DType::F16;
        let r16 = |t: Tensor| -> Result<Tensor> {
            if half {
                t.to_dtype(DType::F16)?.to_dtype(DType::F32)
            } else {
                Ok(t)
            }
        };
        let q = r16(q)?;
        let k = k.to_dtype(DType::F32)?;
        let v = v.to_dtype(DType::F32)?;
        let scale = if cfg.q_prescale {
            1.0
        } else {
            cfg.attn_scale as f64
        };
        let att = (q.matmul(&k.contiguous()?.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = r16(candle_nn::ops::softmax_last_dim(&att)?)?;
        let y = att.matmul(&v.contiguous()?)?;
        y.reshape((1, cfg.n_heads, n, cfg.head_dim))?
            .transpose(1, 2)?
            .reshape((n, cfg.n_heads * cfg.head_dim))
    }
}

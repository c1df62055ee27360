//! Decoder-only transformer (llama family: Llama 2/3, Mistral, SmolLM, TinyLlama; and
//! qwen2 with its QKV biases) over quantized GGUF weights.
//!
//! Unlike candle's `quantized_llama`, the model holds no state: every forward pass
//! borrows the callers' [`SeqCache`]s, so a cache can outlive a request, be measured and
//! be spilled. One pass takes several sequences at once (prefill chunks or one decode
//! token each): the projections and the MLP run once over all their rows, attention runs
//! per sequence against that sequence's cache.

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;

use super::quant::QWeight;
use crate::kv::{CacheLayout, KvDtype, SeqCache};

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

/// A weight matrix: our ggml-exact kernels where they cover the type, else candle's.
#[derive(Debug)]
enum Weight {
    Ours(QWeight),
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
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Ours(w) => w.matmul(x),
            Self::Candle(w) => w.forward(x),
        }
    }
}

#[derive(Debug)]
struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
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
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Weight,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Bytes of the weights as stored (quantized).
    pub weight_bytes: usize,
    pub ctx_size: usize,
}

struct Loader<'a, R> {
    ct: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
    bytes: usize,
    dequantize: bool,
}

impl<R: Read + Seek> Loader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let t = self.ct.tensor(self.reader, name, self.device)?;
        self.bytes += t.storage_size_in_bytes();
        Ok(t)
    }
    fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        self.qtensor(name)?.dequantize(self.device)
    }
    fn linear(&mut self, name: &str) -> Result<Linear> {
        let w = Weight::new(self.qtensor(&format!("{name}.weight"))?, self.dequantize)?;
        let bias = format!("{name}.bias");
        let b = if self.has(&bias) {
            Some(self.dense(&bias)?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
}

impl Model {
    /// Load from a parsed GGUF. `ctx_size` bounds positions (rotary tables are built for it).
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        ctx_size: usize,
    ) -> Result<Self> {
        Self::load(ct, reader, device, ctx_size, false)
    }

    /// Load with every weight dequantized to f32: no activation quantization, so the
    /// arithmetic is plain f32 — slow, for checks that need float-level agreement.
    pub fn from_gguf_f32<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        ctx_size: usize,
    ) -> Result<Self> {
        Self::load(ct, reader, device, ctx_size, true)
    }

    fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        ctx_size: usize,
        dequantize: bool,
    ) -> Result<Self> {
        let config = ModelConfig::from_gguf(ct)?;
        let mut ld = Loader {
            ct,
            reader,
            device,
            bytes: 0,
            dequantize,
        };
        let embed_q = ld.qtensor("token_embd.weight")?;
        let embed = Embedding::new(embed_q.dequantize(device)?, config.hidden);
        let output = if ld.has("output.weight") {
            Weight::new(ld.qtensor("output.weight")?, dequantize)?
        } else {
            // Tied embeddings: the quantized table doubles as the output projection.
            Weight::new(embed_q, dequantize)?
        };
        let norm = ld.dense("output_norm.weight")?;
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: ld.dense(&format!("{p}.attn_norm.weight"))?,
                wq: ld.linear(&format!("{p}.attn_q"))?,
                wk: ld.linear(&format!("{p}.attn_k"))?,
                wv: ld.linear(&format!("{p}.attn_v"))?,
                wo: ld.linear(&format!("{p}.attn_output"))?,
                ffn_norm: ld.dense(&format!("{p}.ffn_norm.weight"))?,
                gate: ld.linear(&format!("{p}.ffn_gate"))?,
                up: ld.linear(&format!("{p}.ffn_up"))?,
                down: ld.linear(&format!("{p}.ffn_down"))?,
            });
        }
        let (cos, sin) = rope_tables(config.head_dim, config.rope_base, ctx_size, device)?;
        Ok(Self {
            weight_bytes: ld.bytes,
            config,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
            ctx_size,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Shape of this model's KV cache with the given element type.
    pub fn cache_layout(&self, dtype: KvDtype) -> CacheLayout {
        CacheLayout {
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            dtype,
        }
    }

    /// Run new tokens of several sequences through the model, appending their K/V to
    /// each sequence's cache. Returns, per sequence, logits `(rows, vocab)` in f32: one
    /// row (the last token) or one per new token when `all_logits` is set.
    pub fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
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
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        let masks = spans
            .iter()
            .map(|&(_, n, pos)| self.mask(n, pos, cfg.n_heads / cfg.n_kv_heads))
            .collect::<Result<Vec<_>>>()?;
        let eps = cfg.rms_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = layer.wq.forward(&h)?;
            let k = layer.wk.forward(&h)?;
            let v = layer.wv.forward(&h)?;
            let mut ys = Vec::with_capacity(batch.len());
            for (si, s) in batch.iter_mut().enumerate() {
                let (off, n, pos) = spans[si];
                let heads = |t: &Tensor, nh: usize| -> Result<Tensor> {
                    t.narrow(0, off, n)?
                        .reshape((1, n, nh, cfg.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let qs = self.rope(&heads(&q, cfg.n_heads)?, pos)?;
                let ks = self.rope(&heads(&k, cfg.n_kv_heads)?, pos)?;
                let vs = heads(&v, cfg.n_kv_heads)?;
                let (kc, vc) = s.cache.write_layer(li, pos, &ks, &vs)?;
                ys.push(self.attention(&qs, &kc, &vc, masks[si].as_ref(), n)?);
            }
            let y = if ys.len() == 1 {
                ys.swap_remove(0)
            } else {
                Tensor::cat(&ys, 0)?
            };
            x = (layer.wo.forward(&y)? + &x)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let u = layer.up.forward(&h)?;
            x = (layer.down.forward(&(g * u)?)? + &x)?;
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
        let h = candle_nn::ops::rms_norm(&sel, &self.norm, eps)?;
        let logits = self.output.forward(&h)?.to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut r = 0;
        for s in batch.iter_mut() {
            let k = if s.all_logits { s.tokens.len() } else { 1 };
            out.push(logits.narrow(0, r, k)?);
            r += k;
            s.cache.commit(s.tokens);
        }
        Ok(out)
    }

    fn rope(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let n = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        if self.config.rope_neox {
            candle_nn::rotary_emb::rope(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(x, &cos, &sin)
        }
    }

    /// Additive causal mask for `n` new tokens at `pos`, tiled for the `n_rep` query
    /// heads that share one KV head: shape `(n_rep * n, pos + n)`. None for one token.
    fn mask(&self, n: usize, pos: usize, n_rep: usize) -> Result<Option<Tensor>> {
        if n == 1 {
            return Ok(None);
        }
        let len = pos + n;
        let mut m = vec![0f32; n_rep * n * len];
        for r in 0..n_rep {
            for s in 0..n {
                let row = (r * n + s) * len;
                for j in (pos + s + 1)..len {
                    m[row + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (n_rep * n, len), &self.device)?))
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
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
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

fn rope_tables(dim: usize, base: f32, ctx: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / (base as f64).powf(2.0 * i as f64 / dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(ctx * dim / 2);
    let mut sin = Vec::with_capacity(ctx * dim / 2);
    for p in 0..ctx {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (ctx, dim / 2), device)?,
        Tensor::from_vec(sin, (ctx, dim / 2), device)?,
    ))
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

//! Loading a GGUF: its tensors onto the device (our kernels' layouts where they cover
//! the type), the fused CUDA path where the device has one, and plain string metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use candle_core::Result;

use std::io::{Read, Seek};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::*;

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
    fn norm(&mut self, name: &str) -> Result<Norm> {
        let t = self.dense(name)?;
        let v = t.to_dtype(DType::F32)?.to_vec1()?;
        Ok(Norm { t, v })
    }
    fn bias(&mut self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        let bias = format!("{name}.bias");
        if !self.has(&bias) {
            return Ok(None);
        }
        let v: Vec<f32> = self.dense(&bias)?.to_dtype(DType::F32)?.to_vec1()?;
        if v.len() != n {
            candle_core::bail!("{bias} has {} values, expected {n}", v.len());
        }
        Ok(Some(v))
    }
    fn linear_from(&self, t: QTensor, bias: Option<Vec<f32>>) -> Result<Linear> {
        let n = t.shape().dims2()?.0;
        let w = Weight::new(t, self.dequantize)?;
        let b = match bias {
            Some(v) => Some((Tensor::from_slice(&v, n, self.device)?, v)),
            None => None,
        };
        Ok(Linear { w, b, n })
    }
    /// The projections `names` (which read the same input) as one matrix when they
    /// share a block type and input width, else side by side.
    fn proj(&mut self, names: &[String]) -> Result<Proj> {
        let mut ts = Vec::new();
        let mut biases = Vec::new();
        for name in names {
            let t = self.qtensor(&format!("{name}.weight"))?;
            let n = t.shape().dims2()?.0;
            biases.push((self.bias(name, n)?, n));
            ts.push(t);
        }
        self.combine(ts, biases)
    }

    /// Matrices that read the same input as one [`Proj`] (see [`Self::proj`]).
    fn combine(&self, ts: Vec<QTensor>, biases: Vec<(Option<Vec<f32>>, usize)>) -> Result<Proj> {
        let dims: Vec<(usize, usize)> = ts
            .iter()
            .map(|t| t.shape().dims2())
            .collect::<Result<_>>()?;
        let dtype = ts[0].dtype();
        let blocky = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let same = ts.iter().all(|t| t.dtype() == dtype) && dims.iter().all(|d| d.1 == dims[0].1);
        if ts.len() == 1 || !same || !blocky {
            let parts = ts
                .into_iter()
                .zip(biases)
                .map(|(t, (b, _))| self.linear_from(t, b))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Proj { parts });
        }
        // Rows are whole blocks, so the row-major block data concatenates as it is.
        let mut raw = Vec::new();
        for t in &ts {
            raw.extend_from_slice(&t.data()?);
        }
        let n = dims.iter().map(|d| d.0).sum();
        let cat = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &raw,
            vec![n, dims[0].1],
            self.device,
        )?;
        let bias = if biases.iter().any(|(b, _)| b.is_some()) {
            let mut v = Vec::with_capacity(n);
            for (b, w) in biases {
                v.extend(b.unwrap_or_else(|| vec![0.0; w]));
            }
            Some(v)
        } else {
            None
        };
        Ok(Proj {
            parts: vec![self.linear_from(cat, bias)?],
        })
    }

    /// An optional norm weight.
    fn norm_opt(&mut self, name: &str) -> Result<Option<Norm>> {
        if self.has(name) {
            Ok(Some(self.norm(name)?))
        } else {
            Ok(None)
        }
    }

    /// The `e`-th expert's matrix of a 3-D expert tensor `(experts, rows, cols)`: its
    /// rows are whole blocks, so it is a contiguous slice of the raw data.
    fn expert_slices(&mut self, name: &str, experts: usize) -> Result<Vec<QTensor>> {
        let t = self.qtensor(name)?;
        let (n_e, rows, cols) = t.shape().dims3()?;
        if n_e != experts {
            candle_core::bail!("{name} holds {n_e} experts, expected {experts}");
        }
        let raw = t.data()?;
        let per = raw.len() / experts;
        (0..experts)
            .map(|e| {
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    t.dtype(),
                    &raw[e * per..(e + 1) * per],
                    vec![rows, cols],
                    self.device,
                )
            })
            .collect()
    }

    /// A layer's mixture of experts: the router and every expert's gate|up and down.
    fn moe(&mut self, p: &str, moe: &super::Moe) -> Result<MoeMlp> {
        let router = self.proj(&[format!("{p}.ffn_gate_inp")])?;
        if router.width() != moe.experts {
            candle_core::bail!(
                "{p}.ffn_gate_inp has {} outputs, expected {}",
                router.width(),
                moe.experts
            );
        }
        let n = moe.experts;
        let gates = self.expert_slices(&format!("{p}.ffn_gate_exps.weight"), n)?;
        let ups = self.expert_slices(&format!("{p}.ffn_up_exps.weight"), n)?;
        let downs = self.expert_slices(&format!("{p}.ffn_down_exps.weight"), n)?;
        let mut experts = Vec::with_capacity(n);
        for ((g, u), d) in gates.into_iter().zip(ups).zip(downs) {
            let (fg, fu) = (g.shape().dims2()?.0, u.shape().dims2()?.0);
            let fd = d.shape().dims2()?.0;
            experts.push(Expert {
                gate_up: self.combine(vec![g, u], vec![(None, fg), (None, fu)])?,
                down: self.combine(vec![d], vec![(None, fd)])?,
            });
        }
        Ok(MoeMlp { router, experts })
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
        let table = embed_q.dequantize(device)?.to_dtype(DType::F32)?;
        let embed = if device.is_cpu() {
            Embed::Host(table.flatten_all()?.to_vec1()?)
        } else {
            Embed::Dev(table)
        };
        let output = if ld.has("output.weight") {
            Weight::new(ld.qtensor("output.weight")?, dequantize)?
        } else {
            // Tied embeddings: the quantized table doubles as the output projection.
            Weight::new(embed_q, dequantize)?
        };
        let norm = ld.norm("output_norm.weight")?;
        // llama3 rope scaling: per-pair frequency factors.
        let freq_factors = if ld.has("rope_freqs.weight") {
            let v: Vec<f32> = ld
                .dense("rope_freqs.weight")?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            Some(v)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("blk.{i}");
            let names =
                |xs: &[&str]| -> Vec<String> { xs.iter().map(|x| format!("{p}.{x}")).collect() };
            let mlp = match &config.moe {
                Some(moe) => Mlp::Moe(ld.moe(&p, moe)?),
                None => Mlp::Dense(Expert {
                    gate_up: ld.proj(&names(&["ffn_gate", "ffn_up"]))?,
                    down: ld.proj(&names(&["ffn_down"]))?,
                }),
            };
            let qk = matches!(
                config.family,
                Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3
            );
            let need = |ld: &mut Loader<'_, R>, name: String| -> Result<Option<Norm>> {
                if qk {
                    Ok(Some(ld.norm(&name)?))
                } else {
                    ld.norm_opt(&name)
                }
            };
            let gemma = config.family == Family::Gemma3;
            let post = |ld: &mut Loader<'_, R>, name: String| -> Result<Option<Norm>> {
                if gemma {
                    Ok(Some(ld.norm(&name)?))
                } else {
                    Ok(None)
                }
            };
            let layer = Layer {
                attn_norm: ld.norm(&format!("{p}.attn_norm.weight"))?,
                qkv: ld.proj(&names(&["attn_q", "attn_k", "attn_v"]))?,
                q_norm: need(&mut ld, format!("{p}.attn_q_norm.weight"))?,
                k_norm: need(&mut ld, format!("{p}.attn_k_norm.weight"))?,
                wo: ld.proj(&names(&["attn_output"]))?,
                post_attn_norm: post(&mut ld, format!("{p}.post_attention_norm.weight"))?,
                ffn_norm: ld.norm(&format!("{p}.ffn_norm.weight"))?,
                mlp,
                post_ffn_norm: post(&mut ld, format!("{p}.post_ffw_norm.weight"))?,
            };
            let want = config.head_dim * (config.n_heads + 2 * config.n_kv_heads);
            if layer.qkv.width() != want {
                candle_core::bail!("{p}: Q|K|V is {} wide, expected {want}", layer.qkv.width());
            }
            for n in [&layer.q_norm, &layer.k_norm].into_iter().flatten() {
                if n.v.len() != config.head_dim {
                    candle_core::bail!(
                        "{p}: QK-norm of {} values, expected head_dim {}",
                        n.v.len(),
                        config.head_dim
                    );
                }
            }
            let dense = match &layer.mlp {
                Mlp::Dense(e) => vec![e],
                Mlp::Moe(m) => m.experts.iter().collect(),
            };
            if dense.iter().any(|e| !e.gate_up.width().is_multiple_of(2)) {
                candle_core::bail!("{p}: gate and up differ in width");
            }
            layers.push(layer);
        }
        let model = Self::assemble(
            config,
            embed,
            layers,
            norm,
            output,
            device,
            ctx_size,
            ld.bytes,
            freq_factors,
        )?;
        #[cfg(feature = "cuda")]
        let model = model.attach_fused(ct, ld.reader, dequantize);
        Ok(model)
    }

    /// Our fused CUDA decode path for a GGUF model on a CUDA device, when its weight
    /// types allow it (otherwise, or on failure, the tensor path serves).
    #[cfg(feature = "cuda")]
    fn attach_fused<R: Read + Seek>(
        mut self,
        ct: &gguf_file::Content,
        reader: &mut R,
        dequantize: bool,
    ) -> Self {
        // The fused kernels implement the llama and qwen2 blocks only.
        let plain = matches!(self.config.family, Family::Llama | Family::Qwen2);
        self.fused = match (&self.embed, dequantize) {
            (Embed::Dev(table), false) if self.device.is_cuda() && plain => {
                match cuda::FusedDecoder::new(
                    ct,
                    reader,
                    &self.config,
                    &self.device,
                    table,
                    &self.cos[0],
                    &self.sin[0],
                    self.ctx_size,
                ) {
                    Ok(d) => {
                        tracing::info!(fused = d.is_some(), "fused cuda decode path");
                        d
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fused cuda decode unavailable");
                        None
                    }
                }
            }
            _ => None,
        };
        self
    }
}

//! Hugging Face model directories: `config.json` plus `model.safetensors` (or shards
//! listed in `model.safetensors.index.json`) for the llama, mistral and qwen2
//! architectures, in f32, f16 or bf16.
//!
//! Hugging Face checkpoints keep Q and K in the layout that rotates halves (NEOX
//! pairs `i`, `i + d/2`); GGUF conversion permutes those rows for interleaved pairs.
//! So a directory is loaded as it is, with the NEOX rotary style, instead of permuting
//! weights. Dense weights are widened to f32 and run through candle's matmul (the
//! quantized kernels of the CPU path do not apply to them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use serde_json::Value;

use super::{Embed, Expert, Family, Layer, Linear, Mlp, Model, ModelConfig, Norm, Proj, Weight};

/// Architectures a directory may declare (`architectures[0]`), with our arch name.
const ARCHITECTURES: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
];

fn err(dir: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("{}: {msg}", dir.display()))
}

/// Read and parse one JSON file of the directory; None when it does not exist.
pub(crate) fn read_json(dir: &Path, name: &str) -> Result<Option<Value>> {
    let p = dir.join(name);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| err(dir, format!("{name}: {e}")))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(dir, format!("{name} is not valid JSON: {e}")))
}

/// An id or a list of ids (`eos_token_id` may be either).
pub(crate) fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Hyper-parameters from a `config.json` (already parsed); `dir` names it in errors.
    pub fn from_hf_json(c: &Value, dir: &Path) -> Result<Self> {
        let declared = c["architectures"]
            .get(0)
            .and_then(Value::as_str)
            .or_else(|| c["model_type"].as_str())
            .ok_or_else(|| err(dir, "config.json names no `architectures` or `model_type`"))?;
        let arch = ARCHITECTURES
            .iter()
            .find(|(hf, ours)| *hf == declared || *ours == declared)
            .map(|(_, ours)| ours.to_string())
            .ok_or_else(|| {
                err(
                    dir,
                    format!(
                        "unsupported architecture `{declared}` (supported: {})",
                        ARCHITECTURES
                            .iter()
                            .map(|a| a.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let num = |k: &str| -> Result<usize> {
            c[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| err(dir, format!("config.json: `{k}` missing or not a number")))
        };
        let opt = |k: &str| c[k].as_u64().map(|x| x as usize);
        if let Some(act) = c["hidden_act"].as_str() {
            if act != "silu" {
                return Err(err(
                    dir,
                    format!("hidden_act `{act}` is not supported (silu)"),
                ));
            }
        }
        if !c["rope_scaling"].is_null() {
            let kind = c["rope_scaling"]["rope_type"]
                .as_str()
                .or_else(|| c["rope_scaling"]["type"].as_str())
                .unwrap_or("?");
            if kind != "default" {
                return Err(err(
                    dir,
                    format!("rope_scaling of type `{kind}` is not supported (only none)"),
                ));
            }
        }
        let hidden = num("hidden_size")?;
        let n_heads = num("num_attention_heads")?;
        if n_heads == 0 {
            return Err(err(dir, "num_attention_heads is 0"));
        }
        let n_kv_heads = opt("num_key_value_heads").unwrap_or(n_heads);
        let head_dim = opt("head_dim").unwrap_or(hidden / n_heads);
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 || head_dim % 2 != 0 {
            return Err(err(
                dir,
                format!("unusable head layout: {n_heads} heads, {n_kv_heads} KV heads, head_dim {head_dim}"),
            ));
        }
        let sliding = c["sliding_window"]
            .as_u64()
            .filter(|_| arch != "qwen2" || c["use_sliding_window"].as_bool().unwrap_or(false));
        if let Some(w) = sliding {
            tracing::warn!(
                window = w,
                "sliding-window attention is not implemented: attention spans the whole context"
            );
        }
        let family = if arch == "qwen2" {
            Family::Qwen2
        } else {
            Family::Llama
        };
        let mut cfg = Self::llama_like(
            &arch,
            family,
            num("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden,
            num("vocab_size")?,
        );
        cfg.train_ctx = opt("max_position_embeddings").unwrap_or(4096);
        cfg.rms_eps = c["rms_norm_eps"].as_f64().unwrap_or(1e-6);
        cfg.rope_base = c["rope_theta"].as_f64().unwrap_or(10_000.0) as f32;
        // Hugging Face checkpoints keep Q and K in the rotate-half layout.
        cfg.rope_neox = true;
        Ok(cfg)
    }
}

/// The directory's `config.json`, parsed and checked.
pub fn read_config(dir: &Path) -> Result<(ModelConfig, Value)> {
    let c = read_json(dir, "config.json")?
        .ok_or_else(|| err(dir, "no config.json (not a Hugging Face model directory)"))?;
    Ok((ModelConfig::from_hf_json(&c, dir)?, c))
}

/// The safetensors files of a directory: the shards its index names, else
/// `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(index) = read_json(dir, "model.safetensors.index.json")? {
        let map = index["weight_map"].as_object().ok_or_else(|| {
            err(
                dir,
                "model.safetensors.index.json has no `weight_map` object",
            )
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        if files.is_empty() {
            return Err(err(dir, "model.safetensors.index.json lists no files"));
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(err(
                dir,
                format!("shard {} named by the index is missing", missing.display()),
            ));
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(err(
        dir,
        "no weights: neither model.safetensors nor model.safetensors.index.json",
    ))
}

/// Memory-map the weight files (read-only; their headers are checked here).
pub fn open_weights(dir: &Path) -> Result<MmapedSafetensors> {
    let files = weight_files(dir)?;
    // SAFETY: the files are mapped read-only and every tensor is copied out on load;
    // like every mmap, changing a file under a running server is undefined.
    unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
        let names: Vec<_> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        err(dir, format!("cannot read {}: {e}", names.join(", ")))
    })
}

/// Elements of every tensor in the directory's weight files (headers only).
pub fn weight_elements(dir: &Path) -> Result<usize> {
    let st = open_weights(dir)?;
    Ok(st
        .tensors()
        .iter()
        .map(|(_, v)| v.shape().iter().product::<usize>())
        .sum())
}

struct Loader<'a> {
    st: MmapedSafetensors,
    dir: &'a Path,
    device: &'a Device,
    bytes: usize,
}

impl Loader<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// A tensor as f32 on the device, with the expected shape.
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .st
            .load(name, self.device)
            .map_err(|e| err(self.dir, format!("tensor `{name}`: {e}")))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {}
            other => {
                return Err(err(
                    self.dir,
                    format!("tensor `{name}` is {other:?} (supported: f32, f16, bf16)"),
                ))
            }
        }
        if t.dims() != shape {
            return Err(err(
                self.dir,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        self.bytes += t.elem_count() * 4;
        t.to_dtype(DType::F32)
    }

    fn norm(&mut self, name: &str, n: usize) -> Result<Norm> {
        let t = self.f32(name, &[n])?;
        let v = t.to_vec1()?;
        Ok(Norm { t, v })
    }

    /// The projections `names` (each `(out, in)`, reading the same input of width `k`)
    /// as one matrix, their biases (where present) concatenated alike.
    fn proj(&mut self, names: &[(String, usize)], k: usize) -> Result<Proj> {
        let mut ws = Vec::new();
        let mut bias = Vec::new();
        let mut any_bias = false;
        for (name, n) in names {
            ws.push(self.f32(&format!("{name}.weight"), &[*n, k])?);
            let b = format!("{name}.bias");
            if self.has(&b) {
                any_bias = true;
                bias.extend(self.f32(&b, &[*n])?.to_vec1::<f32>()?);
            } else {
                bias.extend(std::iter::repeat_n(0f32, *n));
            }
        }
        let n: usize = names.iter().map(|x| x.1).sum();
        let w = if ws.len() == 1 {
            ws.swap_remove(0)
        } else {
            Tensor::cat(&ws, 0)?
        };
        let b = if any_bias {
            Some((Tensor::from_slice(&bias, n, self.device)?, bias))
        } else {
            None
        };
        Ok(Proj {
            parts: vec![Linear {
                w: Weight::Candle(QMatMul::Tensor(w)),
                b,
                n,
            }],
        })
    }
}

impl Model {
    /// Load a Hugging Face model directory (see the module doc). `ctx_size` bounds
    /// positions; 0 means the model's `max_position_embeddings`.
    pub fn from_hf_dir(dir: &Path, device: &Device, ctx_size: usize) -> Result<Self> {
        let (config, raw) = read_config(dir)?;
        let ctx_size = if ctx_size == 0 {
            config.train_ctx
        } else {
            ctx_size
        };
        let mut ld = Loader {
            st: open_weights(dir)?,
            dir,
            device,
            bytes: 0,
        };
        let (h, hd) = (config.hidden, config.head_dim);
        let table = ld.f32("model.embed_tokens.weight", &[config.vocab, h])?;
        let tied = raw["tie_word_embeddings"].as_bool().unwrap_or(false);
        let output = if !tied && ld.has("lm_head.weight") {
            ld.f32("lm_head.weight", &[config.vocab, h])?
        } else {
            if !tied {
                tracing::warn!("no lm_head.weight: using the embedding table as the output");
            }
            table.clone()
        };
        let embed = if device.is_cpu() {
            Embed::Host(table.flatten_all()?.to_vec1()?)
        } else {
            Embed::Dev(table)
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("model.layers.{i}");
            let a = |x: &str, n: usize| (format!("{p}.self_attn.{x}"), n);
            let m = |x: &str, n: usize| (format!("{p}.mlp.{x}"), n);
            let (nq, nkv) = (config.n_heads * hd, config.n_kv_heads * hd);
            let ffn = ld
                .st
                .get(&format!("{p}.mlp.gate_proj.weight"))
                .map_err(|e| err(dir, format!("{p}.mlp.gate_proj.weight: {e}")))?
                .shape()
                .first()
                .copied()
                .unwrap_or(0);
            layers.push(Layer {
                attn_norm: ld.norm(&format!("{p}.input_layernorm.weight"), h)?,
                qkv: ld.proj(&[a("q_proj", nq), a("k_proj", nkv), a("v_proj", nkv)], h)?,
                q_norm: None,
                k_norm: None,
                wo: ld.proj(&[a("o_proj", h)], nq)?,
                post_attn_norm: None,
                ffn_norm: ld.norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp: Mlp::Dense(Expert {
                    gate_up: ld.proj(&[m("gate_proj", ffn), m("up_proj", ffn)], h)?,
                    down: ld.proj(&[m("down_proj", h)], ffn)?,
                }),
                post_ffn_norm: None,
            });
        }
        let norm = ld.norm("model.norm.weight", h)?;
        let bytes = ld.bytes;
        Self::assemble(
            config,
            embed,
            layers,
            norm,
            Weight::Candle(QMatMul::Tensor(output)),
            device,
            ctx_size,
            bytes,
            None,
        )
    }
}

#[cfg(test)]
mod tests;

//! Hugging Face model directories: `config.json` plus `model.safetensors` (or shards
//! listed in `model.safetensors.index.json`) for the llama, mistral, qwen2, qwen3,
//! qwen3moe and gemma3 architectures (Gemma 3's multimodal checkpoints too: their text
//! model), in f32, f16 or bf16. `config.json` is read into the same [`ModelConfig`] a
//! GGUF of the family gives; where the checkpoint differs from GGUF conversion it is
//! undone here: Gemma's norms are stored as `w` and applied as `1 + w`, llama3's rotary
//! frequency factors are computed from `rope_scaling` rather than stored.
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

use super::{
    Act, Embed, Expert, Family, Layer, Linear, Mlp, Model, ModelConfig, Moe, MoeMlp, Norm, Proj,
    RopeScaling, SlidingWindow, Weight,
};

/// Architectures a directory may declare (`architectures[0]`), with the `model_type`
/// that may stand in for it and our arch name.
const ARCHITECTURES: &[(&str, &str, &str)] = &[
    ("LlamaForCausalLM", "llama", "llama"),
    ("MistralForCausalLM", "mistral", "mistral"),
    ("Qwen2ForCausalLM", "qwen2", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3", "qwen3"),
    ("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3moe"),
    ("Gemma3ForCausalLM", "gemma3_text", "gemma3"),
    // Multimodal Gemma 3: the text model of `text_config` is served, the vision tower
    // is left unread.
    ("Gemma3ForConditionalGeneration", "gemma3", "gemma3"),
];

/// `rope_scaling` types a directory may declare.
const ROPE_TYPES: &str = "default, linear, llama3, yarn";

/// What Gemma 3's text configuration leaves out of `config.json` when it equals the
/// default (transformers' `Gemma3TextConfig`); multimodal checkpoints' `text_config`
/// often lists only the few keys that differ.
const GEMMA3_DEFAULTS: &[(&str, f64)] = &[
    ("vocab_size", 262_208.0),
    ("hidden_size", 2304.0),
    ("intermediate_size", 9216.0),
    ("num_hidden_layers", 26.0),
    ("num_attention_heads", 8.0),
    ("num_key_value_heads", 4.0),
    ("head_dim", 256.0),
    ("max_position_embeddings", 131_072.0),
    ("rms_norm_eps", 1e-6),
    ("rope_theta", 1_000_000.0),
    ("rope_local_base_freq", 10_000.0),
    ("query_pre_attn_scalar", 256.0),
    ("sliding_window", 4096.0),
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

/// The declared architecture's table entry: `(HF name, model_type, our arch)`.
fn architecture(
    c: &Value,
    dir: &Path,
) -> Result<&'static (&'static str, &'static str, &'static str)> {
    let declared = c["architectures"]
        .get(0)
        .and_then(Value::as_str)
        .or_else(|| c["model_type"].as_str())
        .ok_or_else(|| err(dir, "config.json names no `architectures` or `model_type`"))?;
    ARCHITECTURES
        .iter()
        .find(|(hf, mt, _)| *hf == declared || *mt == declared)
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
        })
}

/// The text model's configuration: `text_config` for a multimodal wrapper, with
/// Gemma 3's defaults filled in where the file leaves keys out.
pub(crate) fn text_config(c: &Value, dir: &Path) -> Result<Value> {
    let (hf, _, arch) = architecture(c, dir)?;
    let mut t = if *hf == "Gemma3ForConditionalGeneration" {
        let t = c["text_config"].clone();
        if !t.is_object() {
            return Err(err(
                dir,
                "config.json: `text_config` missing (Gemma3ForConditionalGeneration)",
            ));
        }
        t
    } else {
        c.clone()
    };
    if *arch == "gemma3" {
        if let Some(o) = t.as_object_mut() {
            for (k, v) in GEMMA3_DEFAULTS {
                if !o.contains_key(*k) {
                    // Whole numbers as integers: counts are read with `as_u64`.
                    let v = if v.fract() == 0.0 {
                        Value::from(*v as u64)
                    } else {
                        Value::from(*v)
                    };
                    o.insert(k.to_string(), v);
                }
            }
            o.entry("hidden_activation")
                .or_insert_with(|| Value::from("gelu_pytorch_tanh"));
            o.entry("tie_word_embeddings").or_insert(Value::Bool(true));
        }
    }
    Ok(t)
}

/// The rotary parameters of the global layers: `rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5; for gemma3 its `full_attention` part), Null when
/// none.
fn rope_params(c: &Value) -> &Value {
    let p = if c["rope_parameters"].is_object() {
        &c["rope_parameters"]
    } else {
        &c["rope_scaling"]
    };
    if p["full_attention"].is_object() {
        &p["full_attention"]
    } else {
        p
    }
}

/// Rotary scaling from `config.json`, and llama3's per-pair frequency divisors (which
/// Hugging Face computes from the config, where GGUF stores them as `rope_freqs`).
pub(crate) fn rope_scaling(
    c: &Value,
    dir: &Path,
    head_dim: usize,
    base: f32,
    train_ctx: usize,
) -> Result<(RopeScaling, Option<Vec<f32>>)> {
    let p = rope_params(c);
    let mut s = RopeScaling {
        n_ctx_orig: train_ctx,
        ..RopeScaling::default()
    };
    let kind = p["rope_type"]
        .as_str()
        .or_else(|| p["type"].as_str())
        .unwrap_or("default");
    let f = |k: &str| p[k].as_f64();
    let factor = || -> Result<f64> {
        f("factor").filter(|&x| x > 0.0).ok_or_else(|| {
            err(
                dir,
                format!("rope_scaling `{kind}` needs a positive `factor`"),
            )
        })
    };
    if let Some(pr) = c["partial_rotary_factor"]
        .as_f64()
        .or_else(|| f("partial_rotary_factor"))
    {
        if pr != 1.0 {
            return Err(err(
                dir,
                format!("partial_rotary_factor {pr} is not supported (only 1)"),
            ));
        }
    }
    match kind {
        "default" => Ok((s, None)),
        "linear" => {
            s.freq_scale = 1.0 / factor()? as f32;
            Ok((s, None))
        }
        "llama3" => {
            let factor = factor()?;
            let low = f("low_freq_factor").unwrap_or(1.0);
            let high = f("high_freq_factor").unwrap_or(4.0);
            let orig = f("original_max_position_embeddings").unwrap_or(8192.0);
            if high <= low {
                return Err(err(
                    dir,
                    format!("rope_scaling llama3: high_freq_factor {high} must exceed low_freq_factor {low}"),
                ));
            }
            Ok((
                s,
                Some(llama3_factors(
                    base as f64,
                    head_dim,
                    factor,
                    low,
                    high,
                    orig,
                )),
            ))
        }
        "yarn" => {
            let factor = factor()? as f32;
            if p["truncate"].as_bool() == Some(false) {
                return Err(err(
                    dir,
                    "rope_scaling yarn with `truncate: false` is not supported",
                ));
            }
            s.freq_scale = 1.0 / factor;
            s.ext_factor = 1.0;
            // Hugging Face's attention factor (0.1 ln(factor) + 1 unless the config
            // gives it, or mscale / mscale_all_dim) is the total magnitude scale;
            // `rope::tables` multiplies in 1 + 0.1 ln(factor) itself.
            let mscale = |m: f32| super::rope::yarn_mscale(factor, m);
            let total = match (f("attention_factor"), f("mscale"), f("mscale_all_dim")) {
                (Some(a), _, _) => a as f32,
                (None, Some(m), Some(all)) if m > 0.0 && all > 0.0 => {
                    mscale(m as f32) / mscale(all as f32)
                }
                _ => mscale(1.0),
            };
            s.attn_factor = super::rope::yarn_attn_factor(factor, total);
            if let Some(b) = f("beta_fast") {
                s.beta_fast = b as f32;
            }
            if let Some(b) = f("beta_slow") {
                s.beta_slow = b as f32;
            }
            if let Some(o) = f("original_max_position_embeddings") {
                s.n_ctx_orig = o as usize;
            }
            Ok((s, None))
        }
        other => Err(err(
            dir,
            format!("rope_scaling of type `{other}` is not supported (supported: {ROPE_TYPES})"),
        )),
    }
}

/// llama3's frequency divisors per rotary pair: 1 for short wavelengths, `factor` for
/// long ones, a smooth blend between (as transformers' `_compute_llama3_parameters`).
fn llama3_factors(base: f64, dim: usize, factor: f64, low: f64, high: f64, orig: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (orig / low, orig / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

impl ModelConfig {
    /// Hyper-parameters from a `config.json` (already parsed); `dir` names it in errors.
    pub fn from_hf_json(c: &Value, dir: &Path) -> Result<Self> {
        let (_, _, arch) = architecture(c, dir)?;
        let arch = *arch;
        let c = &text_config(c, dir)?;
        let num = |k: &str| -> Result<usize> {
            c[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| err(dir, format!("config.json: `{k}` missing or not a number")))
        };
        let opt = |k: &str| c[k].as_u64().map(|x| x as usize);
        let family = match arch {
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "qwen3moe" => Family::Qwen3Moe,
            "gemma3" => Family::Gemma3,
            _ => Family::Llama,
        };
        let gemma = family == Family::Gemma3;
        let act_key = if gemma && c["hidden_activation"].is_string() {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let act = match (c[act_key].as_str(), gemma) {
            (None | Some("silu"), false) => Act::Silu,
            (Some("gelu_pytorch_tanh" | "gelu_tanh"), true) => Act::GeluTanh,
            (Some(other), _) => {
                let want = if gemma { "gelu_pytorch_tanh" } else { "silu" };
                return Err(err(
                    dir,
                    format!("{act_key} `{other}` is not supported ({want})"),
                ));
            }
            (None, true) => Act::GeluTanh,
        };
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
        let n_layers = num("num_hidden_layers")?;
        let mut cfg = Self::llama_like(
            arch,
            family,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            hidden,
            num("vocab_size")?,
        );
        cfg.act = act;
        cfg.train_ctx = opt("max_position_embeddings").unwrap_or(4096);
        cfg.rms_eps = c["rms_norm_eps"].as_f64().unwrap_or(1e-6);
        cfg.rope_base = rope_params(c)["rope_theta"]
            .as_f64()
            .or_else(|| c["rope_theta"].as_f64())
            .unwrap_or(10_000.0) as f32;
        cfg.rope_scaling = rope_scaling(c, dir, head_dim, cfg.rope_base, cfg.train_ctx)?.0;
        // Hugging Face checkpoints keep Q and K in the rotate-half layout.
        cfg.rope_neox = true;
        if gemma {
            gemma3_config(&mut cfg, c, dir)?;
        } else if let Some(w) = c["sliding_window"].as_u64().filter(|_| {
            !matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe)
                || c["use_sliding_window"].as_bool().unwrap_or(false)
        }) {
            tracing::warn!(
                window = w,
                "sliding-window attention is not implemented: attention spans the whole context"
            );
        }
        if family == Family::Qwen3Moe {
            cfg.moe = Some(qwen3moe_config(c, dir, &num)?);
        }
        Ok(cfg)
    }
}

/// Gemma 3's particulars: GeGLU, Q scaled by `query_pre_attn_scalar^-1/2` after RoPE,
/// the embedding scaled by sqrt(hidden), local layers with their own rotary base,
/// optional final soft-capping. Attention soft-capping (Gemma 2) is refused.
fn gemma3_config(cfg: &mut ModelConfig, c: &Value, dir: &Path) -> Result<()> {
    if let Some(v) = c["attn_logit_softcapping"].as_f64() {
        return Err(err(
            dir,
            format!("attn_logit_softcapping {v} is not supported (only null)"),
        ));
    }
    let q = c["query_pre_attn_scalar"]
        .as_f64()
        .filter(|&q| q > 0.0)
        .ok_or_else(|| {
            err(
                dir,
                "config.json: `query_pre_attn_scalar` missing or not positive",
            )
        })?;
    cfg.attn_scale = 1.0 / (q as f32).sqrt();
    cfg.q_prescale = true;
    cfg.embed_scale = Some((cfg.hidden as f32).sqrt());
    cfg.final_softcap = c["final_logit_softcapping"]
        .as_f64()
        .map(|v| v as f32)
        .filter(|&v| v > 0.0);
    let Some(window) = c["sliding_window"].as_u64().filter(|&w| w > 0) else {
        return Ok(());
    };
    let n = cfg.n_layers;
    let local: Vec<bool> = if let Some(types) = c["layer_types"].as_array() {
        if types.len() != n {
            return Err(err(
                dir,
                format!(
                    "config.json: `layer_types` lists {} layers, expected {n}",
                    types.len()
                ),
            ));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(err(
                    dir,
                    format!("config.json: layer type {t} is not supported (sliding_attention, full_attention)"),
                )),
            })
            .collect::<Result<_>>()?
    } else {
        // Every `sliding_window_pattern`-th layer is global.
        let pattern = c["sliding_window_pattern"].as_u64().unwrap_or(6).max(1) as usize;
        (0..n).map(|l| (l + 1) % pattern != 0).collect()
    };
    let sliding = &c["rope_parameters"]["sliding_attention"];
    let local_base = sliding["rope_theta"]
        .as_f64()
        .or_else(|| c["rope_local_base_freq"].as_f64())
        .unwrap_or(10_000.0);
    if let Some(kind) = sliding["rope_type"].as_str().filter(|k| *k != "default") {
        return Err(err(
            dir,
            format!("rope of type `{kind}` on the sliding-window layers is not supported (only default)"),
        ));
    }
    cfg.sliding = Some(SlidingWindow {
        window: window as usize,
        local,
        rope_base: local_base as f32,
    });
    Ok(())
}

/// Qwen3-MoE's router: `num_experts_per_tok` of `num_experts`, each expert
/// `moe_intermediate_size` wide, picks renormalized when `norm_topk_prob`. Every layer
/// must be sparse: dense layers in between (`decoder_sparse_step` > 1, `mlp_only_layers`)
/// are refused.
fn qwen3moe_config(c: &Value, dir: &Path, num: &dyn Fn(&str) -> Result<usize>) -> Result<Moe> {
    let step = c["decoder_sparse_step"].as_u64().unwrap_or(1);
    if step != 1 {
        return Err(err(
            dir,
            format!("decoder_sparse_step {step} is not supported (only 1: every layer sparse)"),
        ));
    }
    if c["mlp_only_layers"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        return Err(err(
            dir,
            format!(
                "mlp_only_layers {} is not supported (only []: every layer sparse)",
                c["mlp_only_layers"]
            ),
        ));
    }
    if c["shared_expert_intermediate_size"]
        .as_u64()
        .is_some_and(|s| s > 0)
    {
        return Err(err(dir, "shared experts are not supported"));
    }
    let experts = num("num_experts")?;
    let used = num("num_experts_per_tok")?;
    if used == 0 || used > experts {
        return Err(err(
            dir,
            format!("num_experts_per_tok {used} of {experts} experts"),
        ));
    }
    Ok(Moe {
        experts,
        used,
        ffn: num("moe_intermediate_size")?,
        norm_topk: c["norm_topk_prob"].as_bool().unwrap_or(false),
    })
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

/// Where the text model's tensors are: `model.` for a causal LM; for Gemma 3's
/// multimodal checkpoints `language_model.model.` (transformers 4) or
/// `model.language_model.` (transformers 5). Returns the layer prefix and the name of
/// the untied output matrix.
fn text_prefix(st: &MmapedSafetensors) -> (&'static str, &'static str) {
    const LAYOUTS: &[(&str, &str)] = &[
        ("model.", "lm_head.weight"),
        ("language_model.model.", "language_model.lm_head.weight"),
        ("model.language_model.", "lm_head.weight"),
    ];
    LAYOUTS
        .iter()
        .find(|(p, _)| st.get(&format!("{p}embed_tokens.weight")).is_ok())
        .copied()
        .unwrap_or(LAYOUTS[0])
}

/// Elements of the text model's tensors in the directory's weight files (headers only;
/// a multimodal checkpoint's vision tower is not counted: it is never loaded).
pub fn weight_elements(dir: &Path) -> Result<usize> {
    let st = open_weights(dir)?;
    let (prefix, head) = text_prefix(&st);
    Ok(st
        .tensors()
        .iter()
        .filter(|(n, _)| n.starts_with(prefix) || n == head)
        .map(|(_, v)| v.shape().iter().product::<usize>())
        .sum())
}

struct Loader<'a> {
    st: MmapedSafetensors,
    dir: &'a Path,
    device: &'a Device,
    bytes: usize,
    /// Our arch name, for errors.
    arch: String,
    /// Added to every RMSNorm weight (1 for Gemma, whose norms scale by `1 + w`).
    norm_shift: f32,
}

impl Loader<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// A tensor as f32 on the device, with the expected shape.
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.has(name) {
            return Err(err(
                self.dir,
                format!(
                    "missing tensor `{name}` (the {} architecture needs it)",
                    self.arch
                ),
            ));
        }
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
        let mut t = self.f32(name, &[n])?;
        if self.norm_shift != 0.0 {
            t = t.affine(1.0, self.norm_shift as f64)?;
        }
        let v = t.to_vec1()?;
        Ok(Norm { t, v })
    }

    /// Matrices without biases that read the same input, as one [`Proj`].
    fn stack(&self, ws: Vec<Tensor>) -> Result<Proj> {
        let n = ws.iter().map(|w| w.dim(0)).sum::<Result<usize>>()?;
        let w = Tensor::cat(&ws, 0)?;
        Ok(Proj {
            parts: vec![Linear {
                w: Weight::Candle(QMatMul::Tensor(w)),
                b: None,
                n,
            }],
        })
    }

    /// The gated MLP under `p` (`{p}.gate_proj`, `up_proj`, `down_proj`); `ffn` its
    /// width when known, else read from `gate_proj`'s shape.
    fn expert(&mut self, p: &str, ffn: Option<usize>, h: usize) -> Result<Expert> {
        let gate = format!("{p}.gate_proj.weight");
        let ffn = match ffn {
            Some(f) => f,
            None => self
                .st
                .get(&gate)
                .map_err(|_| {
                    err(
                        self.dir,
                        format!(
                            "missing tensor `{gate}` (the {} architecture needs it)",
                            self.arch
                        ),
                    )
                })?
                .shape()
                .first()
                .copied()
                .unwrap_or(0),
        };
        let m = |x: &str, n: usize| (format!("{p}.{x}"), n);
        Ok(Expert {
            gate_up: self.proj(&[m("gate_proj", ffn), m("up_proj", ffn)], h)?,
            down: self.proj(&[m("down_proj", h)], ffn)?,
        })
    }

    /// A layer's mixture of experts: the router `{p}.mlp.gate` and every expert, as
    /// `mlp.experts.{e}.{gate,up,down}_proj` (transformers 4) or as the stacked
    /// `mlp.experts.gate_up_proj` `(experts, 2 ffn, hidden)` and `down_proj`
    /// `(experts, hidden, ffn)` (transformers 5).
    fn moe(&mut self, p: &str, moe: &Moe, h: usize) -> Result<MoeMlp> {
        let (n, ffn) = (moe.experts, moe.ffn);
        let router = self.proj(&[(format!("{p}.mlp.gate"), n)], h)?;
        let fused = format!("{p}.mlp.experts.gate_up_proj");
        let experts = if self.has(&fused) {
            let gu = self.f32(&fused, &[n, 2 * ffn, h])?;
            let down = self.f32(&format!("{p}.mlp.experts.down_proj"), &[n, h, ffn])?;
            (0..n)
                .map(|e| {
                    Ok(Expert {
                        gate_up: self.stack(vec![gu.get(e)?])?,
                        down: self.stack(vec![down.get(e)?])?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            (0..n)
                .map(|e| self.expert(&format!("{p}.mlp.experts.{e}"), Some(ffn), h))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(MoeMlp { router, experts })
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
        let text = text_config(&raw, dir)?;
        let (_, freq_factors) = rope_scaling(
            &text,
            dir,
            config.head_dim,
            config.rope_base,
            config.train_ctx,
        )?;
        let ctx_size = if ctx_size == 0 {
            config.train_ctx
        } else {
            ctx_size
        };
        let st = open_weights(dir)?;
        let (prefix, head) = text_prefix(&st);
        let gemma = config.family == Family::Gemma3;
        let mut ld = Loader {
            st,
            dir,
            device,
            bytes: 0,
            arch: config.arch.clone(),
            // Gemma's RMSNorm multiplies by `1 + w`; the checkpoint holds `w`.
            norm_shift: if gemma { 1.0 } else { 0.0 },
        };
        let (h, hd) = (config.hidden, config.head_dim);
        let table = ld.f32(&format!("{prefix}embed_tokens.weight"), &[config.vocab, h])?;
        let tied = text["tie_word_embeddings"].as_bool().unwrap_or(false);
        let output = if !tied && ld.has(head) {
            ld.f32(head, &[config.vocab, h])?
        } else {
            if !tied {
                tracing::warn!("no {head}: using the embedding table as the output");
            }
            table.clone()
        };
        let embed = if device.is_cpu() {
            Embed::Host(table.flatten_all()?.to_vec1()?)
        } else {
            Embed::Dev(table)
        };
        let qk_norm = matches!(
            config.family,
            Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3
        );
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("{prefix}layers.{i}");
            let a = |x: &str, n: usize| (format!("{p}.self_attn.{x}"), n);
            let (nq, nkv) = (config.n_heads * hd, config.n_kv_heads * hd);
            let mlp = match &config.moe {
                Some(moe) => Mlp::Moe(ld.moe(&p, moe, h)?),
                None => Mlp::Dense(ld.expert(&format!("{p}.mlp"), None, h)?),
            };
            let norm =
                |ld: &mut Loader<'_>, x: &str, n: usize| ld.norm(&format!("{p}.{x}.weight"), n);
            let (q_norm, k_norm) = if qk_norm {
                (
                    Some(norm(&mut ld, "self_attn.q_norm", hd)?),
                    Some(norm(&mut ld, "self_attn.k_norm", hd)?),
                )
            } else {
                (None, None)
            };
            // Gemma 3 names its four norms apart; the others have two, the second
            // (`post_attention_layernorm`) being the one before the MLP.
            let (post_attn_norm, ffn_norm, post_ffn_norm) = if gemma {
                (
                    Some(norm(&mut ld, "post_attention_layernorm", h)?),
                    norm(&mut ld, "pre_feedforward_layernorm", h)?,
                    Some(norm(&mut ld, "post_feedforward_layernorm", h)?),
                )
            } else {
                (None, norm(&mut ld, "post_attention_layernorm", h)?, None)
            };
            layers.push(Layer {
                attn_norm: norm(&mut ld, "input_layernorm", h)?,
                qkv: ld.proj(&[a("q_proj", nq), a("k_proj", nkv), a("v_proj", nkv)], h)?,
                q_norm,
                k_norm,
                wo: ld.proj(&[a("o_proj", h)], nq)?,
                post_attn_norm,
                ffn_norm,
                mlp,
                post_ffn_norm,
            });
        }
        let norm = ld.norm(&format!("{prefix}norm.weight"), h)?;
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
            freq_factors,
        )
    }
}

#[cfg(test)]
mod tests;

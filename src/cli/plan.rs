//! `candela plan`: what a model and a KV budget mean for a machine, before buying or
//! sizing one — weights size, KV bytes per token, how many tokens and sessions fit.

use std::fmt::Write;
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::engine::model::ModelConfig;
use crate::engine::EngineError;
use crate::kv::{CacheLayout, KvDtype, LocalWindow};

/// Figures for one model, one cache element type and one budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub model: String,
    pub arch: String,
    pub weight_bytes: u64,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub train_ctx: usize,
    pub kv_dtype: KvDtype,
    pub bytes_per_token: usize,
    /// Sliding-window layers: how many, their window, and the bytes per token a
    /// session adds once past it (only the global layers grow then).
    pub local: Option<LocalPlan>,
    /// Bytes per token in every cache type this model can use, for comparison.
    pub per_dtype: Vec<(KvDtype, usize)>,
    pub budget: u64,
    pub tokens_fit: u64,
    pub session_tokens: usize,
    /// Bytes one session of `session_tokens` tokens holds.
    pub session_bytes: usize,
    pub sessions_fit: u64,
    pub ram_total: u64,
    pub ram_available: u64,
}

/// The local (sliding-window) layers of a model, for the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPlan {
    pub layers: usize,
    pub window: usize,
    pub global_bytes_per_token: usize,
}

/// `gguf`: a GGUF file or a Hugging Face model directory.
pub fn plan(
    gguf: &Path,
    model_id: &str,
    kv_dtype: KvDtype,
    budget: u64,
    session_tokens: usize,
    ram: (u64, u64),
) -> Result<Plan, EngineError> {
    let (cfg, weight_bytes) = if gguf.is_dir() {
        // A Hugging Face directory: dense weights are held as f32.
        let load = |e: candle_core::Error| EngineError::Load(e.to_string());
        let (cfg, _) = crate::engine::model::hf::read_config(gguf).map_err(load)?;
        let elements = crate::engine::model::hf::weight_elements(gguf).map_err(load)?;
        (cfg, 4 * elements as u64)
    } else {
        let mut f = std::fs::File::open(gguf)
            .map_err(|e| EngineError::Load(format!("{}: {e}", gguf.display())))?;
        let ct = gguf_file::Content::read(&mut f)
            .map_err(|e| EngineError::Load(format!("{}: {e}", gguf.display())))?;
        let bytes: u64 = ct
            .tensor_infos
            .values()
            .map(|t| {
                let n = t.shape.elem_count();
                (n / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
            })
            .sum();
        (ModelConfig::from_gguf(&ct)?, bytes)
    };
    let layout = |dtype| CacheLayout {
        n_layers: cfg.n_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        dtype,
        window: cfg
            .sliding
            .as_ref()
            .and_then(|s| LocalWindow::new(s.window, &s.local)),
    };
    layout(kv_dtype).check().map_err(EngineError::Load)?;
    let bpt = layout(kv_dtype).bytes_per_token();
    let per_dtype = KvDtype::ALL
        .into_iter()
        .filter(|&d| layout(d).check().is_ok())
        .map(|d| (d, layout(d).bytes_per_token()))
        .collect();
    let lay = layout(kv_dtype);
    // Caches are allocated in steps, so a session occupies whole steps; local layers
    // stop growing at their window.
    let session_bytes = lay.bytes_for(session_tokens);
    let tokens_fit = match lay.window {
        None => budget / bpt.max(1) as u64,
        Some(_) => {
            // The longest single session that fits (bytes_for grows with the length).
            let (mut lo, mut hi) = (0u64, 1u64 << 40);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if lay.bytes_for(mid as usize) as u64 <= budget {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            lo
        }
    };
    let local = lay.window.map(|w| LocalPlan {
        layers: lay.n_local(),
        window: w.size,
        global_bytes_per_token: bpt / cfg.n_layers.max(1) * (cfg.n_layers - lay.n_local()),
    });
    Ok(Plan {
        model: model_id.to_string(),
        arch: cfg.arch.clone(),
        weight_bytes,
        n_layers: cfg.n_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        train_ctx: cfg.train_ctx,
        kv_dtype,
        bytes_per_token: bpt,
        local,
        per_dtype,
        budget,
        tokens_fit,
        session_tokens,
        session_bytes,
        sessions_fit: if session_bytes == 0 {
            0
        } else {
            budget / session_bytes as u64
        },
        ram_total: ram.0,
        ram_available: ram.1,
    })
}

fn gib(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

impl Plan {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model            {} ({}, {} layers, {} KV heads x {})",
            self.model, self.arch, self.n_layers, self.n_kv_heads, self.head_dim
        );
        let _ = writeln!(s, "weights          {}", gib(self.weight_bytes as f64));
        let _ = writeln!(
            s,
            "KV per token     {} bytes ({})",
            self.bytes_per_token, self.kv_dtype
        );
        let others: Vec<String> = self
            .per_dtype
            .iter()
            .map(|(d, b)| format!("{d} {b}"))
            .collect();
        let _ = writeln!(s, "  by --kv-dtype: {}", others.join(", "));
        if let Some(l) = &self.local {
            let _ = writeln!(
                s,
                "  {} of {} layers are local ({}-token window): past it a session grows by {} bytes per token",
                l.layers, self.n_layers, l.window, l.global_bytes_per_token
            );
        }
        let _ = writeln!(s, "KV budget        {}", gib(self.budget as f64));
        let _ = writeln!(s, "tokens that fit  {}", self.tokens_fit);
        let _ = writeln!(
            s,
            "sessions of {:>5} tokens that fit: {} ({} each; model context {})",
            self.session_tokens,
            self.sessions_fit,
            gib(self.session_bytes as f64),
            self.train_ctx
        );
        let need = self.weight_bytes + self.budget;
        let _ = writeln!(
            s,
            "RAM              {} total, {} available now",
            gib(self.ram_total as f64),
            gib(self.ram_available as f64)
        );
        let left = self.ram_available as f64 - need as f64;
        let _ = writeln!(
            s,
            "after weights + full KV budget: {} {}",
            gib(left.abs()),
            if left >= 0.0 {
                "left"
            } else {
                "SHORT: the machine would swap; lower --kv-budget"
            }
        );
        s
    }
}

//! `candela plan`: what a model and a KV budget mean for a machine, before buying or
//! sizing one — weights size, KV bytes per token, how many tokens and sessions fit.

use std::fmt::Write;
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::engine::model::ModelConfig;
use crate::engine::EngineError;
use crate::kv::store::tiers::DeviceBudget;
use crate::kv::{CacheLayout, KvDtype, LocalWindow};

/// Figures for one model, one cache element type and one budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub model: String,
    pub arch: String,
    pub weight_bytes: u64,
    /// Device bytes a CUDA server's long-prompt (wide) prefill holds beside the weights
    /// (0 where that path would not run).
    pub gpu_scratch: u64,
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
    let (cfg, weight_bytes, gpu_scratch) = if gguf.is_dir() {
        // A Hugging Face directory: dense weights are held as f32.
        let load = |e: candle_core::Error| EngineError::Load(e.to_string());
        let (cfg, _) = crate::engine::model::hf::read_config(gguf).map_err(load)?;
        let elements = crate::engine::model::hf::weight_elements(gguf).map_err(load)?;
        (cfg, 4 * elements as u64, 0)
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
        let cfg = ModelConfig::from_gguf(&ct)?;
        let scratch = crate::engine::model::wide_scratch_estimate(&ct, &cfg) as u64;
        (cfg, bytes, scratch)
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
        gpu_scratch,
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

/// The GPU memory to plan for: `given` (`--gpu-memory`, bytes with units), else read
/// from the GPU that `device` names (`cuda`, `cuda:N`, or `auto` when one is there).
/// None for a CPU or Metal plan; an error when a CUDA device was named and cannot be
/// read.
pub fn gpu_memory(device: &str, given: Option<&str>) -> Result<Option<GpuMemory>, String> {
    if let Some(g) = given {
        let total =
            crate::config::parse_bytes("gpu_memory", g, 0).map_err(|e| e.to_string())? as u64;
        if total == 0 {
            return Err("gpu_memory must be > 0, got 0".into());
        }
        return Ok(Some(GpuMemory {
            total,
            free: total,
            source: "given",
        }));
    }
    let index = match device {
        "cpu" | "metal" => return Ok(None),
        "auto" | "cuda" => 0,
        d => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => {
                return Err(format!(
                    "unknown device `{d}` (expected auto, cpu, cuda, cuda:N or metal)"
                ))
            }
        },
    };
    match detect_gpu(device, index) {
        Some((free, total)) => Ok(Some(GpuMemory {
            total,
            free,
            source: "detected",
        })),
        None if device == "auto" => Ok(None),
        None => Err(format!(
            "cannot read the memory of GPU {index}: give it with --gpu-memory (e.g. 80GiB)"
        )),
    }
}

/// Free and total bytes of GPU `index`: through CUDA in a `cuda` build, else NVML.
fn detect_gpu(device: &str, index: u32) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    {
        let spec = if device == "auto" { "cuda" } else { device };
        if let Ok(d) = crate::engine::pick_device(spec) {
            if let Some((free, total)) = crate::engine::device_memory(&d) {
                return Some((free as u64, total as u64));
            }
        }
    }
    #[cfg(not(target_os = "macos"))]
    {
        let _ = device;
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let m = nvml.device_by_index(index).ok()?.memory_info().ok()?;
        Some((m.free, m.total))
    }
    #[cfg(target_os = "macos")]
    {
        let _ = (device, index);
        None
    }
}

/// GPU memory for a plan with a device tier: total and free bytes, and where they
/// came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuMemory {
    pub total: u64,
    /// Free before the model is loaded (the total when given by hand).
    pub free: u64,
    /// `given` (`--gpu-memory`) or `detected`.
    pub source: &'static str,
}

/// How a GPU server's session tiers hold sessions of the plan's length.
#[derive(Debug, Clone, PartialEq)]
pub struct TierPlan {
    pub gpu: GpuMemory,
    /// Device bytes of the long-prompt prefill's buffers (the plan's `gpu_scratch`).
    pub scratch: u64,
    /// GPU memory free once the weights are loaded and the prefill's buffers kept aside.
    pub free_after_weights: u64,
    pub device_budget: u64,
    pub host_budget: u64,
    pub disk_budget: u64,
    pub sessions_device: u64,
    pub sessions_host: u64,
    pub sessions_disk: u64,
}

impl Plan {
    /// The tiers of a server on this GPU: the device budget resolved against the memory
    /// the weights and the long-prompt prefill's buffers leave free (as the server does
    /// once loaded), host RAM (the plan's budget) and disk.
    pub fn tiers(&self, gpu: GpuMemory, device: DeviceBudget, disk_budget: u64) -> TierPlan {
        let free_after_weights = gpu
            .free
            .saturating_sub(self.weight_bytes + self.gpu_scratch);
        let device_budget = device.resolve(free_after_weights as usize) as u64;
        let fit = |b: u64| match self.session_bytes {
            0 => 0,
            n => b / n as u64,
        };
        TierPlan {
            gpu,
            scratch: self.gpu_scratch,
            free_after_weights,
            device_budget,
            host_budget: self.budget,
            disk_budget,
            sessions_device: fit(device_budget),
            sessions_host: fit(self.budget),
            sessions_disk: fit(disk_budget),
        }
    }
}

impl TierPlan {
    pub fn render(&self, session_tokens: usize, session_bytes: usize) -> String {
        let mut s = String::new();
        let after = if self.scratch > 0 {
            format!(
                "after weights and {} of long-prompt prefill buffers",
                gib(self.scratch as f64)
            )
        } else {
            "after weights".to_string()
        };
        let _ = writeln!(
            s,
            "GPU memory       {} ({}), {} free, {} {after}",
            gib(self.gpu.total as f64),
            self.gpu.source,
            gib(self.gpu.free as f64),
            gib(self.free_after_weights as f64)
        );
        let _ = writeln!(
            s,
            "KV tiers         device {}, host {}, disk {}",
            gib(self.device_budget as f64),
            gib(self.host_budget as f64),
            gib(self.disk_budget as f64)
        );
        let _ = writeln!(
            s,
            "sessions of {:>5} tokens ({} each) that fit: device {}, host {}, disk {}",
            session_tokens,
            gib(session_bytes as f64),
            self.sessions_device,
            self.sessions_host,
            self.sessions_disk
        );
        if self.device_budget > self.free_after_weights {
            let _ = writeln!(
                s,
                "device budget is {} more than the GPU has free after weights: lower --kv-device-budget",
                gib((self.device_budget - self.free_after_weights) as f64)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(weight_bytes: u64, session_bytes: usize, budget: u64) -> Plan {
        Plan {
            model: "m".into(),
            arch: "llama".into(),
            weight_bytes,
            gpu_scratch: 0,
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 64,
            train_ctx: 8192,
            kv_dtype: KvDtype::F16,
            bytes_per_token: 256,
            local: None,
            per_dtype: vec![],
            budget,
            tokens_fit: 0,
            session_tokens: 4096,
            session_bytes,
            sessions_fit: 0,
            ram_total: 0,
            ram_available: 0,
        }
    }

    #[test]
    fn tiers_count_sessions_in_each_budget_after_the_weights() {
        let gpu = GpuMemory {
            total: 1000,
            free: 900,
            source: "given",
        };
        let t = plan(100, 10, 55).tiers(gpu, DeviceBudget::Share(0.5), 1000);
        assert_eq!((t.free_after_weights, t.device_budget), (800, 400));
        assert_eq!(
            (t.sessions_device, t.sessions_host, t.sessions_disk),
            (40, 5, 100)
        );
        let text = t.render(4096, 10);
        assert!(text.contains("device 40, host 5, disk 100"), "{text}");
        assert!(!text.contains("lower --kv-device-budget"), "{text}");
        let over = plan(100, 10, 0).tiers(gpu, DeviceBudget::Bytes(2000), 0);
        assert!(over.render(4096, 10).contains("lower --kv-device-budget"));
        // The long-prompt prefill's buffers are not the sessions' to take.
        let mut p = plan(100, 10, 55);
        p.gpu_scratch = 200;
        let t = p.tiers(gpu, DeviceBudget::Share(0.5), 1000);
        assert_eq!((t.free_after_weights, t.device_budget), (600, 300));
        assert_eq!(t.sessions_device, 30);
        let text = t.render(4096, 10);
        assert!(
            text.contains("after weights and 0.0 MiB of long-prompt"),
            "{text}"
        );
    }
}

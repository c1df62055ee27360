//! Loading: fetch the model file (or directory), read its weights onto the compute
//! device, build the tokenizer and chat template, and describe the result for the API.

use std::fs::File;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file;
use candle_core::Device;

use crate::engine::decode::constrain::TokenTable;
use crate::engine::model::{hf, Model, ModelConfig};
use crate::engine::text::template::{fallback, hf_template, ChatTemplate, CHATML};
use crate::engine::text::tokenizer::Tok;
use crate::engine::{fetch, EngineConfig, EngineError, Loaded, ModelInfo};
use crate::metrics;

pub(super) fn load(cfg: &EngineConfig) -> Result<(Model, Arc<Loaded>), EngineError> {
    let resolved = fetch::resolve(&cfg.model, &cfg.data_dir)?;
    let path = resolved.path.clone();
    tracing::info!(path = %path.display(), "loading model");
    let t0 = Instant::now();
    let device = pick_device(&cfg.device)?;
    tracing::info!(
        device = ?device.location(),
        cpu_kernels = %crate::engine::kernels::describe(),
        "compute device"
    );
    let (model, tok, template) = if resolved.is_hf_dir() {
        load_hf_dir(&path, &device, cfg.ctx_size)?
    } else {
        load_gguf(&path, &device, cfg.ctx_size)?
    };
    let ctx = model.ctx_size;
    model
        .cache_layout(cfg.kv_dtype)
        .check()
        .map_err(EngineError::Load)?;
    let tokens = Arc::new(TokenTable::new(
        tok.token_bytes(),
        tok.eog.iter().copied().collect(),
    ));
    let info = ModelInfo {
        id: resolved.id,
        path,
        arch: model.config.arch.clone(),
        ctx_size: ctx,
        vocab_size: model.config.vocab,
        n_layers: model.config.n_layers,
        weight_bytes: model.weight_bytes,
        kv_bytes_per_token: model.cache_layout(cfg.kv_dtype).bytes_per_token(),
        kv_dtype: cfg.kv_dtype,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    tracing::info!(
        model = %info.id, arch = %info.arch, ctx = info.ctx_size, layers = info.n_layers,
        weight_mb = info.weight_bytes / (1 << 20), secs = t0.elapsed().as_secs_f32(),
        "model loaded"
    );
    if let Some(paths) = model.gpu_paths() {
        tracing::info!(%paths, "gpu paths");
    }
    metrics::model_loaded(&info.id, &info.arch, info.weight_bytes, info.ctx_size);
    metrics::kv_layout(info.kv_dtype.name(), info.kv_bytes_per_token);
    Ok((
        model,
        Arc::new(Loaded {
            info,
            tok: Arc::new(tok),
            template,
            tokens,
        }),
    ))
}

/// A GGUF file: weights, tokenizer (a `tokenizer.json` beside it wins) and template
/// from its metadata.
fn load_gguf(
    path: &std::path::Path,
    device: &Device,
    ctx_size: usize,
) -> Result<(Model, Tok, ChatTemplate), EngineError> {
    let mut f =
        File::open(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| EngineError::Load(format!("{}: not a readable GGUF: {e}", path.display())))?;
    let probe = ModelConfig::from_gguf(&ct)?;
    let ctx = if ctx_size == 0 {
        probe.train_ctx
    } else {
        ctx_size
    };
    let model = Model::from_gguf(&ct, &mut f, device, ctx)?;
    let sibling = path.with_file_name("tokenizer.json");
    let tok = Tok::from_gguf(&ct, Some(&sibling))?;
    let meta_str = |k: &str| ct.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
    let tmpl_src = meta_str("tokenizer.chat_template")
        .unwrap_or_else(|| fallback(&model.config.arch).to_string());
    let tok_text = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let template = ChatTemplate::new(&tmpl_src, &tok_text(tok.bos_id), &tok_text(tok.eos_id))?;
    Ok((model, tok, template))
}

/// A Hugging Face model directory: `config.json` and safetensors, `tokenizer.json`,
/// `tokenizer_config.json` (template, BOS/EOS), `generation_config.json` (EOS ids).
fn load_hf_dir(
    dir: &std::path::Path,
    device: &Device,
    ctx_size: usize,
) -> Result<(Model, Tok, ChatTemplate), EngineError> {
    let load = |e: candle_core::Error| EngineError::Load(e.to_string());
    let (_, config) = hf::read_config(dir).map_err(load)?;
    let (tok, bos, eos) = Tok::from_hf_dir(dir, &config)?;
    let tc = hf::read_json(dir, "tokenizer_config.json")
        .map_err(load)?
        .unwrap_or_default();
    let src = hf_template(&tc, dir).unwrap_or_else(|| CHATML.to_string());
    let template = ChatTemplate::new(&src, &bos, &eos)?;
    let model = Model::from_hf_dir(dir, device, ctx_size).map_err(load)?;
    Ok((model, tok, template))
}

/// `auto` (the GPU when this build has one, else the CPU), `cpu`, `cuda`, `cuda:N`, `metal`.
/// Free and total bytes of an accelerator's memory; None for the CPU, and for Metal,
/// whose memory is the host's (its caches stay in one memory tier).
pub fn device_memory(device: &Device) -> Option<(usize, usize)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => match d.cuda_stream().context().mem_get_info() {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::warn!("cannot read the GPU's free memory: {e}");
                None
            }
        },
        _ => None,
    }
}

pub fn pick_device(spec: &str) -> Result<Device, EngineError> {
    let dev = |r: candle_core::Result<Device>| {
        r.map_err(|e| EngineError::Load(format!("device `{spec}`: {e}")))
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                dev(Device::new_cuda(0))
            } else if candle_core::utils::metal_is_available() {
                dev(Device::new_metal(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => dev(Device::new_cuda(0)),
        "metal" => dev(Device::new_metal(0)),
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => dev(Device::new_cuda(n)),
            None => Err(EngineError::Load(format!(
                "unknown device `{s}` (expected auto, cpu, cuda, cuda:N or metal)"
            ))),
        },
    }
}

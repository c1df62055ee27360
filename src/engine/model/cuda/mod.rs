//! Fused CUDA decode for llama-family GGUF models whose projections are Q4_0, Q4_1 or
//! Q8_0: our own kernels (`decode.cu`, compiled to PTX by `build.rs`) instead of candle's
//! generic tensor ops, one token at a time, captured once in a CUDA graph and replayed.
//!
//! A step is: the embedding row; per layer five launches — RMSNorm + activation
//! quantization + fused Q|K|V mat-vec; RoPE + K/V cache write + attention over the f16
//! cache; quantization + output projection + residual add; RMSNorm + quantization +
//! gate|up mat-vec + SiLU·up; quantization + down projection + residual add — then the
//! final RMSNorm + vocabulary projection. Token id, position, cache capacity and the
//! cache's per-layer device pointers live in a small device buffer written before each
//! replay, so one graph serves every token of every sequence, and the cache is the same
//! candle tensor that prefill through the tensor path writes.
//!
//! Work is ordered after candle's stream with an event, and the step ends by copying the
//! logits row to the host, so candle sees a finished cache afterwards.

use std::io::{Read, Seek};
use std::sync::{Arc, Mutex};

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr,
};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Result, Storage, Tensor};
use half::f16;

use super::ModelConfig;
use crate::kv::SeqCache;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

/// Threads of a mat-vec block (one warp per row at a time).
const MV_THREADS: u32 = 256;
/// Threads of an attention block (one query head).
const ATT_THREADS: usize = 256;

/// A kernel argument for `cuLaunchKernelEx` (the value must outlive the launch call).
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("fused cuda decode: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Kind {
    fn of(dt: GgmlDType) -> Option<Self> {
        match dt {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }
    /// (bytes per GGUF block, bytes of quants per block).
    fn sizes(self) -> (usize, usize) {
        match self {
            Self::Q4_0 => (18, 16),
            Self::Q4_1 => (20, 16),
            Self::Q8_0 => (34, 32),
        }
    }
}

/// A quantized matrix `(n, k)` on the device, repacked from GGUF blocks into quants
/// (16 or 32 bytes a block, 16-byte aligned) and `(d, m)` f32 pairs per block.
struct QMat {
    kind: Kind,
    n: usize,
    k: usize,
    qs: u64,
    dm: u64,
    _qs: CudaSlice<u8>,
    _dm: CudaSlice<f32>,
}

/// Device buffers owned by the decoder, with their raw addresses.
struct Buf<T> {
    ptr: u64,
    slice: CudaSlice<T>,
}

struct LayerW {
    attn_norm: Buf<f32>,
    qkv: QMat,
    qkv_bias: Option<Buf<f32>>,
    wo: QMat,
    ffn_norm: Buf<f32>,
    gate_up: QMat,
    down: QMat,
}

/// The kernels of a step, in order (per-layer ones repeat for every layer).
#[derive(Clone, Copy, Debug)]
enum Op {
    Embed,
    Qkv,
    Attention,
    Wo,
    GateUp,
    Down,
    Output,
}

struct Funcs {
    /// `[kind][mode]`: modes store, add, swiglu.
    mv: [[CudaFunction; 3]; 3],
    embed: CudaFunction,
    attention: CudaFunction,
}

struct Inner {
    cfg: ModelConfig,
    ctx: usize,
    stream: Arc<CudaStream>,
    candle_stream: Arc<CudaStream>,
    event: sys::CUevent,
    f: Funcs,
    layers: Vec<LayerW>,
    out_norm: Buf<f32>,
    output: QMat,
    /// Candle tensors whose memory the kernels read (kept alive here).
    embed: Tensor,
    cos: Tensor,
    sin: Tensor,
    x: Buf<f32>,
    qkv: Buf<f32>,
    att: Buf<f32>,
    act: Buf<f32>,
    scores: Buf<f32>,
    logits: Buf<f32>,
    step: Buf<u64>,
    graph: Option<CudaGraph>,
    use_graph: bool,
    /// Launch with programmatic dependent launch (Hopper and later).
    pdl: bool,
    /// Host copy of the step buffer (kept so the async copy's source outlives it).
    words: Vec<u64>,
    /// Steps run and graph captures made (for `doctor`).
    steps: u64,
    captures: u64,
}

// SAFETY: the raw handles (event, graph) are only used under the decoder's mutex, and
// CUDA driver handles may be used from any thread once the context is bound (cudarc
// binds it before every call).
unsafe impl Send for Inner {}

/// The fused decoder of one model on one CUDA device.
pub struct FusedDecoder {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for FusedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FusedDecoder")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.graph = None;
        // SAFETY: created in `new`, used only by this decoder.
        unsafe {
            let _ = result::event::destroy(self.event);
        }
    }
}

/// Address of a candle CUDA tensor's first element.
fn tensor_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(err("tensor is not on a CUDA device"));
    };
    let off = layout.start_offset();
    let p = match t.dtype() {
        DType::F32 => {
            let (p, _g) = cs.as_cuda_slice::<f32>()?.device_ptr(stream);
            p + 4 * off as u64
        }
        DType::F16 => {
            let (p, _g) = cs.as_cuda_slice::<f16>()?.device_ptr(stream);
            p + 2 * off as u64
        }
        dt => return Err(err(format!("unexpected tensor type {dt:?}"))),
    };
    Ok(p)
}

fn upload<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    v: &[T],
) -> Result<Buf<T>> {
    let slice = stream.clone_htod(v).map_err(err)?;
    let ptr = {
        let (p, _g) = slice.device_ptr(stream);
        p
    };
    Ok(Buf { ptr, slice })
}

fn zeros(stream: &Arc<CudaStream>, n: usize) -> Result<Buf<f32>> {
    upload(stream, &vec![0f32; n.max(1)])
}

/// Repack GGUF blocks (rows of whole blocks) into quants and `(d, m)` pairs.
fn repack(kind: Kind, raw: &[u8], n: usize, k: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    let (bsz, qlen) = kind.sizes();
    let nb = n * k / 32;
    if k % 32 != 0 || raw.len() != nb * bsz {
        return Err(err(format!(
            "bad {kind:?} tensor: {} bytes for {n}x{k}",
            raw.len()
        )));
    }
    let mut qs = Vec::with_capacity(nb * qlen);
    let mut dm = Vec::with_capacity(nb * 2);
    for blk in raw.chunks_exact(bsz) {
        let h = |i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
        dm.push(h(0));
        let q0 = if kind == Kind::Q4_1 {
            dm.push(h(2));
            4
        } else {
            dm.push(0.0);
            2
        };
        qs.extend_from_slice(&blk[q0..q0 + qlen]);
    }
    Ok((qs, dm))
}

struct Reader<'a, R> {
    ct: &'a gguf_file::Content,
    r: &'a mut R,
    stream: Arc<CudaStream>,
}

impl<R: Read + Seek> Reader<'_, R> {
    /// Several matrices that read the same input, stacked by rows; None when a type is
    /// not one of ours or they differ.
    fn qmat(&mut self, names: &[String]) -> Result<Option<QMat>> {
        let mut raw = Vec::new();
        let (mut n, mut k, mut kind) = (0, 0, None);
        for name in names {
            let t = self.ct.tensor(self.r, name, &Device::Cpu)?;
            let Some(kd) = Kind::of(t.dtype()) else {
                tracing::info!(tensor = %name, dtype = ?t.dtype(), "fused cuda decode: type not covered");
                return Ok(None);
            };
            let (tn, tk) = t.shape().dims2()?;
            if kind.is_some_and(|x| x != kd) || (k != 0 && tk != k) {
                return Ok(None);
            }
            kind = Some(kd);
            k = tk;
            n += tn;
            raw.extend_from_slice(&t.data()?);
        }
        let kind = kind.ok_or_else(|| err("no tensors"))?;
        let (qs, dm) = repack(kind, &raw, n, k)?;
        let q = upload(&self.stream, &qs)?;
        let d = upload(&self.stream, &dm)?;
        Ok(Some(QMat {
            kind,
            n,
            k,
            qs: q.ptr,
            dm: d.ptr,
            _qs: q.slice,
            _dm: d.slice,
        }))
    }

    fn floats(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        if !self.ct.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let t = self.ct.tensor(self.r, name, &Device::Cpu)?;
        Ok(Some(
            t.dequantize(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        ))
    }

    fn norm(&mut self, name: &str) -> Result<Buf<f32>> {
        let v = self
            .floats(name)?
            .ok_or_else(|| err(format!("missing {name}")))?;
        upload(&self.stream, &v)
    }
}

impl FusedDecoder {
    /// Build the decoder, or None when the model has a weight type or a shape the kernels
    /// do not cover (the tensor path then runs alone). `embed` is the f32 embedding table
    /// and `cos`/`sin` the rotary tables `(ctx, head_dim / 2)` of the tensor path.
    #[allow(clippy::too_many_arguments)]
    pub fn new<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        cfg: &ModelConfig,
        device: &Device,
        embed: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        ctx: usize,
    ) -> Result<Option<Self>> {
        let Device::Cuda(dev) = device else {
            return Ok(None);
        };
        let hd = cfg.head_dim;
        if cfg.hidden % 32 != 0
            || hd % 8 != 0
            || hd > 256
            || ATT_THREADS % (hd / 8) != 0
            || cfg.n_heads % cfg.n_kv_heads != 0
        {
            tracing::info!("fused cuda decode: shape not covered");
            return Ok(None);
        }
        let candle_stream = dev.cuda_stream();
        let context = candle_stream.context().clone();
        // Our own stream, made without cudarc's `new_stream` so the context stays in
        // single-stream mode (no per-tensor event tracking on candle's side).
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(err)?;
        // SAFETY: `raw` belongs to this context; it is never destroyed (one per model).
        let stream = unsafe { context.wrap_borrowed_stream(raw) };
        let event =
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(err)?;
        let module = context
            .load_module(candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_src(PTX))
            .map_err(err)?;
        let load = |name: &str| module.load_function(name).map_err(err);
        let mv_set = |k: &str| -> Result<[CudaFunction; 3]> {
            Ok([
                load(&format!("mv_{k}_store"))?,
                load(&format!("mv_{k}_add"))?,
                load(&format!("mv_{k}_swiglu"))?,
            ])
        };
        let f = Funcs {
            mv: [mv_set("q4_0")?, mv_set("q4_1")?, mv_set("q8_0")?],
            embed: load("embed_row")?,
            attention: load("attention")?,
        };
        let mut rd = Reader {
            ct,
            r: reader,
            stream: stream.clone(),
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let names = |xs: &[&str]| -> Vec<String> {
                xs.iter().map(|x| format!("{p}.{x}.weight")).collect()
            };
            let (Some(qkv), Some(wo), Some(gate_up), Some(down)) = (
                rd.qmat(&names(&["attn_q", "attn_k", "attn_v"]))?,
                rd.qmat(&names(&["attn_output"]))?,
                rd.qmat(&names(&["ffn_gate", "ffn_up"]))?,
                rd.qmat(&names(&["ffn_down"]))?,
            ) else {
                return Ok(None);
            };
            let want_qkv = hd * (cfg.n_heads + 2 * cfg.n_kv_heads);
            if qkv.n != want_qkv || qkv.k != cfg.hidden || wo.n != cfg.hidden {
                return Ok(None);
            }
            let qkv_bias = {
                let parts = ["attn_q", "attn_k", "attn_v"];
                let widths = [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd];
                let mut any = false;
                let mut v = Vec::with_capacity(want_qkv);
                for (part, w) in parts.iter().zip(widths) {
                    match rd.floats(&format!("{p}.{part}.bias"))? {
                        Some(b) if b.len() == w => {
                            any = true;
                            v.extend(b);
                        }
                        Some(_) => return Ok(None),
                        None => v.extend(std::iter::repeat_n(0.0, w)),
                    }
                }
                if any {
                    Some(upload(&stream, &v)?)
                } else {
                    None
                }
            };
            layers.push(LayerW {
                attn_norm: rd.norm(&format!("{p}.attn_norm.weight"))?,
                qkv,
                qkv_bias,
                wo,
                ffn_norm: rd.norm(&format!("{p}.ffn_norm.weight"))?,
                gate_up,
                down,
            });
        }
        let out_name = if ct.tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let Some(output) = rd.qmat(&[out_name.to_string()])? else {
            return Ok(None);
        };
        if output.n != cfg.vocab || output.k != cfg.hidden {
            return Ok(None);
        }
        let out_norm = rd.norm("output_norm.weight")?;
        let ffn = layers.first().map_or(0, |l| l.gate_up.n / 2);
        let nq = cfg.n_heads * hd;
        let inner = Inner {
            cfg: cfg.clone(),
            ctx,
            x: zeros(&stream, cfg.hidden)?,
            qkv: zeros(&stream, nq + 2 * cfg.n_kv_heads * hd)?,
            att: zeros(&stream, nq)?,
            act: zeros(&stream, ffn)?,
            scores: zeros(&stream, cfg.n_heads * ctx)?,
            logits: zeros(&stream, output.n)?,
            step: upload(&stream, &vec![0u64; 3 + 2 * cfg.n_layers])?,
            embed: embed.clone(),
            cos: cos.clone(),
            sin: sin.clone(),
            stream,
            candle_stream,
            event,
            f,
            layers,
            out_norm,
            output,
            graph: None,
            use_graph: std::env::var("CANDELA_CUDA_GRAPH").map_or(true, |v| v != "0"),
            pdl: std::env::var("CANDELA_CUDA_PDL").map_or(true, |v| v != "0")
                && context
                    .compute_capability()
                    .is_ok_and(|(major, _)| major >= 9),
            words: Vec::new(),
            steps: 0,
            captures: 0,
        };
        inner.stream.synchronize().map_err(err)?;
        Ok(Some(Self {
            inner: Mutex::new(inner),
        }))
    }

    /// Whether `cache` is one this path can read and write (dense f16 on the device).
    pub fn supports(cache: &SeqCache) -> bool {
        cache.layout().dtype == crate::kv::KvDtype::F16 && !cache.is_host()
    }

    /// Run `tokens` (already checked against the vocabulary and the context size) one at
    /// a time after the cache's positions; the cache must have room (`reserve`d). Returns
    /// the logits of the last token, or of every token with `all`, as host floats.
    pub fn run(&self, tokens: &[u32], cache: &mut SeqCache, all: bool) -> Result<Vec<f32>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.run(tokens, cache, all)
    }

    /// Per-kernel cost in a graph (see `Inner::bench`) at each of `positions`, as report
    /// lines with the sum over a step; `cache` is a scratch cache of this model.
    pub fn bench_report(&self, cache: &mut SeqCache, positions: &[usize]) -> Result<String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let nl = g.cfg.n_layers as f64;
        let mut s = String::new();
        for &p in positions {
            cache.reserve(p + 1)?;
            let r = g.bench(cache, p)?;
            let step: f64 = r
                .iter()
                .map(|(op, us)| match op {
                    Op::Embed | Op::Output => *us,
                    _ => us * nl,
                })
                .sum();
            let parts: Vec<String> = r.iter().map(|(op, us)| format!("{op:?} {us:.2}")).collect();
            s += &format!(
                "kernels at pos {p}, us per launch in a graph: {}; step sum {:.0} us ({:.0} tok/s)\n",
                parts.join(", "),
                step,
                1e6 / step
            );
        }
        Ok(s)
    }

    /// (steps run, graph captures) so far.
    pub fn counters(&self) -> (u64, u64) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.steps, g.captures)
    }
}

impl Inner {
    fn run(&mut self, tokens: &[u32], cache: &mut SeqCache, all: bool) -> Result<Vec<f32>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        let pos0 = cache.len();
        let cap = cache.capacity();
        let layers = cache
            .dense_layers()
            .ok_or_else(|| err("cache is not a dense device cache"))?;
        if layers.len() != self.cfg.n_layers || pos0 + tokens.len() > cap {
            return Err(err("cache does not fit the model or has no room"));
        }
        let mut kp = Vec::with_capacity(layers.len());
        let mut vp = Vec::with_capacity(layers.len());
        for (k, v) in &layers {
            if k.dtype() != DType::F16 || !k.is_contiguous() || !v.is_contiguous() {
                return Err(err("cache tensors are not contiguous f16"));
            }
            kp.push(tensor_ptr(k, &self.candle_stream)?);
            vp.push(tensor_ptr(v, &self.candle_stream)?);
        }
        // Candle's writes (prefill, a cache that just grew) come first.
        // SAFETY: both handles are live for the decoder's lifetime.
        unsafe {
            result::event::record(self.event, self.candle_stream.cu_stream()).map_err(err)?;
            result::stream::wait_event(
                self.stream.cu_stream(),
                self.event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(err)?;
        }
        let vocab = self.output.n;
        let mut out = Vec::with_capacity(if all { tokens.len() * vocab } else { vocab });
        for (i, &t) in tokens.iter().enumerate() {
            self.words.clear();
            self.words.extend([t as u64, (pos0 + i) as u64, cap as u64]);
            self.words.extend(&kp);
            self.words.extend(&vp);
            self.stream
                .memcpy_htod(&self.words, &mut self.step.slice)
                .map_err(err)?;
            self.launch_step()?;
            self.steps += 1;
            if all || i + 1 == tokens.len() {
                let at = out.len();
                out.resize(at + vocab, 0.0);
                self.stream
                    .memcpy_dtoh(&self.logits.slice, &mut out[at..])
                    .map_err(err)?;
            }
        }
        self.stream.synchronize().map_err(err)?;
        Ok(out)
    }

    /// One step: replay the graph (capturing it the first time) or launch directly.
    fn launch_step(&mut self) -> Result<()> {
        if !self.use_graph {
            return self.enqueue();
        }
        if self.graph.is_none() {
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(err)?;
            let r = self.enqueue();
            let g = self
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(err)?;
            r?;
            let g = g.ok_or_else(|| err("graph capture produced no graph"))?;
            g.upload().map_err(err)?;
            self.graph = Some(g);
            self.captures += 1;
        }
        self.graph
            .as_ref()
            .expect("captured above")
            .launch()
            .map_err(err)
    }

    fn matvec(&self, m: &QMat, mode: usize, x: u64, norm: u64, bias: u64, out: u64) -> Result<()> {
        let kind = match m.kind {
            Kind::Q4_0 => 0,
            Kind::Q4_1 => 1,
            Kind::Q8_0 => 2,
        };
        let f = &self.f.mv[kind][mode];
        let rows = if mode == 2 { m.n / 2 } else { m.n };
        let warps = (MV_THREADS / 32) as usize;
        // A grid-stride loop over rows: at most a few blocks per SM, each quantizing the
        // activations once.
        let blocks = rows.div_ceil(warps).min(132 * 8) as u32;
        let smem = (m.k + 8 * (m.k / 32)) as u32;
        let eps = self.cfg.rms_eps as f32;
        let (k, n) = (m.k as i32, m.n as i32);
        let mut args = [
            arg(&x),
            arg(&norm),
            arg(&eps),
            arg(&k),
            arg(&m.qs),
            arg(&m.dm),
            arg(&bias),
            arg(&n),
            arg(&out),
        ];
        // SAFETY: argument types and order match `MATVEC_ENTRY` in decode.cu; every
        // pointer is a live device allocation of the sizes the kernel indexes.
        unsafe { self.go(f, blocks, MV_THREADS, smem, &mut args, true) }
    }

    /// Launch `f` on our stream (`cuLaunchKernelEx`), with programmatic dependent launch
    /// when enabled and `dependent` (the kernel follows another kernel).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type.
    unsafe fn go(
        &self,
        f: &CudaFunction,
        blocks: u32,
        threads: u32,
        smem: u32,
        args: &mut [*mut c_void],
        dependent: bool,
    ) -> Result<()> {
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.pdl && dependent;
        let lc = sys::CUlaunchConfig {
            gridDimX: blocks,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        sys::cuLaunchKernelEx(
            &lc,
            f.cu_function(),
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
        .map_err(err)
    }

    /// Enqueue one decode step on our stream.
    fn enqueue(&self) -> Result<()> {
        self.launch(Op::Embed, 0)?;
        for li in 0..self.layers.len() {
            for op in [Op::Qkv, Op::Attention, Op::Wo, Op::GateUp, Op::Down] {
                self.launch(op, li)?;
            }
        }
        self.launch(Op::Output, 0)
    }

    /// Launch one kernel of the step (`li`: the layer, for per-layer ops).
    fn launch(&self, op: Op, li: usize) -> Result<()> {
        let cfg = &self.cfg;
        let l = &self.layers[li];
        match op {
            Op::Embed => {
                let hidden = cfg.hidden as i32;
                let embed = tensor_ptr(&self.embed, &self.candle_stream)?;
                let mut args = [
                    arg(&self.step.ptr),
                    arg(&embed),
                    arg(&hidden),
                    arg(&self.x.ptr),
                ];
                let blocks = cfg.hidden.div_ceil(256) as u32;
                // SAFETY: matches `embed_row`. A plain launch: it follows the step
                // buffer's copy, not a kernel.
                unsafe { self.go(&self.f.embed, blocks, 256, 0, &mut args, false) }
            }
            Op::Qkv => {
                let bias = l.qkv_bias.as_ref().map_or(0, |b| b.ptr);
                self.matvec(&l.qkv, 0, self.x.ptr, l.attn_norm.ptr, bias, self.qkv.ptr)
            }
            Op::Attention => {
                let hd = cfg.head_dim;
                let cos = tensor_ptr(&self.cos, &self.candle_stream)?;
                let sin = tensor_ptr(&self.sin, &self.candle_stream)?;
                let (li, nl, nh, nkvh, hdi) = (
                    li as i32,
                    cfg.n_layers as i32,
                    cfg.n_heads as i32,
                    cfg.n_kv_heads as i32,
                    hd as i32,
                );
                let neox = cfg.rope_neox as i32;
                let scale = 1.0 / (hd as f32).sqrt();
                let ctx = self.ctx as i32;
                let mut args = [
                    arg(&self.qkv.ptr),
                    arg(&self.step.ptr),
                    arg(&li),
                    arg(&nl),
                    arg(&nh),
                    arg(&nkvh),
                    arg(&hdi),
                    arg(&cos),
                    arg(&sin),
                    arg(&neox),
                    arg(&scale),
                    arg(&self.scores.ptr),
                    arg(&ctx),
                    arg(&self.att.ptr),
                ];
                let threads = ATT_THREADS as u32;
                let smem = ((3 * hd) as u32 + 8 * threads) * 4;
                // SAFETY: matches `attention`; the step buffer holds the cache pointers.
                unsafe {
                    self.go(
                        &self.f.attention,
                        cfg.n_heads as u32,
                        threads,
                        smem,
                        &mut args,
                        true,
                    )
                }
            }
            Op::Wo => self.matvec(&l.wo, 1, self.att.ptr, 0, 0, self.x.ptr),
            Op::GateUp => self.matvec(&l.gate_up, 2, self.x.ptr, l.ffn_norm.ptr, 0, self.act.ptr),
            Op::Down => self.matvec(&l.down, 1, self.act.ptr, 0, 0, self.x.ptr),
            Op::Output => self.matvec(
                &self.output,
                0,
                self.x.ptr,
                self.out_norm.ptr,
                0,
                self.logits.ptr,
            ),
        }
    }

    /// Microseconds per launch of each kernel of the step, as a graph of `REPS` launches
    /// of it replays (so launch gaps count as they do in the step's graph), with the
    /// attention at position `pos` of `cache` (reserved past `pos`).
    fn bench(&mut self, cache: &SeqCache, pos: usize) -> Result<Vec<(Op, f64)>> {
        const REPS: usize = 100;
        self.stream.context().bind_to_thread().map_err(err)?;
        let cap = cache.capacity();
        let layers = cache
            .dense_layers()
            .ok_or_else(|| err("cache is not a dense device cache"))?;
        if pos >= cap {
            return Err(err("bench position past the cache"));
        }
        self.words.clear();
        self.words.extend([0, pos as u64, cap as u64]);
        for (k, _) in &layers {
            self.words.push(tensor_ptr(k, &self.candle_stream)?);
        }
        for (_, v) in &layers {
            self.words.push(tensor_ptr(v, &self.candle_stream)?);
        }
        self.stream
            .memcpy_htod(&self.words, &mut self.step.slice)
            .map_err(err)?;
        let ops = [
            Op::Embed,
            Op::Qkv,
            Op::Attention,
            Op::Wo,
            Op::GateUp,
            Op::Down,
            Op::Output,
        ];
        let mut res = Vec::new();
        for op in ops {
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(err)?;
            let mut r = Ok(());
            for _ in 0..REPS {
                r = r.and_then(|_| self.launch(op, 0));
            }
            let g = self
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(err)?;
            r?;
            let g = g.ok_or_else(|| err("no graph"))?;
            g.launch().map_err(err)?;
            self.stream.synchronize().map_err(err)?;
            let t = std::time::Instant::now();
            for _ in 0..5 {
                g.launch().map_err(err)?;
            }
            self.stream.synchronize().map_err(err)?;
            res.push((op, t.elapsed().as_secs_f64() * 1e6 / (5 * REPS) as f64));
        }
        Ok(res)
    }
}

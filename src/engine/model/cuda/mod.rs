//! Fused CUDA decode for llama-family GGUF models whose projections are Q4_0, Q4_1,
//! Q8_0, Q5_0, Q4_K or Q6_K (repacked at load into the kernels' three layouts, see
//! [`super::cuda_pack`]): our own kernels (`decode.cu`, compiled to PTX by `build.rs`) instead of candle's
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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Result, Storage, Tensor};
use half::f16;

use super::cuda_pack::{self, Pack};
use super::{batch_plan, ModelConfig, WideGemm};
use crate::kv::SeqCache;

mod batch;
pub mod flash;
mod step;
mod wide;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

/// Threads of a mat-vec block (one warp per row at a time).
const MV_THREADS: u32 = 256;
/// Threads of an attention block (one query head).
const ATT_THREADS: usize = 256;
/// Query heads a grouped attention block takes at most (`ATT_GROUP_MAX` in decode.cu).
const ATT_GROUP_MAX: usize = 4;

/// A kernel argument for `cuLaunchKernelEx` (the value must outlive the launch call).
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::msg(format!("fused cuda decode: {e}"))
}

/// A quantized matrix `(n, k)` on the device, repacked from GGUF blocks into quants
/// (16 or 32 bytes a block, 16-byte aligned) and f32 pairs per block (`cuda_pack`).
struct QMat {
    kind: Pack,
    n: usize,
    k: usize,
    qs: u64,
    dm: u64,
    _qs: CudaSlice<u8>,
    _dm: CudaSlice<u8>,
}

/// Device buffers owned by the decoder, with their raw addresses.
struct Buf<T> {
    ptr: u64,
    slice: CudaSlice<T>,
}

struct LayerW {
    attn_norm: Buf<f32>,
    /// Q, K and V stacked by rows, in parts of one layout each (one part unless the
    /// file mixes types whose layouts differ, as Q4_K_M's Q4_K and Q6_K do).
    qkv: Vec<QMat>,
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
    /// `[kind][mode]` (kinds in `Pack` order; modes store, add, swiglu).
    mv: [[CudaFunction; 3]; 4],
    /// `mvq_*`: the mat-vecs on activations quantized once by `qact`.
    mvq: [[CudaFunction; 3]; 4],
    qact: CudaFunction,
    /// `qact`'s bytes on 1024 threads, four to a 32-block (the default; `qact` under
    /// `CANDELA_CUDA_QACT_WIDE=0`).
    qact_w: CudaFunction,
    embed: CudaFunction,
    attention: CudaFunction,
    /// The batched step's kernels (`batch.cuh`): `mm[kind][mode]` as `mv`, dotting 8
    /// columns at a time, and `mm32` 32.
    mm: [[CudaFunction; 3]; 4],
    mm32: [[CudaFunction; 3]; 4],
    /// `mmq_*`: `mm_*` on columns `qcols_*` quantized once (None where the device does
    /// not give them `batch::MMQ_SMEM` of shared memory).
    mmq: Option<[[CudaFunction; 3]; 4]>,
    /// `qcols_*` by kind: a batch's activations quantized once for a mat-mat.
    qcols: [CudaFunction; 4],
    /// `tc_*[kind][mode]`: the mat-mat on tensor cores (sm_80 and later), the same bits;
    /// `[1]`: `tc32_*`, 32 columns a block, unstaged (batches of more than 8, when forced:
    /// `CANDELA_CUDA_TC_SMEM=0`); `[2]`: `tcs_*`, the
    /// weights staged through shared memory (batches of up to 8); `[3]`: `tcs32_*`, 32
    /// columns a block with weights and activations staged (batches of more than 8).
    tc: Option<[[[CudaFunction; 3]; 4]; 4]>,
    /// `tcs32_*`'s other staging shapes, in dynamic shared memory (None where the card
    /// cannot give them it): `[0]` `tcs32w_*` (rounds of 16 blocks, two buffers), `[1]`
    /// `tcs32p_*` (rounds of 8, four buffers); [`TCS32_SHAPES`] gives each one's.
    tcs32v: Option<[[[CudaFunction; 3]; 4]; 2]>,
    /// `tcs16_*`: `tcs32w_*` for 16 columns a block (batches of 9 to 16), in dynamic
    /// shared memory (None where the card cannot give them it).
    tcs16: Option<[[CudaFunction; 3]; 4]>,
    /// The eight-part order's kernels (sum8.cuh; None below compute capability 8.0 or
    /// where the card cannot give `s8_*` their shared memory).
    s8: Option<Sum8Funcs>,
    embed_rows: CudaFunction,
    kv_write_b: CudaFunction,
    attention_b: CudaFunction,
    attention_bg: CudaFunction,
    /// The tensor-core decode attention for this model's head size (attn_tc.cuh):
    /// `[single-stream, batched]`, with `attention`'s and `attention_b`'s arguments (None
    /// below compute capability 8.0 or where `batch_plan::attn_tc_fits` says no).
    attention_tc: Option<[CudaFunction; 2]>,
}

/// The kernels of sum8.cuh: single-stream mat-vecs and the batched tensor-core mat-mat
/// that add every row's terms in eight parts (the same bits as each other).
struct Sum8Funcs {
    /// `mv8_*[kind][mode]`, `mvq8_*[kind][mode]`: as [`Funcs::mv`] and [`Funcs::mvq`].
    mv: [[CudaFunction; 3]; 4],
    mvq: [[CudaFunction; 3]; 4],
    /// `s8_*` at [`Sum8Funcs::at`] (None: SwiGLU has no 64-row tiles).
    mm: Vec<Option<CudaFunction>>,
}

impl Sum8Funcs {
    /// The index of `s8_{kind}_{mode}_r{rt}_c{nt}` in `mm` (rt and nt 1, 2 or 4).
    fn at(kind: usize, mode: usize, rt: usize, nt: usize) -> usize {
        ((kind * 3 + mode) * 3 + rt.ilog2() as usize) * 3 + nt.ilog2() as usize
    }

    /// Dynamic shared memory of an `s8_*` kernel: its stage buffers.
    fn smem(kind: Pack, mode: usize, rt: usize, nt: usize) -> usize {
        let qb = kind.quant_bytes();
        let r = if mode == 2 { 2 } else { 1 };
        batch_plan::s8_stages(r, rt, nt)
            * batch_plan::s8_stage_bytes(
                qb,
                kind == Pack::Q4K,
                r * 16 * rt,
                8 * nt,
                batch_plan::s8_round_blocks(qb),
            )
    }

    fn load(
        module: &Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>,
    ) -> Result<Option<Self>> {
        let layouts = [
            (Pack::Q4_0, "q4_0"),
            (Pack::Q4_1, "q4_1"),
            (Pack::Q8, "q8_0"),
            (Pack::Q4K, "q4_k"),
        ];
        let mut mm = vec![None; 4 * 3 * 3 * 3];
        for (ki, (kind, kname)) in layouts.iter().enumerate() {
            for (mode, mname) in ["store", "add", "swiglu"].iter().enumerate() {
                for rt in [1, 2, 4] {
                    if mode == 2 && rt == 4 {
                        continue;
                    }
                    for nt in [1, 2, 4] {
                        let f = module
                            .load_function(&format!("s8_{kname}_{mname}_r{rt}_c{nt}"))
                            .map_err(err)?;
                        let raised = f.set_attribute(
                            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            Self::smem(*kind, mode, rt, nt) as i32,
                        );
                        if raised.is_err() {
                            return Ok(None);
                        }
                        mm[Self::at(ki, mode, rt, nt)] = Some(f);
                    }
                }
            }
        }
        Ok(Some(Self {
            mv: kinds(module, "mv8")?,
            mvq: kinds(module, "mvq8")?,
            mm,
        }))
    }
}

struct Inner {
    cfg: ModelConfig,
    ctx: usize,
    /// The card's multiprocessors (grid sizes and the attention split follow them).
    sms: usize,
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
    /// A mat-vec's input quantized once (`qact`): `aq_k` int8 values in the nibble
    /// kinds' layout, then the same in Q8_0's; `ads` their `aq_k / 32` scale pairs.
    aq: Buf<u8>,
    ads: Buf<f32>,
    aq_k: usize,
    /// Whether the mat-vecs read activations quantized once (`CANDELA_CUDA_MVQ=0|1`;
    /// None: `batch_plan::mv_prequant`); `candela doctor` times both.
    mv_q: std::cell::Cell<Option<bool>>,
    /// Quantize mat-vec inputs with `qact_w` rather than `qact` (the same bytes; on by
    /// default, `CANDELA_CUDA_QACT_WIDE=0` for `qact`).
    qact_wide: bool,
    scores: Buf<f32>,
    /// Split decode attention: the position chunks a head is cut into (1: not split;
    /// `batch_plan::attn_chunks`, `CANDELA_CUDA_ATTN_SPLIT=0` turns it off; `candela
    /// doctor` times both), at most `att_max` (what the buffers below hold); the chunks'
    /// partial results (`nh * att_max * (hd + 2)` floats) and per-head tickets (u32).
    att_nch: std::cell::Cell<usize>,
    att_max: usize,
    att_part: Buf<f32>,
    att_cnt: Buf<f32>,
    logits: Buf<f32>,
    /// Page-locked host copy of `logits` (a copy into pageable memory is staged by the
    /// driver and slower).
    host_logits: PinnedHostSlice<f32>,
    step: Buf<u64>,
    graph: Option<CudaGraph>,
    /// Buffers and graphs of the batched step, made on first use.
    batch: Option<batch::Batch>,
    /// The wide-prefill kernels (None below compute capability 8.0 or for other head
    /// sizes) and their buffers, made on first use.
    wide_f: Option<wide::WideFuncs>,
    wide: Option<wide::Wide>,
    /// How wide passes multiply (`WideGemm::from_env`; `candela doctor` times each),
    /// and the cuBLAS handle of the f16 GEMMs, made on first use.
    wide_gemm: std::cell::Cell<WideGemm>,
    blas: Option<candle_core::cuda_backend::cudarc::cublas::CudaBlas>,
    /// Its workspace (`batch_plan::BLAS_WORKSPACE` bytes; dropped after the handle).
    blas_ws: Option<Buf<u8>>,
    /// Dynamic shared memory the mat-mat kernels may use on this device.
    mm_smem: usize,
    /// Mat-mat blocks per multiprocessor at most (`CANDELA_CUDA_MM_BLOCKS`; 0: 4 for
    /// batches of up to 8, else 2); `candela doctor` varies it.
    mm_per_sm: std::cell::Cell<usize>,
    /// Single-stream mat-vec blocks per multiprocessor at most (each block quantizes the
    /// activations once, then takes rows in a grid-stride loop; 0: by the row length,
    /// `batch_plan::mv_blocks_per_sm`; `CANDELA_CUDA_MV_BLOCKS`); `candela doctor` varies it.
    mv_per_sm: std::cell::Cell<usize>,
    /// Blocks per head of a batched attention launch (0: `batch_plan::attn_blocks_per_head`;
    /// `CANDELA_CUDA_ATT_BLOCKS`); `candela doctor` varies it.
    att_hb: std::cell::Cell<usize>,
    /// Which projections add their terms in eight parts (sum8.cuh: `mv8_*`, `mvq8_*`
    /// single-stream and `s8_*` batched, bit-identical to each other) rather than in the
    /// 32-lane order of `mv_*` and the tensor-core kernels of tc.cuh
    /// (`CANDELA_CUDA_SUM8`, `batch_plan::Sum8`; Off below compute capability 8.0).
    sum8: std::cell::Cell<batch_plan::Sum8>,
    /// Rows of each `s8_*` block (`CANDELA_CUDA_SUM8_ROWS`: 16, 32 or 64; None: by size,
    /// `batch_plan::s8_tile`); `candela doctor` times each.
    s8_rows: std::cell::Cell<Option<usize>>,
    /// Whether batched attention takes each KV group's query heads together in a block
    /// (`CANDELA_CUDA_ATT_GROUP=1`, `attention_bg`: every cached K/V row read once for up
    /// to four heads, the same bits on an H100) rather than a block per query head (the
    /// default: with the grouped kernel 32-row steps deep in the context are 3-10 % faster,
    /// but its attention takes 1.5-1.7 times as long with short caches, where latency
    /// rather than the cache's bytes bounds it).
    att_group: bool,
    /// Whether decode attention runs on the tensor cores (`attention_tc*` single-stream,
    /// `attention_btc*` batched: a block per KV group and position chunk, the same bits
    /// as each other, agreeing with the per-head kernels to rounding;
    /// wherever `Funcs::attention_tc` loaded unless `CANDELA_CUDA_ATT_TC=0`); `candela doctor`
    /// compares both.
    att_tc: std::cell::Cell<bool>,
    /// The tensor-core attention's least chunk length in positions when it splits
    /// (`CANDELA_CUDA_ATT_TC_CHUNK`, `batch_plan::atc_chunk`; default
    /// `batch_plan::ATT_MIN_CHUNK`, the per-head kernels' own); `candela doctor` compares 64.
    atc_chunk: std::cell::Cell<usize>,
    /// Whether the batched mat-mats run on tensor cores where the card has them (by
    /// default; `CANDELA_CUDA_MM_TC=0`: the dp4a kernels); `candela doctor` times both.
    mm_tc: std::cell::Cell<bool>,
    /// Whether batches of more than 8 take the 32-column tensor-core kernels: None, by
    /// the matrix's size (`batch_plan::tc_kernels`); `CANDELA_CUDA_TC32=0|1` forces it;
    /// `candela doctor` times each.
    mm_tc32: std::cell::Cell<Option<bool>>,
    /// Whether batches of up to 8 take the shared-memory-staged tensor-core kernels: None,
    /// by size; `CANDELA_CUDA_TC_SMEM=0|1` forces it; `candela doctor` times each.
    mm_tcs: std::cell::Cell<Option<bool>>,
    /// The staged 32-column kernels' staging shape, an index into [`TCS32_SHAPES`]: 0
    /// rounds of 8 blocks and two buffers (`tcs32_*`), 1 rounds of 16 (`tcs32w_*`, the
    /// default), 2 four buffers (`tcs32p_*`); `CANDELA_CUDA_TCS32_ROUNDS=8x2|16x2|8x4`;
    /// `candela doctor` times each.
    mm_tcs32v: std::cell::Cell<usize>,
    /// Whether the staged kernels take 16 columns a block (`tcs16_*`) rather than 32:
    /// None, for batches of up to 16 and for wider ones of matrices too small to cover
    /// the multiprocessors with 32-column blocks (`batch_plan::staged_columns`);
    /// `CANDELA_CUDA_TCS16=0|1` forces it for every batch; `candela doctor` times both.
    mm_tcs16: std::cell::Cell<Option<bool>>,
    /// Whether a batch's projection takes the dp4a `mmq_*` kernels (after `qcols_*`)
    /// instead of the tensor-core ones: None, by size (`batch_plan::mmq`);
    /// `CANDELA_CUDA_MMQ=0|1` forces it; `candela doctor` times each.
    mm_q: std::cell::Cell<Option<bool>>,
    use_graph: bool,
    /// Launch with programmatic dependent launch (Hopper and later).
    pdl: bool,
    /// Host copy of the step buffer (kept so the async copy's source outlives it).
    words: Vec<u64>,
    /// Steps run and graph captures made (for `doctor`).
    steps: u64,
    captures: u64,
    /// Where the host's time of the batched decode steps went since `take_phases`.
    phases: batch::HostPhases,
    /// Caches' layer pointers (`cache_ptrs`).
    cache_memo: std::cell::RefCell<batch::CacheMemo>,
}

// SAFETY: the raw handles (event, graph) are only used under the decoder's mutex, and
// CUDA driver handles may be used from any thread once the context is bound (cudarc
// binds it before every call).
unsafe impl Send for Inner {}

/// The fused decoder of one model on one CUDA device.
pub struct FusedDecoder {
    inner: Mutex<Inner>,
    /// Whether prompts of several tokens prefill through batched steps (on unless
    /// `CANDELA_CUDA_PREFILL=0`); off, they go one token at a time.
    prefill_on: AtomicBool,
    /// The longest prompt chunk a pass prefills fused (`CANDELA_CUDA_PREFILL_MAX`,
    /// default `batch_plan::default_prefill_max`); longer ones take the tensor path, or
    /// with `wide_on` the wide prefill.
    prefill_max: AtomicUsize,
    /// Whether the card has the wide-prefill kernels, and whether longer chunks use them
    /// (by default for models whose layouts were checked on a GPU, with the int8 GEMMs
    /// only up to hidden size 1024; `CANDELA_CUDA_WIDE=1` for every model, `0` never).
    wide_ok: bool,
    wide_on: AtomicBool,
    /// Chunks past `prefill_max` up to this long take the tensor path even with
    /// `wide_on` (`CANDELA_CUDA_WIDE_MIN`, default `batch_plan::WIDE_MIN`).
    wide_min: AtomicUsize,
    /// Whether a prefill pass of several sequences with more rows than batched steps take
    /// (past `prefill_max`) runs as shared wide passes (by default with `wide_on`;
    /// `CANDELA_CUDA_WIDE_PACK=0` off), rather than each long chunk in its own and short
    /// ones in batched steps.
    wide_pack: AtomicBool,
}

impl std::fmt::Debug for FusedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FusedDecoder")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.graph = None;
        self.batch = None;
        self.wide = None;
        self.blas = None;
        // SAFETY: created in `new`, used only by this decoder.
        unsafe {
            let _ = result::event::destroy(self.event);
        }
    }
}

/// The staged 32-column kernels' shapes: (blocks a round, stage buffers) of `tcs32_*`,
/// `tcs32w_*` and `tcs32p_*`.
const TCS32_SHAPES: [(usize, usize); 3] = [(8, 2), (16, 2), (8, 4)];

/// The default shape: rounds of 16 blocks. On an H100 (`candela doctor`, Llama-3-8B's
/// shape) its 32-row step took 14.7 ms against 16.1 for rounds of 8 and 15.6 with four
/// buffers (64 rows: 26.3 against 28.3 and 27.8), bit-identical to single-stream.
const TCS32_DEFAULT: usize = 1;

/// `CANDELA_CUDA_TCS32_ROUNDS=BxS` as an index into [`TCS32_SHAPES`]
/// ([`TCS32_DEFAULT`] when unset or not one of them).
fn tcs32_shape_from_env() -> usize {
    std::env::var("CANDELA_CUDA_TCS32_ROUNDS")
        .ok()
        .and_then(|v| {
            TCS32_SHAPES
                .iter()
                .position(|(rb, ns)| v == format!("{rb}x{ns}"))
        })
        .unwrap_or(TCS32_DEFAULT)
}

/// Dynamic shared memory a launch of shape `shape` (> 0) with `cols` columns a block (32,
/// or 16 for `tcs16_*`, which stages as shape 1) takes: its stage buffers for a layout
/// of `quant_bytes` a block in epilogue `mode` (SwiGLU stages two matrices).
fn tcs32_smem(shape: usize, cols: usize, quant_bytes: usize, mode: usize) -> usize {
    let (rb, ns) = TCS32_SHAPES[shape];
    let r = if mode == 2 { 2 } else { 1 };
    ns * batch_plan::tcs32_stage_bytes(quant_bytes, r, rb, cols)
}

/// An on/off switch from the environment: Some(false) for "0", Some(true) for "1", None
/// (the default choice) when unset or anything else.
fn env_switch(name: &str) -> Option<bool> {
    match std::env::var(name).as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    }
}

/// A count from the environment, None when unset or not a number.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

impl Inner {
    /// Set the setting `cell` of `self` to `v`, dropping the captured graphs (which bake
    /// in the kernels and arguments it picks) where that changes it; returns the previous
    /// value.
    fn set_recaptured<T: Copy + PartialEq>(
        &mut self,
        cell: impl Fn(&Self) -> &std::cell::Cell<T>,
        v: T,
    ) -> T {
        let was = cell(self).get();
        if was != v {
            cell(self).set(v);
            self.graph = None;
            self.drop_batch_graphs();
        }
        was
    }

    /// The tensor-core attention kernels (`[single-stream, batched]`) where decode
    /// attention runs on them, with their blocks' threads and dynamic shared memory.
    fn att_tc_launch(&self) -> Option<(&[CudaFunction; 2], u32, u32)> {
        let f = self.f.attention_tc.as_ref().filter(|_| self.att_tc.get())?;
        let group = self.cfg.n_heads / self.cfg.n_kv_heads;
        let smem = batch_plan::attn_tc_smem(self.cfg.head_dim, group) as u32;
        Some((f, batch_plan::ATC_WARPS as u32 * 32, smem))
    }

    /// `candela doctor`'s line for a single-stream step at `pos` of `cache` (kernel costs
    /// in a graph, `bench`); `what` names the variant after the position.
    fn kernel_line(&mut self, cache: &mut SeqCache, pos: usize, what: &str) -> Result<String> {
        cache.reserve(pos + 1)?;
        let nl = self.cfg.n_layers as f64;
        let (parts, step) = step_sum(&self.bench(cache, pos)?, nl);
        Ok(format!(
            "kernels at pos {pos}{what}, us per launch in a graph: {parts}; step sum {step:.0} us ({:.0} tok/s)\n",
            1e6 / step
        ))
    }

    /// `candela doctor`'s lines for a variant (`what`) of the decode step: single-stream
    /// kernels at each of `positions`, batched ones at 8 and 32 rows from the longest.
    fn variant_lines(
        &mut self,
        cache: &mut SeqCache,
        positions: &[usize],
        what: &str,
    ) -> Result<String> {
        let mut s = String::new();
        for &p in positions {
            s += &self.kernel_line(cache, p, &format!(", {what}"))?;
        }
        if let Some(&p) = positions.iter().max() {
            for rows in [8, 32] {
                s += &self.batch_line(cache, p, rows, &format!(" from pos {p}, {what}"))?;
            }
        }
        Ok(s)
    }

    /// `candela doctor`'s line for a batched step of `bucket` rows from `pos` of `cache`
    /// (kernel costs in a graph, `bench_batch`); `what` names the variant after "rows".
    fn batch_line(
        &mut self,
        cache: &mut SeqCache,
        pos: usize,
        bucket: usize,
        what: &str,
    ) -> Result<String> {
        cache.reserve(pos + bucket)?;
        let nl = self.cfg.n_layers as f64;
        let (parts, step) = step_sum(&self.bench_batch(cache, pos, bucket)?, nl);
        Ok(format!(
            "batched kernels, {bucket} rows{what}, us per launch in a graph: {parts}; step sum {step:.0} us ({:.0} rows/s)\n",
            bucket as f64 * 1e6 / step
        ))
    }
}

fn step_sum(r: &[(Op, f64)], n_layers: f64) -> (String, f64) {
    let step = r
        .iter()
        .map(|(op, us)| match op {
            Op::Embed | Op::Output => *us,
            _ => us * n_layers,
        })
        .sum();
    let parts: Vec<String> = r.iter().map(|(op, us)| format!("{op:?} {us:.2}")).collect();
    (parts.join(", "), step)
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

/// `n` zeroed elements allocated on the device (no host copy: for large scratch buffers).
fn alloc_zeros<T>(stream: &Arc<CudaStream>, n: usize) -> Result<Buf<T>>
where
    T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
{
    let slice = stream.alloc_zeros::<T>(n.max(1)).map_err(err)?;
    let ptr = {
        let (p, _g) = slice.device_ptr(stream);
        p
    };
    Ok(Buf { ptr, slice })
}

/// A kernel family's `{prefix}_{kind}_{mode}` for every layout (in `Pack` order) and
/// epilogue.
fn kinds(
    module: &Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>,
    prefix: &str,
) -> Result<[[CudaFunction; 3]; 4]> {
    Ok([
        modes(module, &format!("{prefix}_q4_0"))?,
        modes(module, &format!("{prefix}_q4_1"))?,
        modes(module, &format!("{prefix}_q8_0"))?,
        modes(module, &format!("{prefix}_q4_k"))?,
    ])
}

/// A kernel's three epilogue variants from `module`: `{prefix}_store`, `_add` and
/// `_swiglu` (`MODE_*` order).
fn modes(
    module: &Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>,
    prefix: &str,
) -> Result<[CudaFunction; 3]> {
    let load = |mode: &str| {
        module
            .load_function(&format!("{prefix}_{mode}"))
            .map_err(err)
    };
    Ok([load("store")?, load("add")?, load("swiglu")?])
}

struct Reader<'a, R> {
    ct: &'a gguf_file::Content,
    r: &'a mut R,
    stream: Arc<CudaStream>,
    /// Q4_K repacked as Q4_1 (`CANDELA_CUDA_Q4K_WIDE=1`, to compare the layouts).
    wide_q4k: bool,
}

impl<R: Read + Seek> Reader<'_, R> {
    /// Several matrices that read the same input, stacked by rows into parts of one
    /// device layout each (consecutive tensors whose layouts agree share a part); None
    /// when a type is not one of ours or the row lengths differ.
    fn qmats(&mut self, names: &[String]) -> Result<Option<Vec<QMat>>> {
        let mut mats = Vec::with_capacity(names.len());
        for name in names {
            let t = self.ct.tensor(self.r, name, &Device::Cpu)?;
            let (tn, tk) = t.shape().dims2()?;
            if Pack::of(t.dtype()).is_none() {
                tracing::info!(tensor = %name, dtype = ?t.dtype(), "fused cuda decode: type not covered");
                return Ok(None);
            }
            let p = cuda_pack::repack(t.dtype(), &t.data()?, tn, tk, self.wide_q4k).map_err(err)?;
            mats.push(p);
        }
        if mats.windows(2).any(|w| w[0].k != w[1].k) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(mats.len());
        for p in cuda_pack::stack(mats) {
            let q = upload(&self.stream, &p.qs)?;
            let d = upload(&self.stream, &p.dm)?;
            out.push(QMat {
                kind: p.pack,
                n: p.n,
                k: p.k,
                qs: q.ptr,
                dm: d.ptr,
                _qs: q.slice,
                _dm: d.slice,
            });
        }
        Ok(Some(out))
    }

    /// [`Self::qmats`] for matrices the kernels must read as one (a single layout).
    fn qmat(&mut self, names: &[String]) -> Result<Option<QMat>> {
        Ok(self.qmats(names)?.and_then(|mut v| {
            if v.len() == 1 {
                v.pop()
            } else {
                tracing::info!(tensors = ?names, "fused cuda decode: stacked types differ");
                None
            }
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
        if !cfg.hidden.is_multiple_of(32)
            || !hd.is_multiple_of(8)
            || hd > 256
            || !ATT_THREADS.is_multiple_of(hd / 8)
            || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
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
        // `CANDELA_CUDA_MM_SMEM_KB` asks for another limit (more columns per chunk, so
        // fewer passes over the weights for wide inputs, at fewer blocks per SM).
        let want_smem = std::env::var("CANDELA_CUDA_MM_SMEM_KB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(batch::MM_SMEM, |kb| kb << 10);
        let mut mm_smem = want_smem;
        let mut mm_set = |k: &str| -> Result<[CudaFunction; 3]> {
            let fs = modes(&module, k)?;
            for f in &fs {
                let raised = f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    want_smem as i32,
                );
                if raised.is_err() {
                    mm_smem = batch::MM_SMEM_DEFAULT;
                }
            }
            Ok(fs)
        };
        let mm = [
            mm_set("mm_q4_0")?,
            mm_set("mm_q4_1")?,
            mm_set("mm_q8_0")?,
            mm_set("mm_q4_k")?,
        ];
        let mm32 = [
            mm_set("mm32_q4_0")?,
            mm_set("mm32_q4_1")?,
            mm_set("mm32_q8_0")?,
            mm_set("mm32_q4_k")?,
        ];
        // The 8-column dp4a mat-mats on activations quantized once a step: a whole
        // bucket's columns in shared memory (up to 8 rows of 14,336 values and scales).
        let mmq = {
            let set = |k: &str| -> Result<Option<[CudaFunction; 3]>> {
                let fs = modes(&module, k)?;
                for f in &fs {
                    let raised = f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        batch::MMQ_SMEM as i32,
                    );
                    if raised.is_err() {
                        return Ok(None);
                    }
                }
                Ok(Some(fs))
            };
            match (
                set("mmq_q4_0")?,
                set("mmq_q4_1")?,
                set("mmq_q8_0")?,
                set("mmq_q4_k")?,
            ) {
                (Some(a), Some(b), Some(c), Some(d)) => Some([a, b, c, d]),
                _ => None,
            }
        };
        let wide_f = wide::WideFuncs::load(&module, &context, hd)?;
        let tc = if context.compute_capability().map_err(err)?.0 >= 8 {
            Some([
                kinds(&module, "tc")?,
                kinds(&module, "tc32")?,
                kinds(&module, "tcs")?,
                kinds(&module, "tcs32")?,
            ])
        } else {
            None
        };
        // The staged kernels in dynamic shared memory: tcs32's other shapes, and tcs16.
        let (tcs32v, tcs16) = if tc.is_some() {
            let set = |prefix: &str, k: &str, qb: usize, shape: usize, cols: usize| {
                let fs = modes(&module, &format!("{prefix}_{k}"))?;
                for (mode, f) in fs.iter().enumerate() {
                    let bytes = tcs32_smem(shape, cols, qb, mode);
                    let raised = f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    );
                    if raised.is_err() {
                        return Ok(None);
                    }
                }
                Ok::<_, candle_core::Error>(Some(fs))
            };
            let shape =
                |sh: usize, cols: usize, prefix: &str| -> Result<Option<[[CudaFunction; 3]; 4]>> {
                    Ok(
                        match (
                            set(prefix, "q4_0", 16, sh, cols)?,
                            set(prefix, "q4_1", 16, sh, cols)?,
                            set(prefix, "q8_0", 32, sh, cols)?,
                            set(prefix, "q4_k", 16, sh, cols)?,
                        ) {
                            (Some(a), Some(b), Some(c), Some(d)) => Some([a, b, c, d]),
                            _ => None,
                        },
                    )
                };
            let v = match (shape(1, 32, "tcs32w")?, shape(2, 32, "tcs32p")?) {
                (Some(w), Some(p)) => Some([w, p]),
                _ => None,
            };
            (v, shape(1, 16, "tcs16")?)
        } else {
            (None, None)
        };
        let s8 = if tc.is_some() {
            Sum8Funcs::load(&module)?
        } else {
            None
        };
        // Optional: without them (a module built below compute capability 8.0) attention
        // stays in the per-head kernels.
        let attention_tc =
            if tc.is_some() && batch_plan::attn_tc_fits(hd, cfg.n_heads, cfg.n_kv_heads) {
                match (
                    load(&format!("attention_tc{hd}")),
                    load(&format!("attention_btc{hd}")),
                ) {
                    (Ok(single), Ok(batched)) => Some([single, batched]),
                    _ => None,
                }
            } else {
                None
            };
        let f = Funcs {
            mv: kinds(&module, "mv")?,
            mvq: kinds(&module, "mvq")?,
            qact: load("qact")?,
            qact_w: load("qact_w")?,
            embed: load("embed_row")?,
            attention: load("attention")?,
            mm,
            mm32,
            mmq,
            qcols: [
                load("qcols_q4_0")?,
                load("qcols_q4_1")?,
                load("qcols_q8_0")?,
                load("qcols_q4_k")?,
            ],
            tc,
            tcs32v,
            tcs16,
            s8,
            embed_rows: load("embed_rows")?,
            kv_write_b: load("kv_write_b")?,
            attention_b: load("attention_b")?,
            attention_bg: load("attention_bg")?,
            attention_tc,
        };
        let mut rd = Reader {
            ct,
            r: reader,
            stream: stream.clone(),
            wide_q4k: std::env::var("CANDELA_CUDA_Q4K_WIDE").is_ok_and(|v| v == "1"),
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let names = |xs: &[&str]| -> Vec<String> {
                xs.iter().map(|x| format!("{p}.{x}.weight")).collect()
            };
            let (Some(qkv), Some(wo), Some(gate_up), Some(down)) = (
                rd.qmats(&names(&["attn_q", "attn_k", "attn_v"]))?,
                rd.qmat(&names(&["attn_output"]))?,
                rd.qmat(&names(&["ffn_gate", "ffn_up"]))?,
                rd.qmat(&names(&["ffn_down"]))?,
            ) else {
                return Ok(None);
            };
            let want_qkv = hd * (cfg.n_heads + 2 * cfg.n_kv_heads);
            let qkv_n: usize = qkv.iter().map(|m| m.n).sum();
            if qkv_n != want_qkv || qkv.iter().any(|m| m.k != cfg.hidden) || wo.n != cfg.hidden {
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
        // The longest mat-vec input (the quantized-input buffer's length).
        let kmax = cfg.hidden.max(ffn).max(nq);
        let sms = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(err)?
            .max(1) as usize;
        let att_tc = env_switch("CANDELA_CUDA_ATT_TC").unwrap_or(true) && f.attention_tc.is_some();
        // Chunks enough for the card's blocks: a block a query head, or a KV group on the
        // tensor cores.
        let att_max = if env_switch("CANDELA_CUDA_ATTN_SPLIT") == Some(false) {
            1
        } else if att_tc {
            batch_plan::attn_chunks(cfg.n_kv_heads, sms)
        } else {
            batch_plan::attn_chunks(cfg.n_heads, sms)
        };
        let sum8 = match std::env::var("CANDELA_CUDA_SUM8")
            .ok()
            .as_deref()
            .and_then(batch_plan::Sum8::parse)
        {
            Some(s) if f.s8.is_some() => s,
            _ => batch_plan::Sum8::Off,
        };
        let inner = Inner {
            cfg: cfg.clone(),
            ctx,
            sms,
            x: zeros(&stream, cfg.hidden)?,
            qkv: zeros(&stream, nq + 2 * cfg.n_kv_heads * hd)?,
            att: zeros(&stream, nq)?,
            act: zeros(&stream, ffn)?,
            aq: upload(&stream, &vec![0u8; 2 * kmax])?,
            ads: zeros(&stream, 2 * (kmax / 32))?,
            aq_k: kmax,
            mv_q: std::cell::Cell::new(env_switch("CANDELA_CUDA_MVQ")),
            qact_wide: env_switch("CANDELA_CUDA_QACT_WIDE").unwrap_or(true),
            scores: zeros(&stream, cfg.n_heads * ctx)?,
            att_nch: std::cell::Cell::new(att_max),
            att_max,
            att_part: zeros(&stream, cfg.n_heads * att_max * (hd + 2))?,
            att_cnt: zeros(&stream, cfg.n_heads)?,
            logits: zeros(&stream, output.n)?,
            // SAFETY: every element read is written by a device copy first.
            host_logits: unsafe {
                context
                    .alloc_pinned_with_flags::<f32>(output.n, 0)
                    .map_err(err)?
            },
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
            batch: None,
            wide_f,
            wide: None,
            wide_gemm: std::cell::Cell::new(WideGemm::from_env()),
            blas: None,
            blas_ws: None,
            mm_smem,
            mm_per_sm: std::cell::Cell::new(env_usize("CANDELA_CUDA_MM_BLOCKS").unwrap_or(0)),
            mv_per_sm: std::cell::Cell::new(env_usize("CANDELA_CUDA_MV_BLOCKS").unwrap_or(0)),
            att_hb: std::cell::Cell::new(env_usize("CANDELA_CUDA_ATT_BLOCKS").unwrap_or(0)),
            att_group: env_switch("CANDELA_CUDA_ATT_GROUP").unwrap_or(false),
            att_tc: std::cell::Cell::new(att_tc),
            atc_chunk: std::cell::Cell::new(
                std::env::var("CANDELA_CUDA_ATT_TC_CHUNK")
                    .ok()
                    .as_deref()
                    .and_then(batch_plan::atc_chunk)
                    .unwrap_or(batch_plan::ATT_MIN_CHUNK),
            ),
            sum8: std::cell::Cell::new(sum8),
            s8_rows: std::cell::Cell::new(env_usize("CANDELA_CUDA_SUM8_ROWS")),
            mm_tcs: std::cell::Cell::new(env_switch("CANDELA_CUDA_TC_SMEM")),
            mm_tcs32v: std::cell::Cell::new(tcs32_shape_from_env()),
            mm_tcs16: std::cell::Cell::new(env_switch("CANDELA_CUDA_TCS16")),
            mm_q: std::cell::Cell::new(env_switch("CANDELA_CUDA_MMQ")),
            mm_tc32: std::cell::Cell::new(env_switch("CANDELA_CUDA_TC32")),
            mm_tc: std::cell::Cell::new(
                std::env::var("CANDELA_CUDA_MM_TC").map_or(true, |v| v != "0"),
            ),
            use_graph: std::env::var("CANDELA_CUDA_GRAPH").map_or(true, |v| v != "0"),
            pdl: std::env::var("CANDELA_CUDA_PDL").map_or(true, |v| v != "0")
                && context
                    .compute_capability()
                    .is_ok_and(|(major, _)| major >= 9),
            words: Vec::new(),
            steps: 0,
            captures: 0,
            phases: batch::HostPhases::default(),
            cache_memo: Default::default(),
        };
        inner.stream.synchronize().map_err(err)?;
        let wide_ok = inner.has_wide();
        let hidden = inner.cfg.hidden;
        // On by default where checked on a GPU (`batch_plan::wide_by_default`): every
        // projection in a layout checked there (Q4_1, Q4_K, and Q8_0, Q5_0 and Q6_K as
        // 8-bit), with the int8 GEMMs only up to hidden size 1,024.
        // `CANDELA_CUDA_WIDE=1` turns it on for the rest.
        let layouts = inner.layers.iter().all(|l| {
            l.qkv
                .iter()
                .chain([&l.wo, &l.gate_up, &l.down])
                .all(|m| m.kind.wide_checked())
        });
        let f16 = inner.wide_gemm.get() == WideGemm::F16;
        let checked = batch_plan::wide_by_default(hidden, f16, layouts);
        let wide_env = std::env::var("CANDELA_CUDA_WIDE").ok();
        let wide_default = match wide_env.as_deref() {
            Some("0") => false,
            Some("1") => true,
            _ => checked,
        };
        Ok(Some(Self {
            wide_ok,
            wide_on: AtomicBool::new(wide_ok && wide_default),
            inner: Mutex::new(inner),
            prefill_on: AtomicBool::new(
                std::env::var("CANDELA_CUDA_PREFILL").map_or(true, |v| v != "0"),
            ),
            wide_min: AtomicUsize::new(
                env_usize("CANDELA_CUDA_WIDE_MIN").unwrap_or(batch_plan::WIDE_MIN),
            ),
            wide_pack: AtomicBool::new(env_switch("CANDELA_CUDA_WIDE_PACK").unwrap_or(true)),
            prefill_max: AtomicUsize::new(
                std::env::var("CANDELA_CUDA_PREFILL_MAX")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|&n| n >= 1)
                    .unwrap_or(crate::engine::model::batch_plan::default_prefill_max(
                        hidden,
                    )),
            ),
        }))
    }

    /// Whether `cache` is one this path can read and write (dense f16 on the device).
    pub fn supports(cache: &SeqCache) -> bool {
        let layout = cache.layout();
        // Local (sliding-window) layers keep only their window: the kernels index the
        // cache by absolute position, so such caches stay on the tensor path.
        layout.dtype == crate::kv::KvDtype::F16 && layout.window.is_none() && !cache.is_host()
    }

    /// Run `tokens` (already checked against the vocabulary and the context size) after
    /// the cache's positions — several in batched prefill steps, or one at a time with
    /// prefill off; the cache must have room (`reserve`d), and is not committed. Returns
    /// the logits of the last token, or of every token with `all`, as host floats (the
    /// same bits either way).
    pub fn run(&self, tokens: &[u32], cache: &mut SeqCache, all: bool) -> Result<Vec<f32>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() > 1 && self.prefill() {
            let pos0 = cache.len();
            let cache = &*cache;
            let rows: Vec<(u32, usize, &SeqCache)> = (tokens.iter().enumerate())
                .map(|(i, &t)| (t, pos0 + i, cache))
                .collect();
            let mut want = vec![all; rows.len()];
            want[rows.len() - 1] = true;
            return Ok(g.prefill_rows(&rows, &want)?.concat());
        }
        g.run(tokens, cache, cache.len(), all)
    }

    /// Prompt rows of several sequences in batched prefill steps (`(token, position,
    /// cache)`, each sequence's rows consecutive and in order, its cache filled up to its
    /// first and reserved past its last; not committed): the logits of the rows `want`
    /// marks, in order, identical to feeding each sequence's tokens one at a time.
    pub fn run_rows(
        &self,
        rows: &[(u32, usize, &SeqCache)],
        want: &[bool],
    ) -> Result<Vec<Vec<f32>>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.prefill_rows(rows, want)
    }

    /// Whether the batched step's mat-mats run on the tensor cores (else dp4a).
    pub fn tensor_cores(&self) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.f.tc.is_some() && g.mm_tc.get()
    }

    /// Which projections add their terms in eight parts (`CANDELA_CUDA_SUM8`: sum8.cuh's
    /// kernels, single-stream and batched).
    pub fn sum8(&self) -> batch_plan::Sum8 {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sum8.get()
    }

    /// Set which projections sum in eight parts; the captured graphs are dropped when
    /// that changes. Returns whether this card has the eight-part kernels (if not,
    /// nothing changes).
    pub fn set_sum8(&self, s: batch_plan::Sum8) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.f.s8.is_none() {
            return false;
        }
        g.set_recaptured(|i| &i.sum8, s);
        true
    }

    /// Decode attention on the tensor cores (the default; `CANDELA_CUDA_ATT_TC=0` off) or
    /// in the per-head kernels; the captured graphs are dropped when that changes. Returns
    /// whether this card and model have the tensor-core kernels (if not, nothing changes).
    pub fn set_attn_tc(&self, on: bool) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.f.attention_tc.is_none() {
            return false;
        }
        g.set_recaptured(|i| &i.att_tc, on);
        true
    }

    /// Set the tensor-core attention's least chunk length (`batch_plan::atc_chunk_ok`);
    /// the captured graphs are dropped when it changes. Returns the previous
    /// one, or None where the value is not one of those (nothing changes).
    pub fn set_attn_tc_chunk(&self, n: usize) -> Option<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        batch_plan::atc_chunk_ok(n).then(|| g.set_recaptured(|i| &i.atc_chunk, n))
    }

    /// Whether decode attention runs on the tensor cores.
    pub fn attn_tc(&self) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.att_tc.get()
    }

    /// Split decode attention over position chunks (the default where the model has
    /// several: `batch_plan::attn_chunks`) or not; the captured graphs are dropped when
    /// that changes. Returns whether this model splits at all.
    pub fn set_attn_split(&self, on: bool) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let want = if on { g.att_max } else { 1 };
        g.set_recaptured(|i| &i.att_nch, want);
        g.att_max > 1
    }

    /// Whether chunks longer than [`Self::prefill_max`] and [`Self::wide_min`] prefill
    /// wide.
    pub fn wide(&self) -> bool {
        self.wide_on.load(Ordering::Relaxed)
    }

    /// The longest chunk past [`Self::prefill_max`] that takes the tensor path even where
    /// the wide prefill is on.
    pub fn wide_min(&self) -> usize {
        self.wide_min.load(Ordering::Relaxed)
    }

    /// Set [`Self::wide_min`] (`candela doctor` times the wide prefill on short chunks).
    pub fn set_wide_min(&self, n: usize) {
        self.wide_min.store(n, Ordering::Relaxed);
    }

    /// Turn the wide prefill on or off (`candela doctor` compares it with the tensor
    /// path); returns whether this card and model have it.
    pub fn set_wide(&self, on: bool) -> bool {
        self.wide_on.store(on && self.wide_ok, Ordering::Relaxed);
        self.wide_ok
    }

    /// Device bytes the wide passes hold once a long prompt ran (with the GEMM kind now
    /// chosen), where the wide prefill is on; 0 otherwise.
    pub fn wide_scratch_bytes(&self) -> usize {
        if !self.wide() {
            return 0;
        }
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.wide_shape()
            .scratch_bytes(g.wide_gemm.get() == WideGemm::F16)
    }

    /// How wide passes multiply.
    pub fn wide_gemm(&self) -> WideGemm {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.wide_gemm.get()
    }

    /// How wide passes multiply: set it (`candela doctor` times each), returning the
    /// previous choice.
    pub fn set_wide_gemm(&self, gemm: WideGemm) -> WideGemm {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.wide_gemm.replace(gemm)
    }

    /// A long prompt chunk after the cache's positions in wide passes (the cache
    /// `reserve`d for it, not committed): the last token's logits as host floats.
    pub fn run_wide(&self, tokens: &[u32], cache: &SeqCache) -> Result<Vec<f32>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.prefill_wide(tokens, cache)
    }

    /// Several sequences' prompt chunks (`(tokens, cache)`, each cache reserved for its
    /// chunk; not committed) packed into shared wide passes: each chunk's last logits as
    /// host floats, in order.
    pub fn run_wide_packed(&self, seqs: &[(&[u32], &SeqCache)]) -> Result<Vec<Vec<f32>>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.prefill_wide_packed(seqs)
    }

    /// Whether prefill passes of several sequences past [`Self::prefill_max`] rows pack
    /// into shared wide passes.
    pub fn wide_pack(&self) -> bool {
        self.wide() && self.wide_pack.load(Ordering::Relaxed)
    }

    /// Turn packed wide passes on or off (`candela doctor` compares them); returns
    /// whether the card has the wide prefill at all.
    pub fn set_wide_pack(&self, on: bool) -> bool {
        self.wide_pack.store(on, Ordering::Relaxed);
        self.wide_ok
    }

    /// Whether prompts prefill through batched steps.
    pub fn prefill(&self) -> bool {
        self.prefill_on.load(Ordering::Relaxed)
    }

    /// The longest prompt chunk a pass prefills fused.
    pub fn prefill_max(&self) -> usize {
        self.prefill_max.load(Ordering::Relaxed)
    }

    /// Set the longest prompt chunk a pass prefills fused (`candela doctor` times
    /// batched prefill past the default).
    pub fn set_prefill_max(&self, n: usize) {
        self.prefill_max.store(n.max(1), Ordering::Relaxed);
    }

    /// Turn batched prefill on or off (`candela doctor` compares the two).
    pub fn set_prefill(&self, on: bool) {
        self.prefill_on.store(on, Ordering::Relaxed);
    }

    /// One token at position `pos` of `cache` (filled up to it, with room past it), not
    /// committed: the logits as host floats.
    pub fn run_at(&self, &(token, pos, cache): &(u32, usize, &SeqCache)) -> Result<Vec<f32>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.run(&[token], cache, pos, false)
    }

    /// One step for several sequences at once, one token each (`(token, position,
    /// cache)`; each cache filled up to the position, with room past it): every cache gets
    /// its token's K/V (not committed), and each sequence's logits row comes back as a
    /// row of a host buffer the step's sequences share, identical to stepping each
    /// sequence alone with [`Self::run_at`].
    pub fn run_batch(
        &self,
        seqs: &[(u32, usize, &SeqCache)],
    ) -> Result<Vec<crate::engine::model::Logits>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.run_batch(seqs)
    }

    /// Per-kernel cost in a graph (see `Inner::bench`) at each of `positions`, as report
    /// lines with the sum over a step; `cache` is a scratch cache of this model.
    pub fn bench_report(&self, cache: &mut SeqCache, positions: &[usize]) -> Result<String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = format!(
            "projection sums: {}\n",
            match g.sum8.get() {
                batch_plan::Sum8::All => "eight parts a row (sum8.cuh)",
                batch_plan::Sum8::GateUp =>
                    "eight parts a row for gate|up (sum8.cuh), 32 lanes a row for the rest",
                batch_plan::Sum8::Off => "32 lanes a row",
            }
        );
        s += &format!(
            "decode attention: {}\n",
            match (g.att_tc.get(), g.f.attention_tc.is_some()) {
                (true, _) => "on tensor cores (a block per KV group)",
                (false, true) => "a block per query head (tensor cores available)",
                (false, false) => "a block per query head",
            }
        );
        for &p in positions {
            s += &g.kernel_line(cache, p, "")?;
        }
        // Attention split over position chunks or not, at the longest position and for
        // 8 batched rows from 1024.
        if g.att_max > 1 {
            let split = g.att_nch.get();
            if let Some(&p) = positions.iter().max() {
                for nch in [1, g.att_max] {
                    g.att_nch.set(nch);
                    s +=
                        &g.kernel_line(cache, p, &format!(", attention in {nch} chunk(s) a head"))?;
                }
                let hb = g.att_hb.get();
                let m = g.att_max;
                let split = [(1, 0), (m, 0), (m, 1), (m, 2), (m, 4), (m, 8)];
                for (nch, blocks) in split {
                    g.att_nch.set(nch);
                    g.att_hb.set(blocks);
                    let by = match blocks {
                        0 => String::new(),
                        b => format!(", {b} blocks a head"),
                    };
                    let what = format!(" from pos {p}, attention in {nch} chunk(s) a head{by}");
                    s += &g.batch_line(cache, p, 8, &what)?;
                }
                g.att_hb.set(hb);
            }
            g.att_nch.set(split);
        }
        // The other decode attention (tensor cores or a block per query head), where the
        // card and model have both: single-stream at each position, batched at the longest.
        if g.f.attention_tc.is_some() {
            let was = g.att_tc.get();
            g.att_tc.set(!was);
            let what = if was {
                "attention a block per query head"
            } else {
                "attention on tensor cores"
            };
            let r = g.variant_lines(cache, positions, what);
            g.att_tc.set(was);
            s += &r?;
        }
        // The tensor-core attention's other least chunk length (64 against the default
        // 256, or back), where it runs: single-stream at each position, batched at the
        // longest.
        if g.att_tc.get() && g.f.attention_tc.is_some() {
            let was = g.atc_chunk.get();
            let other = if was == batch_plan::ATT_MIN_CHUNK {
                64
            } else {
                batch_plan::ATT_MIN_CHUNK
            };
            g.atc_chunk.set(other);
            let what = format!("attention on tensor cores in chunks of at least {other}");
            let r = g.variant_lines(cache, positions, &what);
            g.atc_chunk.set(was);
            s += &r?;
        }
        // Whole steps: the graph replayed back to back against whole steps with the
        // host's part, to tell the device's time from the host's.
        if g.use_graph {
            if let Some(&p) = positions.iter().min() {
                cache.reserve(p + 1)?;
                let (graph, whole) = g.bench_step(cache, p)?;
                s += &format!(
                    "decode step at pos {p}: graph replayed back to back {graph:.0} us, whole steps (upload, replay, logits copy) {whole:.0} us\n"
                );
            }
            for bucket in [8, 32] {
                cache.reserve(256 + bucket)?;
                let (graph, whole) = g.bench_batch_step(cache, 256, bucket)?;
                s += &format!(
                    "batched decode step, {bucket} rows from pos 256: graph replayed back to back {graph:.0} us, whole steps (upload, replay, logits copy) {whole:.0} us\n"
                );
            }
        }
        // The single-stream mat-vecs with fewer blocks per multiprocessor (each block
        // quantizes the activations once), at the first position.
        if let Some(&p) = positions.iter().min() {
            let per_sm = g.mv_per_sm.get();
            for n in [2, 4, 8] {
                g.mv_per_sm.set(n);
                let what = format!(", mat-vecs at most {n} block(s) per multiprocessor");
                s += &g.kernel_line(cache, p, &what)?;
            }
            g.mv_per_sm.set(per_sm);
            // Every mat-vec on activations quantized once (`qact`), then none.
            let mv_q = g.mv_q.get();
            for (on, what) in [(true, "every"), (false, "no")] {
                g.mv_q.set(Some(on));
                let what = format!(", {what} mat-vec on activations quantized once");
                s += &g.kernel_line(cache, p, &what)?;
            }
            g.mv_q.set(mv_q);
        }
        // The batched step's kernels, rows at consecutive positions from 256, with the
        // defaults; then at 8 and 32 rows with the other mat-mats (dp4a or tensor cores).
        let default_tc = g.mm_tc.get();
        let mut runs = vec![
            (8, default_tc),
            (16, default_tc),
            (32, default_tc),
            (64, default_tc),
        ];
        // (With sums in eight parts every batched projection is `s8_*`: the 32-lane
        // variants below would time the same kernels; its own tiles are timed instead.)
        if g.f.tc.is_some() && g.sum8.get() != batch_plan::Sum8::All {
            for bucket in [8, 32] {
                runs.push((bucket, !default_tc));
            }
        }
        let (default_tc32, default_tcs) = (g.mm_tc32.get(), g.mm_tcs.get());
        for (i, (bucket, tc)) in runs.into_iter().enumerate() {
            g.mm_tc.set(tc);
            let variant = match (i < 4, tc) {
                (true, _) => "",
                (false, true) => ", tensor cores",
                (false, false) => ", dp4a",
            };
            s += &g.batch_line(cache, 256, bucket, variant)?;
        }
        // The tensor-core variants forced on and off for every matrix (the default picks
        // each matrix's by its size: batch_plan::tc_kernels, and batch_plan::mmq for the
        // dp4a kernels on once-quantized columns, off for these).
        let default_mmq = g.mm_q.get();
        if g.sum8.get() == batch_plan::Sum8::All {
            // The eight-part tiles with their rows forced for every projection.
            let default_rows = g.s8_rows.get();
            for bucket in [8, 32] {
                for rows in [16, 32, 64] {
                    g.s8_rows.set(Some(rows));
                    let what = format!(
                        ", sums in eight parts, blocks of {rows} weight rows (32 for SwiGLU's pair at 64)"
                    );
                    s += &g.batch_line(cache, 256, bucket, &what)?;
                }
            }
            g.s8_rows.set(default_rows);
        } else if g.f.tc.is_some() {
            g.mm_tc.set(true);
            g.mm_q.set(Some(false));
            // (rows, 32-column blocks, staging, tcs32 shape, label)
            let c32 = "32 columns a block";
            let forced = [
                (
                    32,
                    Some(true),
                    Some(true),
                    0,
                    format!("{c32}, staged, for every matrix"),
                ),
                (
                    32,
                    Some(true),
                    Some(true),
                    1,
                    format!("{c32}, staged in rounds of 16 blocks, for every matrix"),
                ),
                (
                    32,
                    Some(true),
                    Some(true),
                    2,
                    format!("{c32}, staged with four buffers, for every matrix"),
                ),
                (
                    32,
                    Some(true),
                    Some(false),
                    0,
                    format!("{c32}, unstaged, for every matrix"),
                ),
                (
                    32,
                    Some(false),
                    Some(false),
                    0,
                    "8 columns a block for every matrix".into(),
                ),
                (
                    32,
                    Some(false),
                    Some(true),
                    0,
                    "8 columns a block, staged, for every matrix".into(),
                ),
                (
                    64,
                    Some(true),
                    Some(true),
                    0,
                    format!("{c32}, staged, for every matrix"),
                ),
                (
                    64,
                    Some(true),
                    Some(true),
                    1,
                    format!("{c32}, staged in rounds of 16 blocks, for every matrix"),
                ),
                (
                    64,
                    Some(true),
                    Some(true),
                    2,
                    format!("{c32}, staged with four buffers, for every matrix"),
                ),
                (
                    64,
                    Some(false),
                    Some(false),
                    0,
                    "8 columns a block for every matrix".into(),
                ),
                (
                    8,
                    None,
                    Some(true),
                    0,
                    "weights staged in shared memory for every matrix".into(),
                ),
                (
                    8,
                    None,
                    Some(false),
                    0,
                    "weights staged for no matrix".into(),
                ),
            ];
            let default_v = g.mm_tcs32v.get();
            for (bucket, tc32, tcs, shape, label) in forced {
                if shape != 0 && g.f.tcs32v.is_none() {
                    continue;
                }
                g.mm_tc32.set(tc32);
                g.mm_tcs.set(tcs);
                g.mm_tcs32v.set(shape);
                s += &g.batch_line(cache, 256, bucket, &format!(", tensor cores, {label}"))?;
            }
            g.mm_tcs32v.set(default_v);
            g.mm_tc32.set(default_tc32);
            g.mm_tcs.set(default_tcs);
            // 16 columns a block (`tcs16_*`) and 32 (at 16 rows, half of them repeats),
            // each forced for every matrix that stages.
            if g.f.tcs16.is_some() {
                let default_16 = g.mm_tcs16.get();
                for (bucket, on) in [(16, true), (16, false), (32, true), (64, true)] {
                    g.mm_tcs16.set(Some(on));
                    let cols = if on { 16 } else { 32 };
                    let what = format!(", tensor cores, staged, {cols} columns a block");
                    s += &g.batch_line(cache, 256, bucket, &what)?;
                }
                g.mm_tcs16.set(default_16);
            }
            // At 8 rows: the dp4a kernels on once-quantized columns for every matrix
            // whose columns fit them, then for none.
            if g.f.mmq.is_some() {
                for (on, label) in [(true, "every"), (false, "no")] {
                    g.mm_q.set(Some(on));
                    let what = format!(", dp4a on columns quantized once for {label} matrix");
                    s += &g.batch_line(cache, 256, 8, &what)?;
                }
            }
        }
        g.mm_q.set(default_mmq);
        g.mm_tc.set(default_tc);
        Ok(s)
    }

    /// (steps run, graph captures) so far.
    pub fn counters(&self) -> (u64, u64) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.steps, g.captures)
    }

    /// Where the host's time of the batched decode steps went since the last call, µs a
    /// step: (steps, [cache pointers, upload and launch, waiting for the GPU and the
    /// logits copy]); resets the tally.
    pub fn take_phases(&self) -> (u64, [f64; 3]) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut g.phases).per_step()
    }
}

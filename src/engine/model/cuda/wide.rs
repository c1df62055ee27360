//! Wide prefill: long prompt chunks (one sequence's, or several packed together) in
//! passes of up to [`WIDE_ROWS`] rows, each projection one int8 tensor-core GEMM over all
//! the pass's rows (`prefill.cuh`: the activations quantized once, then `gemm_*`), the
//! attention flash style over each sequence's cache (`flash.cu`). Launched directly (no
//! graph: a pass is long enough that launches do not matter); needs compute capability
//! 8.0 and heads of 64 or 128.
//!
//! By default the projections run as f16 GEMMs instead ([`WideGemm::F16`]): each weight
//! matrix dequantized into an f16 scratch matrix once a pass, the input rows converted
//! to f16, the product by cuBLAS on tensor cores (`wh_*` in `prefill.cuh`). The int8
//! GEMMs read every weight from global memory for each 32 tokens and scale every
//! half-block's sum in f32, which costs more than dequantizing the weights once and
//! multiplying densely: 5.2 against 3.6 ms for 512 tokens of the default model's shape,
//! 154 against 26 ms for an 8B model's (`candela doctor --prefill`, docs/gpu.md).

use super::*;
use crate::engine::model::batch_plan::{self, SeqRecord, WideShape, BLAS_WORKSPACE, WIDE_ROWS};
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;

/// Rows a `quant_rows` block takes, and a GEMM block's weight rows and token rows
/// (`PF_ROWS`, `GEMM_ROWS`, `GEMM_TOKS` in prefill.cuh).
const PF_ROWS: usize = 8;
const GEMM_ROWS: usize = 64;
const GEMM_TOKS: usize = 32;
/// Query rows a flash block takes (`BQ` in flash.cu).
const FLASH_ROWS: usize = 64;

/// The wide-prefill kernels (loaded where the card and the model's head size allow).
pub(super) struct WideFuncs {
    /// By kind (`Pack` order).
    quant: [CudaFunction; 4],
    /// `[kind][mode]` (store, add, swiglu).
    gemm: [[CudaFunction; 3]; 4],
    q_rope: CudaFunction,
    flash: CudaFunction,
    /// The f16 GEMM path's kernels: rows to f16, dequantization by kind, SwiGLU, bias.
    wh_rows: CudaFunction,
    wh_dequant: [CudaFunction; 4],
    wh_swiglu: CudaFunction,
    wh_bias: CudaFunction,
}

impl WideFuncs {
    /// The kernels from the decode module and the flash module, or None when this card
    /// (below compute capability 8.0) or head size (not 64 or 128) has none.
    pub(super) fn load(
        module: &Arc<candle_core::cuda_backend::cudarc::driver::CudaModule>,
        context: &Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
        head_dim: usize,
    ) -> Result<Option<Self>> {
        let major = context.compute_capability().map_err(err)?.0;
        if major < 8 || !matches!(head_dim, 64 | 128) {
            return Ok(None);
        }
        let load = |name: &str| module.load_function(name).map_err(err);
        // By kind, in `Pack` order.
        let kinds = ["q4_0", "q4_1", "q8_0", "q4_k"];
        let quant = [
            load(&format!("quant_rows_{}", kinds[0]))?,
            load(&format!("quant_rows_{}", kinds[1]))?,
            load(&format!("quant_rows_{}", kinds[2]))?,
            load(&format!("quant_rows_{}", kinds[3]))?,
        ];
        let gemm = [
            modes(module, &format!("gemm_{}", kinds[0]))?,
            modes(module, &format!("gemm_{}", kinds[1]))?,
            modes(module, &format!("gemm_{}", kinds[2]))?,
            modes(module, &format!("gemm_{}", kinds[3]))?,
        ];
        let flash_module = context
            .load_module(candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_src(
                flash::PTX,
            ))
            .map_err(err)?;
        let flash = flash_module
            .load_function(&format!("flash_prefill_{head_dim}"))
            .map_err(err)?;
        let wh_dequant = [
            load(&format!("wh_dequant_{}", kinds[0]))?,
            load(&format!("wh_dequant_{}", kinds[1]))?,
            load(&format!("wh_dequant_{}", kinds[2]))?,
            load(&format!("wh_dequant_{}", kinds[3]))?,
        ];
        Ok(Some(Self {
            quant,
            gemm,
            q_rope: load("q_rope_rows")?,
            flash,
            wh_rows: load("wh_rows")?,
            wh_dequant,
            wh_swiglu: load("wh_swiglu")?,
            wh_bias: load("wh_bias")?,
        }))
    }
}

/// A projection's epilogue: store (plus the bias at this address unless 0), add to the
/// output (the residual stream), or SwiGLU of gate and up rows.
#[derive(Clone, Copy)]
enum Proj {
    Store(u64),
    Add,
    SwiGlu,
}

/// A projection's input rows: these floats (RMS-normalized by the weights at the second
/// address unless 0), or the pass's SwiGLU output (the down projection's input: f32 in
/// `WideI8::act` for the int8 GEMMs, f16 in `WideF16::act` for the f16 ones).
#[derive(Clone, Copy)]
enum Src {
    Rows(u64, u64),
    SwiGlu,
}

/// One sequence's rows of a wide pass: rows `row..row + n` at positions `pos..pos + n` of
/// the cache whose layer pointers are `kv` (capacity `cap`).
struct PassSeg<'a> {
    row: usize,
    pos: usize,
    n: usize,
    kv: &'a [(u64, u64)],
    cap: usize,
}

/// Device buffers of a wide pass, for `cap` rows (sizes from `WideShape::buffers`).
pub(super) struct Wide {
    cap: usize,
    x: Buf<f32>,
    qkv: Buf<f32>,
    qr: Buf<f32>,
    att: Buf<f32>,
    step: Buf<u64>,
    /// Each GEMM kind's own buffers, made on its first pass.
    i8: Option<WideI8>,
    f16: Option<WideF16>,
}

/// Buffers of the int8 GEMM path: the SwiGLU output in f32, quantized activations (rows
/// of the widest input) and their block pairs.
pub(super) struct WideI8 {
    act: Buf<f32>,
    xq: Buf<u8>,
    xds: Buf<f32>,
}

/// Buffers of the f16 GEMM path: input rows in f16 (rows of the widest input), one
/// dequantized weight matrix (room for the largest), gate|up outputs in f32 and SwiGLU's
/// in f16.
pub(super) struct WideF16 {
    xh: Buf<u16>,
    w: Buf<u16>,
    gu: Buf<f32>,
    act: Buf<u16>,
}

impl Inner {
    /// Whether this decoder prefills long chunks wide.
    pub(super) fn has_wide(&self) -> bool {
        self.wide_f.is_some()
    }

    /// The model's shapes as the wide buffers need them.
    pub(super) fn wide_shape(&self) -> WideShape {
        let cfg = &self.cfg;
        WideShape {
            hidden: cfg.hidden,
            q: cfg.n_heads * cfg.head_dim,
            kv: cfg.n_kv_heads * cfg.head_dim,
            ffn: self.layers.first().map_or(0, |l| l.gate_up.n / 2),
            n_layers: cfg.n_layers,
            largest: (self.layers.iter())
                .flat_map(|l| l.qkv.iter().chain([&l.wo, &l.gate_up, &l.down]))
                .map(|m| m.n * m.k)
                .max()
                .unwrap_or(0),
        }
    }

    /// Run `tokens` after the positions of `cache` (reserved past the end; not committed)
    /// in wide passes: the logits of the last token as host floats (`prefill_wide_packed`
    /// for one sequence).
    pub(super) fn prefill_wide(&mut self, tokens: &[u32], cache: &SeqCache) -> Result<Vec<f32>> {
        let mut out = self.prefill_wide_packed(&[(tokens, cache)])?;
        out.pop()
            .ok_or_else(|| err("no logits from the wide prefill"))
    }

    /// The logits of row `row` of the last wide pass (its final norm and the vocabulary
    /// projection), as host floats.
    fn pass_logits(&self, row: usize) -> Result<Vec<f32>> {
        let w = self.wide.as_ref().ok_or_else(|| err("no wide buffers"))?;
        let x = w.x.ptr + 4 * (row * self.cfg.hidden) as u64;
        self.matvec(&self.output, 0, x, self.out_norm.ptr, 0, self.logits.ptr)?;
        let mut out = vec![0f32; self.output.n];
        self.stream
            .memcpy_dtoh(&self.logits.slice, &mut out)
            .map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        Ok(out)
    }

    /// Several sequences' prompt chunks (`(tokens, cache)`, each after its cache's
    /// positions, reserved past the end; not committed) packed into shared wide passes
    /// (`batch_plan::wide_passes`): every projection multiplies all their rows at once,
    /// RoPE and attention run per sequence. The logits of each chunk's last token as
    /// host floats, in order.
    pub(super) fn prefill_wide_packed(
        &mut self,
        seqs: &[(&[u32], &SeqCache)],
    ) -> Result<Vec<Vec<f32>>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        if self.wide_f.is_none() {
            return Err(err("no wide prefill on this card"));
        }
        let mut kvs = Vec::with_capacity(seqs.len());
        for &(tokens, cache) in seqs {
            if tokens.is_empty() || cache.len() + tokens.len() > cache.capacity() {
                return Err(err("cache has no room for the prompt"));
            }
            kvs.push(self.cache_ptrs(cache)?);
        }
        self.after_candle()?;
        let nl = self.cfg.n_layers;
        let lens: Vec<usize> = seqs.iter().map(|(t, _)| t.len()).collect();
        let mut out = vec![Vec::new(); seqs.len()];
        for pass in batch_plan::wide_passes(&lens, WIDE_ROWS) {
            let rows: usize = pass.iter().map(|s| s.n).sum();
            self.ensure_wide(rows)?;
            let mut recs = Vec::with_capacity(rows);
            let mut segs = Vec::with_capacity(pass.len());
            for s in &pass {
                let (tokens, cache) = seqs[s.seq];
                let (pos, cap) = (cache.len() + s.start, cache.capacity());
                recs.extend((0..s.n).map(|j| SeqRecord {
                    token: tokens[s.start + j],
                    pos: pos + j,
                    cap,
                    kv: kvs[s.seq].clone(),
                }));
                segs.push(PassSeg {
                    row: s.row,
                    pos,
                    n: s.n,
                    kv: &kvs[s.seq],
                    cap,
                });
            }
            let w = self.wide.as_mut().ok_or_else(|| err("no wide buffers"))?;
            batch::upload_step(
                &self.stream,
                &mut self.words,
                &recs,
                rows,
                nl,
                &mut w.step.slice,
            )?;
            self.wide_pass(rows, &segs)?;
            // The logits of each chunk that ends in this pass, before the next pass
            // overwrites its rows.
            for s in pass.iter().filter(|s| s.start + s.n == lens[s.seq]) {
                out[s.seq] = self.pass_logits(s.row + s.n - 1)?;
            }
        }
        self.steps += 1;
        Ok(out)
    }

    /// Buffers for passes of `rows` positions, with the current GEMM kind's (and the
    /// cuBLAS handle for the f16 GEMMs).
    fn ensure_wide(&mut self, rows: usize) -> Result<()> {
        let shape = self.wide_shape();
        if self.wide.as_ref().is_none_or(|w| w.cap < rows) {
            let rows = rows.max(self.wide.as_ref().map_or(0, |w| w.cap));
            self.wide = None;
            let b = shape.buffers(rows);
            let s = &self.stream;
            self.wide = Some(Wide {
                cap: rows,
                x: zeros(s, b.x)?,
                qkv: zeros(s, b.qkv)?,
                qr: zeros(s, b.qr)?,
                att: zeros(s, b.att)?,
                step: upload(s, &vec![0u64; b.step])?,
                i8: None,
                f16: None,
            });
        }
        let f16 = self.wide_gemm.get() == WideGemm::F16;
        if f16 && self.blas.is_none() {
            let blas = CudaBlas::new(self.stream.clone()).map_err(err)?;
            // Our own workspace (after the stream: setting one resets it to the library's).
            let ws = alloc_zeros::<u8>(&self.stream, BLAS_WORKSPACE)?;
            // SAFETY: `ws` holds BLAS_WORKSPACE bytes and lives in `self` as long as the
            // handle (dropped after it).
            unsafe {
                candle_core::cuda_backend::cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ws.ptr as *mut c_void,
                    BLAS_WORKSPACE,
                )
            }
            .result()
            .map_err(err)?;
            self.blas = Some(blas);
            self.blas_ws = Some(ws);
        }
        let (s, Some(w)) = (&self.stream, self.wide.as_mut()) else {
            return Ok(());
        };
        let b = shape.buffers(w.cap);
        if f16 && w.f16.is_none() {
            w.f16 = Some(WideF16 {
                xh: alloc_zeros(s, b.xh)?,
                w: alloc_zeros(s, b.w)?,
                gu: alloc_zeros(s, b.gu)?,
                act: alloc_zeros(s, b.act_h)?,
            });
        } else if !f16 && w.i8.is_none() {
            w.i8 = Some(WideI8 {
                act: zeros(s, b.act)?,
                xq: upload(s, &vec![0u8; b.xq])?,
                xds: zeros(s, b.xds)?,
            });
        }
        Ok(())
    }

    /// One pass of `n` rows, the sequences' rows `segs` (the step buffer written): the
    /// projections over all rows, RoPE and attention sequence by sequence.
    fn wide_pass(&self, n: usize, segs: &[PassSeg<'_>]) -> Result<()> {
        let w = self.wide.as_ref().ok_or_else(|| err("no wide buffers"))?;
        let f = self.wide_f.as_ref().ok_or_else(|| err("no wide kernels"))?;
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let nq = cfg.n_heads * hd;
        let qkv_w = nq + 2 * cfg.n_kv_heads * hd;
        let ffn = self.layers.first().map_or(0, |l| l.gate_up.n / 2);
        self.embed_rows(w.step.ptr, w.x.ptr, n)?;
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            let mut row = 0usize;
            for m in &l.qkv {
                let bias = l.qkv_bias.as_ref().map_or(0, |b| b.ptr + 4 * row as u64);
                let out = w.qkv.ptr + 4 * row as u64;
                let (x, norm) = (w.x.ptr, l.attn_norm.ptr);
                let p = Proj::Store(bias);
                self.wide_proj(f, w, m, p, n, Src::Rows(x, norm), out, qkv_w)?;
                row += m.n;
            }
            let h = self.rope_head(w.qkv.ptr, w.step.ptr, li)?;
            self.kv_write(&h, n, false)?;
            let qkv_wi = qkv_w as i32;
            let n_rep = (cfg.n_heads / cfg.n_kv_heads) as i32;
            for seg in segs {
                let (posi, ni) = (seg.pos as i32, seg.n as i32);
                let qkv = w.qkv.ptr + 4 * (seg.row * qkv_w) as u64;
                let qr = w.qr.ptr + 4 * (seg.row * nq) as u64;
                let att = w.att.ptr + 4 * (seg.row * nq) as u64;
                let mut args = [
                    arg(&qkv),
                    arg(&qkv_wi),
                    arg(&posi),
                    arg(&h.nh),
                    arg(&h.hd),
                    arg(&h.cos),
                    arg(&h.sin),
                    arg(&h.neox),
                    arg(&qr),
                ];
                // SAFETY: matches `q_rope_rows`; qkv and qr hold the segment's rows.
                unsafe {
                    self.go2(
                        &f.q_rope,
                        (cfg.n_heads as u32, seg.n as u32),
                        64,
                        0,
                        &mut args,
                        false,
                    )?
                }
                let len = (seg.pos + seg.n) as i32;
                let (zero, hs) = (0i32, (seg.cap * hd) as i64);
                let (q_row, q_head) = (nq as i32, h.hd);
                let (kp, vp) = seg.kv[li];
                let mut args = [
                    arg(&qr),
                    arg(&kp),
                    arg(&vp),
                    arg(&att),
                    arg(&ni),
                    arg(&n_rep),
                    arg(&len),
                    arg(&posi),
                    arg(&zero),
                    arg(&zero),
                    arg(&hs),
                    arg(&scale),
                    arg(&q_row),
                    arg(&q_head),
                ];
                let blocks = (seg.n * cfg.n_heads / cfg.n_kv_heads).div_ceil(FLASH_ROWS) as u32;
                // SAFETY: matches `flash_prefill_{64,128}`; the cache holds pos + n rows.
                unsafe {
                    self.go2(
                        &f.flash,
                        (blocks, cfg.n_kv_heads as u32),
                        128,
                        0,
                        &mut args,
                        false,
                    )?
                }
            }
            let (x, att, d) = (w.x.ptr, w.att.ptr, cfg.hidden);
            self.wide_proj(f, w, &l.wo, Proj::Add, n, Src::Rows(att, 0), x, d)?;
            let norm = l.ffn_norm.ptr;
            let src = Src::Rows(x, norm);
            // SwiGLU's output goes to the GEMM kind's own buffer.
            self.wide_proj(f, w, &l.gate_up, Proj::SwiGlu, n, src, 0, ffn)?;
            self.wide_proj(f, w, &l.down, Proj::Add, n, Src::SwiGlu, x, d)?;
        }
        Ok(())
    }

    /// Dequantize `m` into the f16 matrix at `out`.
    fn wide_dequant(&self, f: &WideFuncs, m: &QMat, out: u64) -> Result<()> {
        let (nn, nb) = (m.n as i32, (m.k / 32) as i32);
        let mut args = [arg(&m.qs), arg(&m.dm), arg(&nn), arg(&nb), arg(&out)];
        let blocks = (m.n * m.k / 32).div_ceil(256) as u32;
        let f = &f.wh_dequant[m.kind as usize];
        // SAFETY: matches `wh_dequant_*`; out has room for the largest matrix.
        unsafe { self.go2(f, (blocks, 1), 256, 0, &mut args, false) }
    }

    /// One projection of a pass: `out` (rows `ld` floats apart; unused for SwiGLU, which
    /// writes the down projection's input) from `n` rows of `src` and `m`, by the pass's
    /// GEMM.
    #[allow(clippy::too_many_arguments)]
    fn wide_proj(
        &self,
        f: &WideFuncs,
        w: &Wide,
        m: &QMat,
        proj: Proj,
        n: usize,
        src: Src,
        out: u64,
        ld: usize,
    ) -> Result<()> {
        let Some(h) = (w.f16.as_ref()).filter(|_| self.wide_gemm.get() == WideGemm::F16) else {
            let q = w.i8.as_ref().ok_or_else(|| err("no int8 wide buffers"))?;
            let (mode, bias, out) = match proj {
                Proj::Store(bias) => (0, bias, out),
                Proj::Add => (1, 0, out),
                Proj::SwiGlu => (2, 0, q.act.ptr),
            };
            let (x, norm) = match src {
                Src::Rows(x, norm) => (x, norm),
                Src::SwiGlu => (q.act.ptr, 0),
            };
            self.wide_quant(f, q, m, n, x, norm)?;
            return self.wide_gemm(f, q, m, mode, n, bias, out, ld);
        };
        // The input rows in f16 (SwiGLU's output already is).
        let input = if let Src::Rows(x, norm) = src {
            let (k, eps) = (m.k as i32, self.cfg.rms_eps as f32);
            let mut args = [arg(&x), arg(&norm), arg(&eps), arg(&k), arg(&h.xh.ptr)];
            // SAFETY: matches `wh_rows`; x holds n rows of m.k floats, xh room for them.
            unsafe { self.go2(&f.wh_rows, (n as u32, 1), 256, 0, &mut args, false)? };
            h.xh.ptr
        } else {
            h.act.ptr
        };
        let (c, ldc) = match proj {
            Proj::SwiGlu => (h.gu.ptr, m.n),
            _ => (out, ld),
        };
        self.wide_dequant(f, m, h.w.ptr)?;
        self.wide_blas(m, h.w.ptr, input, n, c, ldc, matches!(proj, Proj::Add))?;
        self.wide_epilogue(f, h, m, proj, n, out, ld)
    }

    /// `c` (`n` rows `ldc` floats apart; added to with `add`) from the f16 rows `input`
    /// and the dequantized f16 matrix `w` of `m`'s shape, by cuBLAS.
    #[allow(clippy::too_many_arguments)]
    fn wide_blas(
        &self,
        m: &QMat,
        w: u64,
        input: u64,
        n: usize,
        c: u64,
        ldc: usize,
        add: bool,
    ) -> Result<()> {
        let blas = self.blas.as_ref().ok_or_else(|| err("no cuBLAS handle"))?;
        let alpha = 1f32;
        let beta = if add { 1f32 } else { 0f32 };
        use candle_core::cuda_backend::cudarc::cublas::{result as br, sys as bs};
        let f16t = bs::cudaDataType::CUDA_R_16F;
        // Column-major: C (m.n x n, ldc) = W^T (W: m.k x m.n, the f16 rows) * X (m.k x n).
        // SAFETY: the pointers hold the sizes named: w m.n rows of m.k, the input n rows of
        // m.k halves, C n rows `ldc` floats apart; alpha and beta outlive the call.
        unsafe {
            br::gemm_ex(
                *blas.handle(),
                bs::cublasOperation_t::CUBLAS_OP_T,
                bs::cublasOperation_t::CUBLAS_OP_N,
                m.n as i32,
                n as i32,
                m.k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                f16t,
                m.k as i32,
                input as *const c_void,
                f16t,
                m.k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                bs::cudaDataType::CUDA_R_32F,
                ldc as i32,
                bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(err)
    }

    /// What follows a projection's product: the Q|K|V bias, or SwiGLU of the gate|up
    /// output into the down projection's f16 input.
    #[allow(clippy::too_many_arguments)]
    fn wide_epilogue(
        &self,
        f: &WideFuncs,
        h: &WideF16,
        m: &QMat,
        proj: Proj,
        n: usize,
        out: u64,
        ld: usize,
    ) -> Result<()> {
        match proj {
            Proj::Store(bias) if bias != 0 => {
                let (ldi, rows) = (ld as i32, m.n as i32);
                let mut args = [arg(&out), arg(&ldi), arg(&bias), arg(&rows)];
                let grid = (m.n.div_ceil(256) as u32, n as u32);
                // SAFETY: matches `wh_bias`; out holds n rows of ld floats, bias m.n.
                unsafe { self.go2(&f.wh_bias, grid, 256, 0, &mut args, false) }
            }
            Proj::SwiGlu => {
                let ff = (m.n / 2) as i32;
                let mut args = [arg(&h.gu.ptr), arg(&ff), arg(&h.act.ptr)];
                let grid = ((m.n / 2).div_ceil(256) as u32, n as u32);
                // SAFETY: matches `wh_swiglu`; gu holds n rows of m.n floats, act of m.n / 2.
                unsafe { self.go2(&f.wh_swiglu, grid, 256, 0, &mut args, false) }
            }
            _ => Ok(()),
        }
    }

    /// Quantize `n` rows of `x` (`m.k` floats each; RMS-normalized by `norm` unless 0)
    /// for `m`'s kind into the wide buffers.
    fn wide_quant(
        &self,
        f: &WideFuncs,
        w: &WideI8,
        m: &QMat,
        n: usize,
        x: u64,
        norm: u64,
    ) -> Result<()> {
        let eps = self.cfg.rms_eps as f32;
        let (k, t) = (m.k as i32, n as i32);
        let mut args = [
            arg(&x),
            arg(&norm),
            arg(&eps),
            arg(&k),
            arg(&t),
            arg(&w.xq.ptr),
            arg(&w.xds.ptr),
        ];
        let blocks = n.div_ceil(PF_ROWS) as u32;
        // SAFETY: matches `quant_rows_*`; xq and xds hold n rows of the widest input.
        unsafe {
            self.go2(
                &f.quant[m.kind as usize],
                (blocks, 1),
                256,
                0,
                &mut args,
                false,
            )
        }
    }

    /// `out` (rows `ld` floats apart) from the quantized rows and `m` with `mode`'s
    /// epilogue (0 store + `bias` unless 0, 1 add, 2 SwiGLU).
    #[allow(clippy::too_many_arguments)]
    fn wide_gemm(
        &self,
        f: &WideFuncs,
        w: &WideI8,
        m: &QMat,
        mode: usize,
        n: usize,
        bias: u64,
        out: u64,
        ld: usize,
    ) -> Result<()> {
        let rows = if mode == 2 { m.n / 2 } else { m.n };
        let (k, t, nn, ldi) = (m.k as i32, n as i32, m.n as i32, ld as i32);
        let mut args = [
            arg(&w.xq.ptr),
            arg(&w.xds.ptr),
            arg(&k),
            arg(&t),
            arg(&m.qs),
            arg(&m.dm),
            arg(&bias),
            arg(&nn),
            arg(&out),
            arg(&ldi),
        ];
        let grid = (
            rows.div_ceil(GEMM_ROWS) as u32,
            n.div_ceil(GEMM_TOKS) as u32,
        );
        // SAFETY: matches `gemm_*` (GEMM_ENTRY); out holds n rows of `ld` floats.
        unsafe {
            self.go2(
                &f.gemm[m.kind as usize][mode],
                grid,
                128,
                0,
                &mut args,
                false,
            )
        }
    }
}

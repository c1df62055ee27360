//! Wide prefill: a long prompt chunk of one sequence in passes of up to [`WIDE_ROWS`]
//! positions, each projection one int8 tensor-core GEMM over all the pass's rows
//! (`prefill.cuh`: the activations quantized once, then `gemm_*`), the attention flash
//! style over the cache (`flash.cu`). Launched directly (no graph: a pass is long enough
//! that launches do not matter); needs compute capability 8.0 and heads of 64 or 128.

use super::*;
use crate::engine::model::batch_plan::{self, SeqRecord};

/// Positions of one wide pass at most; longer chunks run in several passes, each
/// attending to the cache the earlier ones wrote.
pub(super) const WIDE_ROWS: usize = 1024;
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
        Ok(Some(Self {
            quant,
            gemm,
            q_rope: load("q_rope_rows")?,
            flash,
        }))
    }
}

/// Device buffers of a wide pass, for `cap` rows.
pub(super) struct Wide {
    cap: usize,
    x: Buf<f32>,
    qkv: Buf<f32>,
    qr: Buf<f32>,
    att: Buf<f32>,
    act: Buf<f32>,
    /// Quantized activations (rows of the widest input) and their block pairs.
    xq: Buf<u8>,
    xds: Buf<f32>,
    step: Buf<u64>,
}

impl Inner {
    /// Whether this decoder prefills long chunks wide.
    pub(super) fn has_wide(&self) -> bool {
        self.wide_f.is_some()
    }

    /// Run `tokens` after position `pos0` of `cache` (filled up to it, reserved past the
    /// end; not committed) in wide passes: the logits of the last token as host floats.
    pub(super) fn prefill_wide(
        &mut self,
        tokens: &[u32],
        cache: &SeqCache,
        pos0: usize,
    ) -> Result<Vec<f32>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        if self.wide_f.is_none() {
            return Err(err("no wide prefill on this card"));
        }
        let cap = cache.capacity();
        if tokens.is_empty() || pos0 + tokens.len() > cap {
            return Err(err("cache has no room for the prompt"));
        }
        let kv = self.cache_ptrs(cache)?;
        self.after_candle()?;
        let nl = self.cfg.n_layers;
        let mut last = 0;
        for (i, part) in tokens.chunks(WIDE_ROWS).enumerate() {
            let pos = pos0 + i * WIDE_ROWS;
            let n = part.len();
            self.ensure_wide(n)?;
            let recs: Vec<SeqRecord> = part
                .iter()
                .enumerate()
                .map(|(j, &token)| SeqRecord {
                    token,
                    pos: pos + j,
                    cap,
                    kv: kv.clone(),
                })
                .collect();
            let w = self.wide.as_mut().ok_or_else(|| err("no wide buffers"))?;
            batch::upload_step(
                &self.stream,
                &mut self.words,
                &recs,
                n,
                nl,
                &mut w.step.slice,
            )?;
            self.wide_pass(n, pos, &kv, cap)?;
            last = n;
        }
        let w = self.wide.as_ref().ok_or_else(|| err("no wide buffers"))?;
        let x_last = w.x.ptr + 4 * ((last - 1) * self.cfg.hidden) as u64;
        self.matvec(
            &self.output,
            0,
            x_last,
            self.out_norm.ptr,
            0,
            self.logits.ptr,
        )?;
        let mut out = vec![0f32; self.output.n];
        self.stream
            .memcpy_dtoh(&self.logits.slice, &mut out)
            .map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        self.steps += 1;
        Ok(out)
    }

    fn ensure_wide(&mut self, rows: usize) -> Result<()> {
        if self.wide.as_ref().is_some_and(|w| w.cap >= rows) {
            return Ok(());
        }
        let rows = rows.max(self.wide.as_ref().map_or(0, |w| w.cap));
        self.wide = None;
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let nq = cfg.n_heads * hd;
        let ffn = self.layers.first().map_or(0, |l| l.gate_up.n / 2);
        let kmax = cfg.hidden.max(nq).max(ffn);
        let s = &self.stream;
        self.wide = Some(Wide {
            cap: rows,
            x: zeros(s, rows * cfg.hidden)?,
            qkv: zeros(s, rows * (nq + 2 * cfg.n_kv_heads * hd))?,
            qr: zeros(s, rows * nq)?,
            att: zeros(s, rows * nq)?,
            act: zeros(s, rows * ffn)?,
            xq: upload(s, &vec![0u8; rows * kmax])?,
            xds: zeros(s, rows * 2 * (kmax / 32))?,
            step: upload(s, &vec![0u64; batch_plan::step_words(rows, cfg.n_layers)])?,
        });
        Ok(())
    }

    /// One pass of `n` rows at positions `pos..pos + n` (the step buffer written).
    fn wide_pass(&self, n: usize, pos: usize, kv: &[(u64, u64)], cap: usize) -> Result<()> {
        let w = self.wide.as_ref().ok_or_else(|| err("no wide buffers"))?;
        let f = self.wide_f.as_ref().ok_or_else(|| err("no wide kernels"))?;
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let nq = cfg.n_heads * hd;
        let qkv_w = nq + 2 * cfg.n_kv_heads * hd;
        let ffn = self.layers.first().map_or(0, |l| l.gate_up.n / 2);
        let ni = n as i32;
        self.embed_rows(w.step.ptr, w.x.ptr, n)?;
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            let mut row = 0usize;
            for m in &l.qkv {
                let bias = l.qkv_bias.as_ref().map_or(0, |b| b.ptr + 4 * row as u64);
                self.wide_quant(f, w, m, n, w.x.ptr, l.attn_norm.ptr)?;
                let out = w.qkv.ptr + 4 * row as u64;
                self.wide_gemm(f, w, m, 0, n, bias, out, qkv_w)?;
                row += m.n;
            }
            let h = self.rope_head(w.qkv.ptr, w.step.ptr, li)?;
            self.kv_write(&h, n, false)?;
            let (qkv_wi, posi) = (qkv_w as i32, pos as i32);
            let mut args = [
                arg(&w.qkv.ptr),
                arg(&qkv_wi),
                arg(&posi),
                arg(&h.nh),
                arg(&h.hd),
                arg(&h.cos),
                arg(&h.sin),
                arg(&h.neox),
                arg(&w.qr.ptr),
            ];
            // SAFETY: matches `q_rope_rows`; qkv and qr hold n rows.
            unsafe {
                self.go2(
                    &f.q_rope,
                    (cfg.n_heads as u32, n as u32),
                    64,
                    0,
                    &mut args,
                    false,
                )?
            }
            let n_rep = (cfg.n_heads / cfg.n_kv_heads) as i32;
            let len = (pos + n) as i32;
            let (zero, hs) = (0i32, (cap * hd) as i64);
            let (q_row, q_head) = (nq as i32, h.hd);
            let (kp, vp) = kv[li];
            let mut args = [
                arg(&w.qr.ptr),
                arg(&kp),
                arg(&vp),
                arg(&w.att.ptr),
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
            let blocks = (n * cfg.n_heads / cfg.n_kv_heads).div_ceil(FLASH_ROWS) as u32;
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
            self.wide_quant(f, w, &l.wo, n, w.att.ptr, 0)?;
            self.wide_gemm(f, w, &l.wo, 1, n, 0, w.x.ptr, cfg.hidden)?;
            self.wide_quant(f, w, &l.gate_up, n, w.x.ptr, l.ffn_norm.ptr)?;
            self.wide_gemm(f, w, &l.gate_up, 2, n, 0, w.act.ptr, ffn)?;
            self.wide_quant(f, w, &l.down, n, w.act.ptr, 0)?;
            self.wide_gemm(f, w, &l.down, 1, n, 0, w.x.ptr, cfg.hidden)?;
        }
        Ok(())
    }

    /// Quantize `n` rows of `x` (`m.k` floats each; RMS-normalized by `norm` unless 0)
    /// for `m`'s kind into the wide buffers.
    fn wide_quant(
        &self,
        f: &WideFuncs,
        w: &Wide,
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
        w: &Wide,
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

//! One decode step on the GPU: write the step's parameters, replay the captured graph
//! (capturing it on first use), copy the logits back; and the per-kernel timings that
//! `candela doctor` reports.

use super::*;

impl Inner {
    /// Run `tokens` one at a time from position `pos0` of `cache` (filled up to it).
    pub(super) fn run(
        &mut self,
        tokens: &[u32],
        cache: &SeqCache,
        pos0: usize,
        all: bool,
    ) -> Result<Vec<f32>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        let kv = self.cache_ptrs(cache)?;
        self.after_candle()?;
        self.run_kv(tokens, &kv, cache.capacity(), pos0, all)
    }

    /// [`Self::run`] for a cache whose layer pointers `kv` (of capacity `cap`) were read
    /// and whose candle writes were waited for already (the context bound).
    pub(super) fn run_kv(
        &mut self,
        tokens: &[u32],
        kv: &[(u64, u64)],
        cap: usize,
        pos0: usize,
        all: bool,
    ) -> Result<Vec<f32>> {
        if pos0 + tokens.len() > cap {
            return Err(err("cache has no room"));
        }
        let vocab = self.output.n;
        let mut out = Vec::with_capacity(if all { tokens.len() * vocab } else { vocab });
        for (i, &t) in tokens.iter().enumerate() {
            self.words.clear();
            self.words.extend([t as u64, (pos0 + i) as u64, cap as u64]);
            self.words.extend(kv.iter().map(|&(k, _)| k));
            self.words.extend(kv.iter().map(|&(_, v)| v));
            self.stream
                .memcpy_htod(&self.words, &mut self.step.slice)
                .map_err(err)?;
            self.launch_step()?;
            self.steps += 1;
            // The last token's logits always come back, so the stream is idle after.
            if all || i + 1 == tokens.len() {
                self.stream
                    .memcpy_dtoh(&self.logits.slice, &mut self.host_logits)
                    .map_err(err)?;
                self.stream.synchronize().map_err(err)?;
                out.extend_from_slice(&self.host_logits.as_slice().map_err(err)?[..vocab]);
            }
        }
        Ok(out)
    }

    /// Microseconds per decode step at position `pos` of `cache` (reserved past it; the
    /// same slot rewritten every time): (the step's graph replayed back to back — the
    /// device's time, the launches overlapping — and whole steps as `run` takes them:
    /// the step buffer's upload, the replay, the logits' copy and the wait for them).
    pub(super) fn bench_step(&mut self, cache: &SeqCache, pos: usize) -> Result<(f64, f64)> {
        const REPS: usize = 50;
        self.run(&[0], cache, pos, false)?; // captures the graph, uploads the step
        let t = std::time::Instant::now();
        for _ in 0..REPS {
            self.launch_step()?;
        }
        self.stream.synchronize().map_err(err)?;
        let graph = t.elapsed().as_secs_f64() * 1e6 / REPS as f64;
        let t = std::time::Instant::now();
        for _ in 0..REPS {
            self.run(&[0], cache, pos, false)?;
        }
        Ok((graph, t.elapsed().as_secs_f64() * 1e6 / REPS as f64))
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
            .ok_or_else(|| err("no graph after capture"))?
            .launch()
            .map_err(err)
    }

    pub(super) fn matvec(
        &self,
        m: &QMat,
        mode: usize,
        x: u64,
        norm: u64,
        bias: u64,
        out: u64,
    ) -> Result<()> {
        self.mv_launch(m, mode, Some((x, norm)), bias, out)
    }

    /// [`Self::matvec`] on the input `qact` quantized last.
    fn matvec_q(&self, m: &QMat, mode: usize, bias: u64, out: u64) -> Result<()> {
        self.mv_launch(m, mode, None, bias, out)
    }

    /// A mat-vec of `mode` into `out`: on the f32 input `(x, norm)` (each block
    /// normalizing when `norm` is nonzero and quantizing it), or with None on the input
    /// `qact` quantized once (`mvq_*`).
    fn mv_launch(
        &self,
        m: &QMat,
        mode: usize,
        input: Option<(u64, u64)>,
        bias: u64,
        out: u64,
    ) -> Result<()> {
        let rows = if mode == 2 { m.n / 2 } else { m.n };
        let warps = (MV_THREADS / 32) as usize;
        // A grid-stride loop over rows: at most a few blocks per SM (each quantizing the
        // activations once, or copying them in).
        let per_sm = match (self.mv_per_sm.get(), input) {
            (0, None) => batch_plan::MVQ_BLOCKS_PER_SM,
            (0, Some(_)) => batch_plan::mv_blocks_per_sm(m.k),
            (n, _) => n,
        };
        // The eight-part kernels take 4 rows a warp.
        let s8 = self
            .f
            .s8
            .as_ref()
            .filter(|_| self.sum8.get().applies(mode == 2));
        let rows_per_warp = if s8.is_some() { 4 } else { 1 };
        let blocks = rows.div_ceil(warps * rows_per_warp).min(self.sms * per_sm) as u32;
        let smem = (m.k + 8 * (m.k / 32)) as u32;
        let (k, n) = (m.k as i32, m.n as i32);
        let Some((x, norm)) = input else {
            let f = match s8 {
                Some(s8) => &s8.mvq[m.kind as usize][mode],
                None => &self.f.mvq[m.kind as usize][mode],
            };
            let q = if m.kind == Pack::Q8 {
                self.aq.ptr + self.aq_k as u64
            } else {
                self.aq.ptr
            };
            let mut args = [
                arg(&q),
                arg(&self.ads.ptr),
                arg(&k),
                arg(&m.qs),
                arg(&m.dm),
                arg(&bias),
                arg(&n),
                arg(&out),
            ];
            // SAFETY: argument types and order match `mvq_*` (`MATVEC_ENTRY`) in
            // decode.cu, as `mvq8_*`'s (`MATVEC8_ENTRY` in sum8.cuh) do; q and ads hold
            // the input `qact` wrote, every other pointer a live device allocation of the
            // sizes the kernel indexes.
            return unsafe { self.go(f, blocks, MV_THREADS, smem, &mut args, true) };
        };
        let f = match s8 {
            Some(s8) => &s8.mv[m.kind as usize][mode],
            None => &self.f.mv[m.kind as usize][mode],
        };
        let eps = self.cfg.rms_eps as f32;
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
        // SAFETY: argument types and order match `MATVEC_ENTRY` in decode.cu (and
        // `MATVEC8_ENTRY` in sum8.cuh); every pointer is a live device allocation of the
        // sizes the kernel indexes.
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
        // SAFETY: forwarded from the caller.
        unsafe { self.go2(f, (blocks, 1), threads, smem, args, dependent) }
    }

    /// [`Self::go`] with a two-dimensional grid `(x, y)`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type.
    pub(super) unsafe fn go2(
        &self,
        f: &CudaFunction,
        (blocks, blocks_y): (u32, u32),
        threads: u32,
        smem: u32,
        args: &mut [*mut c_void],
        dependent: bool,
    ) -> Result<()> {
        // SAFETY: CUlaunchAttribute is a plain C struct for which all-zero is valid.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.pdl && dependent;
        let lc = sys::CUlaunchConfig {
            gridDimX: blocks,
            gridDimY: blocks_y,
            gridDimZ: 1,
            blockDimX: threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        // SAFETY: the caller guarantees `args` match the kernel's parameters; the config
        // and attribute outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &lc,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
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
                // One launch per part, each writing its rows of the stacked output.
                let prequant = self.prequant(&l.qkv)?;
                if prequant {
                    self.qact(&l.qkv, self.x.ptr, l.attn_norm.ptr)?;
                }
                let mut row = 0u64;
                for m in &l.qkv {
                    let bias = l.qkv_bias.as_ref().map_or(0, |b| b.ptr + 4 * row);
                    let out = self.qkv.ptr + 4 * row;
                    if prequant {
                        self.matvec_q(m, 0, bias, out)?;
                    } else {
                        self.matvec(m, 0, self.x.ptr, l.attn_norm.ptr, bias, out)?;
                    }
                    row += m.n as u64;
                }
                Ok(())
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
                // Each head in `nch` blocks, one a position chunk (see `attend`).
                let nch = self.att_nch.get().min(self.att_max) as i32;
                let min_chunk = self.atc_chunk.get() as i32;
                // The tensor-core kernels take the least chunk length last; the per-head
                // kernel the arguments before it.
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
                    arg(&nch),
                    arg(&self.att_part.ptr),
                    arg(&self.att_cnt.ptr),
                    arg(&min_chunk),
                ];
                let n_args = args.len();
                // A block a query head, or on the tensor cores a KV group (its heads'
                // products together), each in `nch` position chunks.
                let (f, units, threads, smem, n_args) = match self.att_tc_launch() {
                    Some((tc, threads, smem)) => (&tc[0], cfg.n_kv_heads, threads, smem, n_args),
                    None => {
                        let threads = ATT_THREADS as u32;
                        let smem = ((3 * hd) as u32 + 8 * threads) * 4;
                        (&self.f.attention, cfg.n_heads, threads, smem, n_args - 1)
                    }
                };
                // SAFETY: matches `attention` (and `attention_tc*`, the same arguments and
                // the least chunk length);
                // the step buffer holds the cache pointers, att_part and att_cnt hold
                // `att_max >= nch` chunks for every head.
                unsafe {
                    self.go(
                        f,
                        (units * nch as usize) as u32,
                        threads,
                        smem,
                        &mut args[..n_args],
                        true,
                    )
                }
            }
            Op::Wo => self.project(&l.wo, 1, (self.att.ptr, 0), self.x.ptr),
            Op::GateUp => self.project(&l.gate_up, 2, (self.x.ptr, l.ffn_norm.ptr), self.act.ptr),
            Op::Down => self.project(&l.down, 1, (self.act.ptr, 0), self.x.ptr),
            Op::Output => self.project(
                &self.output,
                0,
                (self.x.ptr, self.out_norm.ptr),
                self.logits.ptr,
            ),
        }
    }

    /// One matrix's mat-vec of `mode` on the input `x` (normalized by `norm` when
    /// nonzero) into `out`: quantized once first (`qact`) where `prequant` says so, else
    /// by every block of the mat-vec.
    fn project(&self, m: &QMat, mode: usize, (x, norm): (u64, u64), out: u64) -> Result<()> {
        let parts = std::slice::from_ref(m);
        if self.prequant(parts)? {
            self.qact(parts, x, norm)?;
            self.matvec_q(m, mode, 0, out)
        } else {
            self.matvec(m, mode, x, norm, 0, out)
        }
    }

    /// Whether the mat-vecs of `parts` (one input) read activations quantized once by
    /// `qact` (`CANDELA_CUDA_MVQ=0|1` forces it; else `batch_plan::mv_prequant` by the
    /// input's length and the rows).
    fn prequant(&self, parts: &[QMat]) -> Result<bool> {
        let k = parts.first().map_or(0, |m| m.k);
        if parts.iter().any(|m| m.k != k) {
            return Err(err("mat-vec parts of one input differ in length"));
        }
        if k > self.aq_k {
            return Err(err("mat-vec input longer than the quantized-input buffer"));
        }
        let rows: usize = parts.iter().map(|m| m.n).sum();
        Ok(self
            .mv_q
            .get()
            .unwrap_or_else(|| batch_plan::mv_prequant(k, rows)))
    }

    /// Quantize the input `x` (normalized by `norm` when nonzero) once, into the layouts
    /// the kinds of `parts` read (`aq`: the nibble kinds' first, then Q8_0's; `ads` the
    /// scale pairs both share).
    fn qact(&self, parts: &[QMat], x: u64, norm: u64) -> Result<()> {
        let k = parts.first().map_or(0, |m| m.k);
        let nib = parts.iter().any(|m| m.kind != Pack::Q8);
        let q8 = parts.iter().any(|m| m.kind == Pack::Q8);
        let qn = if nib { self.aq.ptr } else { 0 };
        let q8p = if q8 {
            self.aq.ptr + self.aq_k as u64
        } else {
            0
        };
        let eps = self.cfg.rms_eps as f32;
        let ki = k as i32;
        let mut args = [
            arg(&x),
            arg(&norm),
            arg(&eps),
            arg(&ki),
            arg(&qn),
            arg(&q8p),
            arg(&self.ads.ptr),
        ];
        let (f, threads) = if self.qact_wide {
            (&self.f.qact_w, 1024)
        } else {
            (&self.f.qact, MV_THREADS)
        };
        // SAFETY: matches `qact` and `qact_w` in decode.cu (the same parameters); aq holds
        // two inputs of `aq_k >= k` bytes and ads `aq_k / 32` pairs.
        unsafe { self.go(f, 1, threads, 0, &mut args, true) }
    }

    /// Microseconds per launch of each kernel of the step, as a graph of `REPS` launches
    /// of it replays (so launch gaps count as they do in the step's graph), with the
    /// attention at position `pos` of `cache` (reserved past `pos`).
    pub(super) fn bench(&mut self, cache: &SeqCache, pos: usize) -> Result<Vec<(Op, f64)>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        let cap = cache.capacity();
        let kv = self.cache_ptrs(cache)?;
        if pos >= cap {
            return Err(err("bench position past the cache"));
        }
        self.words.clear();
        self.words.extend([0, pos as u64, cap as u64]);
        self.words.extend(kv.iter().map(|&(k, _)| k));
        self.words.extend(kv.iter().map(|&(_, v)| v));
        self.stream
            .memcpy_htod(&self.words, &mut self.step.slice)
            .map_err(err)?;
        self.time_ops(|s, op| s.launch(op, 0))
    }

    /// Microseconds per launch of each op of a step, `launch` captured `REPS` times in
    /// one graph and the graph replayed.
    pub(super) fn time_ops(
        &mut self,
        launch: impl Fn(&Self, Op) -> Result<()>,
    ) -> Result<Vec<(Op, f64)>> {
        const REPS: usize = 100;
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
                r = r.and_then(|_| launch(self, op));
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

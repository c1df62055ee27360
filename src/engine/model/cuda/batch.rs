//! The batched step: one pass of the model for several rows at once through the mat-mat
//! kernels of `batch.cuh` that read each weight row once for all of them — the tokens of
//! a decode step (one per sequence, each at its own position in its own cache), or a
//! prompt chunk of one sequence (consecutive positions of one cache: a prefill step). One
//! graph is captured per batch-size bucket (`batch_plan::BUCKETS`) and kind of step, and
//! replayed with the rows' tokens, positions and cache pointers written to a device
//! buffer first; the logits come back in one copy.

use super::*;
use crate::engine::model::batch_plan::{self, Logits, SeqRecord, StepKind};
use crate::engine::model::{HostRows, Logits as SeqLogits};
use candle_core::cuda_backend::cudarc::driver::PinnedHostSlice;

/// Dynamic shared memory a mat-mat block may use for quantized activations, where the
/// device allows that much (Hopper and Ampere do)...
pub(super) const MM_SMEM: usize = 96 << 10;
/// ...and where it does not: the default limit less the kernel's static scratch.
pub(super) const MM_SMEM_DEFAULT: usize = 44 << 10;
/// Dynamic shared memory the `mmq_*` kernels may take: a bucket of 8 columns of the
/// widest input (14,336 values and their scales: 140 KiB).
pub(super) const MMQ_SMEM: usize = 200 << 10;
/// Shared memory of one multiprocessor that blocks may divide among them (H100).
const SM_SMEM: usize = 227 << 10;
/// Caches whose layer pointers `cache_ptrs` remembers before it starts afresh.
const CACHE_MEMO_MAX: usize = 512;

/// Layer pointers of the caches stepped lately, by their first K tensor's id: each
/// layer's (K id, V id, K pointer, V pointer).
pub(super) type CacheMemo = std::collections::HashMap<
    candle_core::TensorId,
    Vec<(candle_core::TensorId, candle_core::TensorId, u64, u64)>,
>;

/// Device buffers of the batched step, sized for `cap` sequences, and the graphs
/// captured over them (by bucket).
pub(super) struct Batch {
    cap: usize,
    x: Buf<f32>,
    qkv: Buf<f32>,
    att: Buf<f32>,
    act: Buf<f32>,
    scores: Buf<f32>,
    /// Split attention's chunk results and tickets for `cap` rows (see `Inner::att_part`).
    att_part: Buf<f32>,
    att_cnt: Buf<f32>,
    logits: Buf<f32>,
    /// A mat-mat's activations quantized once a step (`qcols_*`): int8 values of
    /// `cap` rows of the widest input, then their scale pairs.
    pq: Buf<u8>,
    pds: Buf<f32>,
    /// Page-locked host copy of the logits (a pageable copy of a 32-row batch's 6 MB
    /// costs milliseconds), shared with the sequences of a decode step (`run_batch`)
    /// until they drop their rows.
    host: Arc<PinnedRows>,
    step: Buf<u64>,
    graphs: Vec<((usize, StepKind), CudaGraph)>,
}

/// A page-locked host buffer of logits rows, handed to the sequences of a step as it is.
pub(super) struct PinnedRows(PinnedHostSlice<f32>);

impl HostRows for PinnedRows {
    fn floats(&self) -> candle_core::Result<&[f32]> {
        self.0
            .as_slice()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// A page-locked buffer for `len` floats.
fn pinned_rows(stream: &CudaStream, len: usize) -> Result<Arc<PinnedRows>> {
    // SAFETY: every element read is written by a device copy first.
    let slice = unsafe {
        stream
            .context()
            .alloc_pinned_with_flags::<f32>(len, 0)
            .map_err(err)?
    };
    Ok(Arc::new(PinnedRows(slice)))
}

/// The host's time in the batched decode steps (`run_batch`), summed over `steps`.
#[derive(Default)]
pub(super) struct HostPhases {
    steps: u64,
    /// Cache pointers read; the step buffer uploaded and the graph launched; waiting for
    /// the GPU and the logits copy.
    spent: [std::time::Duration; 3],
}

impl HostPhases {
    fn add(&mut self, phase: usize, since: &mut std::time::Instant) {
        let now = std::time::Instant::now();
        self.spent[phase] += now - *since;
        *since = now;
    }

    /// (steps, µs a step of each phase).
    pub(super) fn per_step(&self) -> (u64, [f64; 3]) {
        let n = self.steps.max(1) as f64;
        (self.steps, self.spent.map(|d| d.as_secs_f64() * 1e6 / n))
    }
}

/// Fill `words` with the step buffer for `recs` (a `bucket`-record buffer, see
/// `batch_plan::fill_step`) and copy it to the device buffer `dst`.
pub(super) fn upload_step(
    stream: &Arc<CudaStream>,
    words: &mut Vec<u64>,
    recs: &[SeqRecord],
    bucket: usize,
    n_layers: usize,
    dst: &mut CudaSlice<u64>,
) -> Result<()> {
    batch_plan::fill_step(words, recs, bucket, n_layers).map_err(err)?;
    stream.memcpy_htod(&*words, dst).map_err(err)
}

/// The parameters `kv_write_b` and `attention_b` begin with (batch.cuh), kept as values
/// whose addresses a launch takes.
pub(super) struct RopeHead {
    pub(super) qkv: u64,
    pub(super) step: u64,
    pub(super) stride: i32,
    pub(super) layer: i32,
    pub(super) n_layers: i32,
    pub(super) nh: i32,
    pub(super) nkvh: i32,
    pub(super) hd: i32,
    pub(super) cos: u64,
    pub(super) sin: u64,
    pub(super) neox: i32,
}

impl RopeHead {
    /// Kernel arguments pointing into `self` (valid while it lives).
    pub(super) fn args(&self) -> [*mut c_void; 11] {
        [
            arg(&self.qkv),
            arg(&self.step),
            arg(&self.stride),
            arg(&self.layer),
            arg(&self.n_layers),
            arg(&self.nh),
            arg(&self.nkvh),
            arg(&self.hd),
            arg(&self.cos),
            arg(&self.sin),
            arg(&self.neox),
        ]
    }
}

impl Inner {
    /// Candle's writes (prefill, a cache that just grew) come before ours.
    pub(super) fn after_candle(&self) -> Result<()> {
        // SAFETY: both handles are live for the decoder's lifetime.
        unsafe {
            result::event::record(self.event, self.candle_stream.cu_stream()).map_err(err)?;
            result::stream::wait_event(
                self.stream.cu_stream(),
                self.event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(err)
        }
    }

    /// The per-layer (K, V) device pointers of a dense f16 device cache: remembered by
    /// its tensors' ids (a tensor keeps its memory while it lives, and a cache that grows
    /// or moves holds new tensors), read afresh for caches not seen before (reading one
    /// goes through the driver's event bookkeeping, ~60 calls a cache).
    pub(super) fn cache_ptrs(&self, cache: &SeqCache) -> Result<Vec<(u64, u64)>> {
        let layers = cache
            .dense_layers()
            .ok_or_else(|| err("cache is not a dense device cache"))?;
        if layers.len() != self.cfg.n_layers {
            return Err(err("cache does not fit the model"));
        }
        let key = layers.first().map(|(k, _)| k.id());
        let mut memo = self.cache_memo.borrow_mut();
        if let Some(seen) = key.and_then(|k| memo.get(&k)) {
            let same = seen.len() == layers.len()
                && seen
                    .iter()
                    .zip(&layers)
                    .all(|((ki, vi, ..), (k, v))| *ki == k.id() && *vi == v.id());
            if same {
                return Ok(seen.iter().map(|&(_, _, k, v)| (k, v)).collect());
            }
        }
        let mut kv = Vec::with_capacity(layers.len());
        for (k, v) in &layers {
            if k.dtype() != DType::F16 || !k.is_contiguous() || !v.is_contiguous() {
                return Err(err("cache tensors are not contiguous f16"));
            }
            kv.push((
                k.id(),
                v.id(),
                tensor_ptr(k, &self.candle_stream)?,
                tensor_ptr(v, &self.candle_stream)?,
            ));
        }
        let ptrs = kv.iter().map(|&(_, _, k, v)| (k, v)).collect();
        if let Some(key) = key {
            // Entries of caches gone are dropped wholesale now and then.
            if memo.len() >= CACHE_MEMO_MAX {
                memo.clear();
            }
            memo.insert(key, kv);
        }
        Ok(ptrs)
    }

    /// One step for `seqs` (token, position, cache): each cache gets its token's K/V at
    /// the position, and each sequence's logits row comes back as a row of the step's
    /// page-locked host buffer (shared by the rows; the next step copies into another
    /// while any is still held).
    pub(super) fn run_batch(&mut self, seqs: &[(u32, usize, &SeqCache)]) -> Result<Vec<SeqLogits>> {
        let mut at = std::time::Instant::now();
        self.stream.context().bind_to_thread().map_err(err)?;
        let mut recs = Vec::with_capacity(seqs.len());
        for &(t, pos, cache) in seqs {
            recs.push(SeqRecord {
                token: t,
                pos,
                cap: cache.capacity(),
                kv: self.cache_ptrs(cache)?,
            });
        }
        self.after_candle()?;
        self.phases.add(0, &mut at);
        let vocab = self.output.n;
        let mut out = Vec::with_capacity(recs.len());
        for (first, len) in batch_plan::split(recs.len()) {
            let bucket = batch_plan::bucket(len).ok_or_else(|| err("empty batch"))?;
            self.step_rows(&recs[first..first + len], bucket, StepKind::Decode)?;
            self.phases.add(1, &mut at);
            self.logits_back(len)?;
            self.phases.add(2, &mut at);
            let b = self.batch.as_ref().ok_or_else(|| err("no batch buffers"))?;
            let buf: Arc<dyn HostRows> = b.host.clone();
            out.extend(
                (0..len).map(|i| SeqLogits::shared(buf.clone(), i * vocab..(i + 1) * vocab, 1)),
            );
        }
        self.phases.steps += 1;
        Ok(out)
    }

    /// Prefill rows — `(token, position, cache)`, any number of sequences, each one's
    /// positions in order and its cache filled up to its first, with room past its last
    /// — in batched steps of whole buckets (`batch_plan::prefill_chunks`; a final single
    /// row through the single-stream step). Every row's K/V goes to its cache (not
    /// committed); the logits of the rows `want` marks come back in row order, the same
    /// bits as feeding each sequence's tokens one at a time.
    pub(super) fn prefill_rows(
        &mut self,
        rows: &[(u32, usize, &SeqCache)],
        want: &[bool],
    ) -> Result<Vec<Vec<f32>>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        if want.len() != rows.len() {
            return Err(err("one logits flag per row"));
        }
        let mut recs: Vec<SeqRecord> = Vec::with_capacity(rows.len());
        for (i, &(token, pos, cache)) in rows.iter().enumerate() {
            if pos >= cache.capacity() {
                return Err(err("cache has no room for the prompt"));
            }
            // A sequence's rows are consecutive: its pointers are read once.
            let kv = match i.checked_sub(1).map(|p| rows[p].2) {
                Some(prev) if std::ptr::eq(prev, cache) => recs[i - 1].kv.clone(),
                _ => self.cache_ptrs(cache)?,
            };
            recs.push(SeqRecord {
                token,
                pos,
                cap: cache.capacity(),
                kv,
            });
        }
        self.after_candle()?;
        let vocab = self.output.n;
        let mut out = Vec::with_capacity(want.iter().filter(|&&w| w).count());
        let mut at = 0;
        for n in batch_plan::prefill_chunks(rows.len()) {
            let wanted = &want[at..at + n];
            if n == 1 {
                // The single-stream step, on the pointers read above.
                let r = &recs[at];
                let v = self.run_kv(&[r.token], &r.kv, r.cap, r.pos, false)?;
                if wanted[0] {
                    out.push(v);
                }
                at += 1;
                continue;
            }
            let logits = batch_plan::prefill_logits(wanted);
            self.step_rows(&recs[at..at + n], n, StepKind::Prefill(logits))?;
            let (back, keep) = batch_plan::rows_back(wanted, logits);
            if back > 0 {
                let host = self.logits_back(back)?;
                out.extend(
                    keep.iter()
                        .map(|&i| host[i * vocab..(i + 1) * vocab].to_vec()),
                );
            }
            at += n;
        }
        self.stream.synchronize().map_err(err)?;
        Ok(out)
    }

    /// The first `rows` logits rows of the last batched step, copied to the page-locked
    /// host buffer once the step is done.
    fn logits_back(&mut self, rows: usize) -> Result<&[f32]> {
        let vocab = self.output.n;
        let b = self.batch.as_mut().ok_or_else(|| err("no batch buffers"))?;
        // Rows of the last decode step still held by a sequence: a new buffer, theirs
        // stays theirs.
        if Arc::get_mut(&mut b.host).is_none() {
            b.host = pinned_rows(&self.stream, b.cap * vocab)?;
        }
        let host = Arc::get_mut(&mut b.host).ok_or_else(|| err("logits buffer shared"))?;
        self.stream
            .memcpy_dtoh(&b.logits.slice.slice(..rows * vocab), &mut host.0)
            .map_err(err)?;
        self.stream.synchronize().map_err(err)?;
        Ok(&b.host.0.as_slice().map_err(err)?[..rows * vocab])
    }

    /// Write the step buffer for `recs` (at most `bucket`) and replay the bucket's graph
    /// of `kind` (the logits stay on the device).
    fn step_rows(&mut self, recs: &[SeqRecord], bucket: usize, kind: StepKind) -> Result<()> {
        self.ensure_batch(bucket)?;
        let b = self.batch.as_mut().ok_or_else(|| err("no batch buffers"))?;
        let nl = self.cfg.n_layers;
        upload_step(
            &self.stream,
            &mut self.words,
            recs,
            bucket,
            nl,
            &mut b.step.slice,
        )?;
        self.launch_batch(bucket, kind)?;
        self.steps += 1;
        Ok(())
    }

    /// The records of a bench step: `bucket` rows at positions `pos..pos + bucket` of one
    /// cache (reserved past them); binds the stream's context to this thread.
    fn bench_records(&self, cache: &SeqCache, pos: usize, bucket: usize) -> Result<Vec<SeqRecord>> {
        self.stream.context().bind_to_thread().map_err(err)?;
        let cap = cache.capacity();
        if pos + bucket > cap {
            return Err(err("bench positions past the cache"));
        }
        let kv = self.cache_ptrs(cache)?;
        Ok((0..bucket)
            .map(|t| SeqRecord {
                token: t as u32,
                pos: pos + t,
                cap,
                kv: kv.clone(),
            })
            .collect())
    }

    /// Microseconds per launch of each kernel of the batched step for `bucket` rows, at
    /// positions `pos..pos + bucket` of `cache` (reserved past them), timed as `bench`
    /// times the single-stream ones. The rows share one cache, so their attention reads
    /// slots other rows write in the same launch: the values mean nothing, only the time.
    pub(super) fn bench_batch(
        &mut self,
        cache: &SeqCache,
        pos: usize,
        bucket: usize,
    ) -> Result<Vec<(Op, f64)>> {
        let recs = self.bench_records(cache, pos, bucket)?;
        self.ensure_batch(bucket)?;
        let b = self.batch.as_mut().ok_or_else(|| err("no batch buffers"))?;
        let nl = self.cfg.n_layers;
        upload_step(
            &self.stream,
            &mut self.words,
            &recs,
            bucket,
            nl,
            &mut b.step.slice,
        )?;
        self.time_ops(|s, op| s.launch_b(op, 0, bucket, StepKind::Decode))
    }

    /// Microseconds per batched decode step of `bucket` rows at positions `pos..pos +
    /// bucket` of `cache` (one cache for all rows, as `bench_batch`): (the bucket's graph
    /// replayed back to back, and whole steps as `run_batch` takes them without its
    /// per-row copies: the step buffer's upload, the replay, the logits' copy).
    pub(super) fn bench_batch_step(
        &mut self,
        cache: &SeqCache,
        pos: usize,
        bucket: usize,
    ) -> Result<(f64, f64)> {
        const REPS: usize = 20;
        let recs = self.bench_records(cache, pos, bucket)?;
        self.step_rows(&recs, bucket, StepKind::Decode)?; // captures the graph
        self.logits_back(bucket)?;
        let t = std::time::Instant::now();
        for _ in 0..REPS {
            self.launch_batch(bucket, StepKind::Decode)?;
        }
        self.stream.synchronize().map_err(err)?;
        let graph = t.elapsed().as_secs_f64() * 1e6 / REPS as f64;
        let t = std::time::Instant::now();
        for _ in 0..REPS {
            self.step_rows(&recs, bucket, StepKind::Decode)?;
            self.logits_back(bucket)?;
        }
        Ok((graph, t.elapsed().as_secs_f64() * 1e6 / REPS as f64))
    }

    /// Drop the captured batched graphs (their kernel arguments changed).
    pub(super) fn drop_batch_graphs(&mut self) {
        if let Some(b) = self.batch.as_mut() {
            b.graphs.clear();
        }
    }

    /// Batch buffers for at least `bucket` sequences (re-allocated, and the graphs over
    /// the old ones dropped, when a larger bucket comes).
    pub(super) fn ensure_batch(&mut self, bucket: usize) -> Result<()> {
        if self.batch.as_ref().is_some_and(|b| b.cap >= bucket) {
            return Ok(());
        }
        self.batch = None;
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let nq = cfg.n_heads * hd;
        let ffn = self.layers.first().map_or(0, |l| l.gate_up.n / 2);
        let kmax = cfg.hidden.max(nq).max(ffn);
        let s = &self.stream;
        self.batch = Some(Batch {
            cap: bucket,
            x: zeros(s, bucket * cfg.hidden)?,
            qkv: zeros(s, bucket * (nq + 2 * cfg.n_kv_heads * hd))?,
            att: zeros(s, bucket * nq)?,
            act: zeros(s, bucket * ffn)?,
            scores: zeros(s, bucket * cfg.n_heads * self.ctx)?,
            att_part: zeros(s, bucket * cfg.n_heads * self.att_max * (hd + 2))?,
            att_cnt: zeros(s, bucket * cfg.n_heads)?,
            logits: zeros(s, bucket * self.output.n)?,
            pq: upload(s, &vec![0u8; bucket * kmax])?,
            pds: zeros(s, bucket * 2 * (kmax / 32))?,
            host: pinned_rows(s, bucket * self.output.n)?,
            step: upload(s, &vec![0u64; batch_plan::step_words(bucket, cfg.n_layers)])?,
            graphs: Vec::new(),
        });
        Ok(())
    }

    /// Replay the graph of `(bucket, kind)` (capturing it the first time) or launch
    /// directly.
    fn launch_batch(&mut self, bucket: usize, kind: StepKind) -> Result<()> {
        if !self.use_graph {
            return self.enqueue_batch(bucket, kind);
        }
        let key = (bucket, kind);
        let have = self
            .batch
            .as_ref()
            .is_some_and(|b| b.graphs.iter().any(|(k, _)| *k == key));
        if !have {
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(err)?;
            let r = self.enqueue_batch(bucket, kind);
            let g = self
                .stream
                .end_capture(sys::CUgraphInstantiate_flags(0))
                .map_err(err)?;
            r?;
            let g = g.ok_or_else(|| err("graph capture produced no graph"))?;
            g.upload().map_err(err)?;
            self.captures += 1;
            if let Some(b) = self.batch.as_mut() {
                b.graphs.push((key, g));
            }
        }
        let b = self.batch.as_ref().ok_or_else(|| err("no batch buffers"))?;
        let (_, g) = b
            .graphs
            .iter()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| err("no graph for the bucket"))?;
        g.launch().map_err(err)
    }

    /// Enqueue one batched step of `kind` for a `bucket`-wide batch on our stream.
    fn enqueue_batch(&self, bucket: usize, kind: StepKind) -> Result<()> {
        self.launch_b(Op::Embed, 0, bucket, kind)?;
        for li in 0..self.layers.len() {
            for op in [Op::Qkv, Op::Attention, Op::Wo, Op::GateUp, Op::Down] {
                self.launch_b(op, li, bucket, kind)?;
            }
        }
        self.launch_b(Op::Output, 0, bucket, kind)
    }

    /// Launch one kernel (or, for a prefill step's attention, two) of a batched step
    /// (`li`: the layer, for per-layer ops). Outputs go as `(pointer, row stride in
    /// floats)`.
    pub(super) fn launch_b(&self, op: Op, li: usize, bucket: usize, kind: StepKind) -> Result<()> {
        let b = self.batch.as_ref().ok_or_else(|| err("no batch buffers"))?;
        let cfg = &self.cfg;
        let l = &self.layers[li];
        let x_out = (b.x.ptr, cfg.hidden);
        match op {
            Op::Embed => self.embed_rows(b.step.ptr, b.x.ptr, bucket),
            Op::Qkv => {
                let qkv_n: usize = l.qkv.iter().map(|m| m.n).sum();
                let mut row = 0u64;
                for m in &l.qkv {
                    let bias = l.qkv_bias.as_ref().map_or(0, |x| x.ptr + 4 * row);
                    let out = (b.qkv.ptr + 4 * row, qkv_n);
                    self.matmat(b, bucket, m, 0, b.x.ptr, l.attn_norm.ptr, bias, out)?;
                    row += m.n as u64;
                }
                Ok(())
            }
            Op::Attention => self.attention_batch(b, bucket, li, kind),
            Op::Wo => self.matmat(b, bucket, &l.wo, 1, b.att.ptr, 0, 0, x_out),
            Op::GateUp => {
                let act = (b.act.ptr, l.gate_up.n / 2);
                self.matmat(b, bucket, &l.gate_up, 2, b.x.ptr, l.ffn_norm.ptr, 0, act)
            }
            Op::Down => self.matmat(b, bucket, &l.down, 1, b.act.ptr, 0, 0, x_out),
            Op::Output => match kind {
                StepKind::Decode | StepKind::Prefill(Logits::All) => self.matmat(
                    b,
                    bucket,
                    &self.output,
                    0,
                    b.x.ptr,
                    self.out_norm.ptr,
                    0,
                    (b.logits.ptr, self.output.n),
                ),
                // A prefill step fills its bucket: its last row is the bucket's last,
                // projected alone by the single-stream kernel.
                StepKind::Prefill(Logits::Last) => {
                    let last = b.x.ptr + 4 * ((bucket - 1) * cfg.hidden) as u64;
                    self.matvec(&self.output, 0, last, self.out_norm.ptr, 0, b.logits.ptr)
                }
                StepKind::Prefill(Logits::None) => Ok(()),
            },
        }
    }

    /// `embed_rows`: `x` (rows of `hidden`) = the embeddings of the first `rows` records'
    /// tokens in the step buffer `step`. A plain launch: it follows the buffer's copy.
    pub(super) fn embed_rows(&self, step: u64, x: u64, rows: usize) -> Result<()> {
        let cfg = &self.cfg;
        let stride = batch_plan::record_words(cfg.n_layers) as i32;
        let hidden = cfg.hidden as i32;
        let embed = tensor_ptr(&self.embed, &self.candle_stream)?;
        let mut args = [arg(&step), arg(&stride), arg(&embed), arg(&hidden), arg(&x)];
        let blocks = cfg.hidden.div_ceil(256) as u32;
        // SAFETY: matches `embed_rows`; the step buffer holds `rows` records and x room
        // for them.
        unsafe {
            self.go2(
                &self.f.embed_rows,
                (blocks, rows as u32),
                256,
                0,
                &mut args,
                false,
            )
        }
    }

    /// The parameters `kv_write_b` and `attention_b` begin with, for layer `li` over the
    /// qkv rows `qkv` and the step buffer `step`.
    pub(super) fn rope_head(&self, qkv: u64, step: u64, li: usize) -> Result<RopeHead> {
        let cfg = &self.cfg;
        Ok(RopeHead {
            qkv,
            step,
            stride: batch_plan::record_words(cfg.n_layers) as i32,
            layer: li as i32,
            n_layers: cfg.n_layers as i32,
            nh: cfg.n_heads as i32,
            nkvh: cfg.n_kv_heads as i32,
            hd: cfg.head_dim as i32,
            cos: tensor_ptr(&self.cos, &self.candle_stream)?,
            sin: tensor_ptr(&self.sin, &self.candle_stream)?,
            neox: cfg.rope_neox as i32,
        })
    }

    /// `kv_write_b` for `rows` records: RoPE'd K and V of every row into its cache.
    pub(super) fn kv_write(&self, h: &RopeHead, rows: usize, dependent: bool) -> Result<()> {
        let mut args = h.args();
        // SAFETY: matches `kv_write_b`; each record holds its cache's pointers.
        unsafe {
            self.go2(
                &self.f.kv_write_b,
                (self.cfg.n_kv_heads as u32, rows as u32),
                128,
                0,
                &mut args,
                dependent,
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn matmat(
        &self,
        b: &Batch,
        bucket: usize,
        m: &QMat,
        mode: usize,
        x: u64,
        norm: u64,
        bias: u64,
        (out, ld): (u64, usize),
    ) -> Result<()> {
        let rows = if mode == 2 { m.n / 2 } else { m.n };
        let warps = (MV_THREADS / 32) as usize;
        let eps = self.cfg.rms_eps as f32;
        let k = m.k as i32;
        let s8 = self
            .f
            .s8
            .as_ref()
            .filter(|_| self.sum8.get().applies(mode == 2));
        if let Some(tc) = self
            .f
            .tc
            .as_ref()
            .filter(|_| self.mm_tc.get() || s8.is_some())
        {
            // The activations quantized once (qcols_*), then the tensor-core mat-mat.
            let mut args = [
                arg(&b.step.ptr),
                arg(&x),
                arg(&norm),
                arg(&eps),
                arg(&k),
                arg(&b.pq.ptr),
                arg(&b.pds.ptr),
            ];
            // SAFETY: matches `QCOLS_ENTRY` in batch.cuh; pq and pds hold `bucket` rows
            // of the widest input and the step buffer's count is at most `bucket`.
            unsafe {
                self.go2(
                    &self.f.qcols[m.kind as usize],
                    (bucket as u32, 1),
                    MV_THREADS,
                    0,
                    &mut args,
                    true,
                )?
            };
            let (n, ldi) = (m.n as i32, ld as i32);
            let mut args = [
                arg(&b.step.ptr),
                arg(&k),
                arg(&m.qs),
                arg(&m.dm),
                arg(&bias),
                arg(&n),
                arg(&out),
                arg(&ldi),
                arg(&b.pq.ptr),
                arg(&b.pds.ptr),
            ];
            if let Some(s8) = s8 {
                // The eight-part order (the single-stream kernels are mv8_*/mvq8_*).
                let (rt, nt) =
                    batch_plan::s8_tile(rows, mode == 2, bucket, self.sms, self.s8_rows.get());
                let f = s8.mm[Sum8Funcs::at(m.kind as usize, mode, rt, nt)]
                    .as_ref()
                    .ok_or_else(|| err("no s8 kernel for this tile"))?;
                let grid = (
                    bucket.div_ceil(8 * nt) as u32,
                    rows.div_ceil(16 * rt) as u32,
                );
                let smem = Sum8Funcs::smem(m.kind, mode, rt, nt) as u32;
                // SAFETY: matches `S8_ENTRY` in sum8.cuh (the tensor-core kernels'
                // arguments); pq and pds hold the step's columns (quantized just above),
                // `out` has room for `bucket` rows of `ld`, and `smem` is the size the
                // kernel checks for (raised to it at load).
                return unsafe { self.go2(f, grid, 256, smem, &mut args, true) };
            }
            let smem = bucket * batch_plan::column_bytes(m.k);
            let mmq = self.f.mmq.as_ref().filter(|_| {
                smem <= MMQ_SMEM
                    && self
                        .mm_q
                        .get()
                        .unwrap_or_else(|| batch_plan::mmq(rows, m.k, bucket))
            });
            if let Some(mmq) = mmq {
                // The whole bucket's columns copied into shared memory, 8 dotted at a
                // time; a few blocks per multiprocessor, as many as their copies fit.
                let ch = bucket as i32;
                let per_sm = (SM_SMEM / smem).clamp(1, 4);
                let blocks = rows.div_ceil(warps).min(self.sms * per_sm) as u32;
                let mut with_ch = [std::ptr::null_mut(); 11];
                with_ch[..10].copy_from_slice(&args);
                with_ch[10] = arg(&ch);
                // SAFETY: matches `mmq_*` (`MATMAT_ENTRY`) in batch.cuh: the tensor-core
                // kernels' arguments and the chunk; pq and pds hold the step's columns
                // (quantized just above), `smem` bytes fit the kernel's limit, and `out`
                // has room for `bucket` rows of `ld`.
                return unsafe {
                    self.go2(
                        &mmq[m.kind as usize][mode],
                        (blocks, 1),
                        MV_THREADS,
                        smem as u32,
                        &mut with_ch,
                        true,
                    )
                };
            }
            // 8 columns a block (8 warps), or 32 (16 warps) with weights and activations
            // staged for wider batches, or 8 with the weights staged, by the matrix's size.
            let which = batch_plan::tc_kernels(rows, bucket, self.mm_tc32.get(), self.mm_tcs.get());
            let (set, mut cols, threads) = match which {
                batch_plan::TcKernels::Cols8 => (0, 8, 256),
                batch_plan::TcKernels::Cols32 => (1, 32, 512),
                batch_plan::TcKernels::Staged => (2, 8, 256),
                batch_plan::TcKernels::Staged32 => (3, 32, 512),
            };
            // 16 columns a block for batches of up to 16 (`tcs16_*`), or another staging
            // shape (`tcs32w_*`, `tcs32p_*`) where asked: dynamic shared memory.
            let narrow = self.f.tcs16.as_ref().filter(|_| {
                set == 3
                    && batch_plan::staged_columns(bucket, self.mm_tcs16.get(), rows, self.sms) == 16
            });
            let v = self.mm_tcs32v.get();
            let (f, smem) = match (narrow, &self.f.tcs32v, set == 3 && v > 0) {
                (Some(fs), _, _) => {
                    cols = 16;
                    (
                        &fs[m.kind as usize][mode],
                        super::tcs32_smem(1, 16, m.kind.quant_bytes(), mode) as u32,
                    )
                }
                (None, Some(fs), true) => (
                    &fs[v - 1][m.kind as usize][mode],
                    super::tcs32_smem(v, 32, m.kind.quant_bytes(), mode) as u32,
                ),
                _ => (&tc[set][m.kind as usize][mode], 0),
            };
            let grid = (bucket.div_ceil(cols) as u32, rows.div_ceil(16) as u32);
            // SAFETY: matches `TC_ENTRY` (and `TCS_ENTRY`, `TCS32_ENTRY`) in tc.cuh; pq and
            // pds hold the step's columns (quantized just above) and `out` room for
            // `bucket` rows of `ld`; tcs32w/p's and tcs16's `smem` is the size they check
            // for.
            return unsafe { self.go2(f, grid, threads, smem, &mut args, true) };
        }
        let ch = batch_plan::columns_per_chunk(m.k, bucket, self.mm_smem);
        let f = if batch_plan::wide_columns(ch) {
            &self.f.mm32[m.kind as usize][mode]
        } else {
            &self.f.mm[m.kind as usize][mode]
        };
        // Every block quantizes the batch's activations once: a few blocks per SM, each
        // taking many rows (fewer blocks for wider batches, whose quantization costs more).
        let per_sm = match self.mm_per_sm.get() {
            0 if bucket <= 8 => 4,
            0 => 2,
            n => n,
        };
        let blocks = rows.div_ceil(warps).min(self.sms * per_sm) as u32;
        let smem = (ch * batch_plan::column_bytes(m.k)) as u32;
        let (n, ld, chi) = (m.n as i32, ld as i32, ch as i32);
        let mut args = [
            arg(&b.step.ptr),
            arg(&x),
            arg(&norm),
            arg(&eps),
            arg(&k),
            arg(&m.qs),
            arg(&m.dm),
            arg(&bias),
            arg(&n),
            arg(&out),
            arg(&ld),
            arg(&chi),
        ];
        // SAFETY: argument types and order match `MATMAT_ENTRY` in batch.cuh; the
        // buffers hold `bucket` rows and the step buffer's count is at most `bucket`.
        unsafe { self.go2(f, (blocks, 1), MV_THREADS, smem, &mut args, true) }
    }

    /// RoPE, the K/V cache write and attention for every row; a prefill step writes
    /// every row's K/V first (`kv_write_b`), then attends with the write off.
    fn attention_batch(&self, b: &Batch, bucket: usize, li: usize, kind: StepKind) -> Result<()> {
        let cfg = &self.cfg;
        let prefill = matches!(kind, StepKind::Prefill(_));
        let hd = cfg.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let ctx = self.ctx as i32;
        let h = self.rope_head(b.qkv.ptr, b.step.ptr, li)?;
        if prefill {
            self.kv_write(&h, bucket, true)?;
        }
        let write = (!prefill) as i32;
        // The single-stream kernel's position chunks, each head's (or each group's heads')
        // taken by `hb` blocks.
        let nch = self.att_nch.get().min(self.att_max);
        // Blocks' units: query heads, or parts of KV groups of `gs` heads, `nsub` a group.
        let tc = self.att_tc_launch();
        let (gs, nsub, units) = if tc.is_some() {
            (1, 1, cfg.n_kv_heads)
        } else if self.att_group {
            let (gs, nsub) = batch_plan::attn_head_groups(cfg.n_heads, cfg.n_kv_heads);
            (gs, nsub, cfg.n_kv_heads * nsub)
        } else {
            (1, 1, cfg.n_heads)
        };
        let hb = match self.att_hb.get() {
            0 => batch_plan::attn_blocks_per_head(units, bucket, nch, self.sms),
            n => n.clamp(1, nch),
        };
        let (nchi, hbi, gsi, nsubi) = (nch as i32, hb as i32, gs as i32, nsub as i32);
        let min_chunk = self.atc_chunk.get() as i32;
        let mut tail = vec![
            arg(&scale),
            arg(&b.scores.ptr),
            arg(&ctx),
            arg(&b.att.ptr),
            arg(&write),
            arg(&nchi),
            arg(&hbi),
            arg(&b.att_part.ptr),
            arg(&b.att_cnt.ptr),
        ];
        let threads = ATT_THREADS as u32;
        let (f, threads, smem) = if let Some((tc, tc_threads, smem)) = tc {
            tail.push(arg(&min_chunk));
            (&tc[1], tc_threads, smem)
        } else if self.att_group {
            tail.extend([arg(&gsi), arg(&nsubi)]);
            let floats = (ATT_GROUP_MAX + 2) * hd + ATT_GROUP_MAX * 8 * ATT_THREADS;
            (&self.f.attention_bg, threads, (floats * 4) as u32)
        } else {
            (
                &self.f.attention_b,
                threads,
                ((3 * hd) as u32 + 8 * threads) * 4,
            )
        };
        let mut args: Vec<*mut c_void> = h.args().iter().chain(&tail).copied().collect();
        // SAFETY: matches `attention_b` (`attention_btc*`: the same arguments and the
        // least chunk length;
        // `attention_bg` with its two trailing ints);
        // each record holds its sequence's cache pointers, att_part and att_cnt hold
        // `att_max >= nch` chunks for every head of `bucket` rows.
        unsafe {
            self.go2(
                f,
                ((units * hb) as u32, bucket as u32),
                threads,
                smem,
                &mut args,
                true,
            )
        }
    }
}

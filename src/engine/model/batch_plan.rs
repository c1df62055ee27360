//! Bookkeeping of the batched fused CUDA decode step, kept apart from the device code so
//! that it builds and is tested without a GPU: which sequences of a pass go through one
//! batched step, how a batch is cut into graph buckets, how many activation columns a
//! mat-mat block holds in shared memory, and the layout of the per-step device buffer
//! (the batch size, then one record per sequence: token, position, cache capacity and
//! its per-layer K and V cache pointers).
//!
//! Depends on nothing in the engine; `model::cuda` is its only user.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Batch sizes a graph is captured for; a batch runs in the smallest bucket that holds
/// it, so at most six graphs are captured whatever the mix of batch sizes.
pub const BUCKETS: [usize; 6] = [2, 4, 8, 16, 32, 64];

/// The most sequences one batched step takes; larger batches run as several steps.
pub const MAX_BUCKET: usize = BUCKETS[BUCKETS.len() - 1];

/// Most activation columns a mat-mat block quantizes into shared memory at a time (the
/// kernel's static reduction scratch is sized for this).
pub const MAX_COLUMNS: usize = 64;

/// Words of one sequence's record in the step buffer: token, position, cache capacity,
/// then `n_layers` K pointers and `n_layers` V pointers.
pub fn record_words(n_layers: usize) -> usize {
    3 + 2 * n_layers
}

/// Words of a step buffer for `bucket` sequences (the count comes first).
pub fn step_words(bucket: usize, n_layers: usize) -> usize {
    1 + bucket * record_words(n_layers)
}

/// The smallest bucket holding `n` sequences (`n` in 1..=MAX_BUCKET), or None.
pub fn bucket(n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    BUCKETS.iter().copied().find(|&b| b >= n)
}

/// Cut `n` sequences into consecutive steps of at most [`MAX_BUCKET`]: `(first, len)`.
pub fn split(n: usize) -> Vec<(usize, usize)> {
    (0..n)
        .step_by(MAX_BUCKET)
        .map(|s| (s, MAX_BUCKET.min(n - s)))
        .collect()
}

/// Bytes of shared memory a column of `k` activations takes once quantized (8-bit
/// values, then an f32 scale and an f32 scaled sum per 32).
pub fn column_bytes(k: usize) -> usize {
    k + 8 * (k / 32)
}

/// Columns a mat-mat block over `k` inputs quantizes at once for a `bucket`-wide batch,
/// within `smem` bytes of dynamic shared memory (at least one).
pub fn columns_per_chunk(k: usize, bucket: usize, smem: usize) -> usize {
    (smem / column_bytes(k).max(1))
        .clamp(1, MAX_COLUMNS)
        .min(bucket.max(1))
}

/// The longest prompt chunk that prefills through batched steps by default, for a model
/// of hidden size `hidden` (longer chunks prefill wide or on the tensor path). 64 for
/// models narrower than 4096: there a batched step of 64 rows takes a few milliseconds,
/// about what one tensor-path pass costs, and stays bit-identical to decoding token by
/// token. 32 from 4096 on: on Llama-3-8B's shape (H100, `candela doctor --prefill`) 32
/// tokens took 13.9 ms in batched steps against 19.1 wide (most of a short wide pass is
/// dequantizing every matrix), 64 tokens 24.7 against 19.3.
pub fn default_prefill_max(hidden: usize) -> usize {
    if hidden >= 4096 {
        32
    } else {
        64
    }
}

/// The longest prompt chunk past [`default_prefill_max`] that still takes candle's tensor
/// path where the wide prefill is on (longer ones prefill wide). 0: every chunk past the
/// batched limit goes wide, until GPU timings of short chunks (`candela doctor
/// --prefill`, 8 to 64 tokens) say where the wide pass's fixed cost of dequantizing every
/// matrix stops paying.
pub const WIDE_MIN: usize = 0;

/// Whether prompt chunks past [`default_prefill_max`] prefill wide by default (rather than
/// on candle's tensor path): where every projection is in a layout whose wide kernels
/// were checked on a GPU (`layouts_checked`) and, with the int8 GEMMs, the model is no
/// wider than hidden size 1,024 (at 4,096 they are slower than the tensor path; the f16
/// GEMMs are faster at every size timed: 26 against 61 ms for 512 tokens of an 8B model).
pub fn wide_by_default(hidden: usize, f16_gemms: bool, layouts_checked: bool) -> bool {
    layouts_checked && (f16_gemms || hidden <= 1024)
}

/// Positions of one wide prefill pass at most; longer chunks run in several passes, each
/// attending to the cache the earlier ones wrote.
pub const WIDE_ROWS: usize = 1024;

/// One sequence's rows in a packed wide pass: its tokens `start..start + n` (of the chunk
/// it prefills), at rows `row..row + n` of the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WideSeg {
    pub seq: usize,
    pub start: usize,
    pub n: usize,
    pub row: usize,
}

/// Several sequences' prompt chunks (`lens` tokens each) packed into wide passes of up to
/// `cap` rows: in order, a sequence cut where a pass is full and continued at the start
/// of the next (its later rows attend to the cache its earlier ones wrote). Every pass
/// multiplies each weight matrix once for all its sequences' rows.
pub fn wide_passes(lens: &[usize], cap: usize) -> Vec<Vec<WideSeg>> {
    let cap = cap.max(1);
    let mut passes: Vec<Vec<WideSeg>> = Vec::new();
    let mut used = cap; // a new pass on the first row
    for (seq, &len) in lens.iter().enumerate() {
        let mut start = 0;
        while start < len {
            if used == cap {
                passes.push(Vec::new());
                used = 0;
            }
            let n = (len - start).min(cap - used);
            if let Some(p) = passes.last_mut() {
                p.push(WideSeg {
                    seq,
                    start,
                    n,
                    row: used,
                });
            }
            used += n;
            start += n;
        }
    }
    passes
}

/// Bytes of the cuBLAS workspace the f16 GEMMs are given (cuBLAS's own default on
/// Hopper), allocated with the pass's buffers so that it is counted with them rather
/// than taken by the library on first use.
pub const BLAS_WORKSPACE: usize = 32 << 20;

/// A model's shapes as the wide prefill's buffers need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WideShape {
    pub hidden: usize,
    /// Query rows (heads × head size) and key rows (= value rows).
    pub q: usize,
    pub kv: usize,
    /// The feed-forward width (rows of gate, of up).
    pub ffn: usize,
    pub n_layers: usize,
    /// Elements of the largest projection matrix (the f16 GEMMs dequantize one at a time
    /// into room for it).
    pub largest: usize,
}

/// Elements of each device buffer a wide pass of some number of rows holds. The common
/// ones every pass uses; `int8` the int8 GEMMs' (f32 SwiGLU output, quantized rows and
/// their block pairs); `f16` the f16 GEMMs' (f16 input rows, one dequantized matrix,
/// gate|up in f32, SwiGLU's output in f16). A pass makes only its GEMM kind's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WideBuffers {
    /// f32: the residual stream, Q|K|V, roped Q, attention output.
    pub x: usize,
    pub qkv: usize,
    pub qr: usize,
    pub att: usize,
    /// u64 words of the step buffer.
    pub step: usize,
    /// int8 GEMMs: f32, u8, f32.
    pub act: usize,
    pub xq: usize,
    pub xds: usize,
    /// f16 GEMMs: f16, f16, f32, f16, and the cuBLAS workspace in bytes.
    pub xh: usize,
    pub w: usize,
    pub gu: usize,
    pub act_h: usize,
    pub blas: usize,
}

impl WideShape {
    /// The widest projection input.
    pub fn kmax(&self) -> usize {
        self.hidden.max(self.q).max(self.ffn)
    }

    /// The buffers of a pass of `rows` positions.
    pub fn buffers(&self, rows: usize) -> WideBuffers {
        let kmax = self.kmax();
        WideBuffers {
            x: rows * self.hidden,
            qkv: rows * (self.q + 2 * self.kv),
            qr: rows * self.q,
            att: rows * self.q,
            step: step_words(rows, self.n_layers),
            act: rows * self.ffn,
            xq: rows * kmax,
            xds: rows * 2 * (kmax / 32),
            xh: rows * kmax,
            w: self.largest,
            gu: rows * 2 * self.ffn,
            act_h: rows * self.ffn,
            blas: BLAS_WORKSPACE,
        }
    }

    /// Device bytes a server keeps for wide passes of up to [`WIDE_ROWS`] positions with
    /// the f16 GEMMs (`f16`) or the int8 ones.
    pub fn scratch_bytes(&self, f16: bool) -> usize {
        let b = self.buffers(WIDE_ROWS);
        let common = 4 * (b.x + b.qkv + b.qr + b.att) + 8 * b.step;
        common
            + if f16 {
                2 * b.xh + 2 * b.w + 4 * b.gu + 2 * b.act_h + b.blas
            } else {
                4 * b.act + b.xq + 4 * b.xds
            }
    }
}

/// Whether a mat-mat block dots each weight row with 32 columns at a time (its wide
/// kernels, `mm32_*`) rather than 8: when a chunk holds more than 8 columns.
pub fn wide_columns(chunk: usize) -> bool {
    chunk > 8
}

/// The tensor-core mat-mat kernels a batched step's projection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcKernels {
    /// 8 warps, 16 rows by 8 columns a block (`tc_*`).
    Cols8,
    /// 16 warps, 16 rows by 32 columns a block (`tc32_*`): each weight fragment read once
    /// for four column tiles.
    Cols32,
    /// 8 columns a block with the weights staged through shared memory, double-buffered
    /// (`tcs_*`).
    Staged,
    /// 32 columns a block (16 warps) with the weights and the activations staged through
    /// shared memory, double-buffered (`tcs32_*`).
    Staged32,
}

/// Output rows from which a batch of more than 8 takes the 32-column blocks
/// ([`TcKernels::Staged32`]) by default: below it their blocks (one per 16 rows) leave
/// much of the card idle. On an H100 the 32-column kernels lost at 576 and 960 rows
/// (SmolLM2's shape) and won from 1,536 up; staged, they won on every matrix of
/// Llama-3-8B's shape against the unstaged ones (its 32-row step 15.4 ms against 20.7).
pub const TC32_MIN_ROWS: usize = 1024;

/// Output rows from which a batch of up to 8 takes [`TcKernels::Staged`] by default: on
/// an H100 the staged kernels won on the 14,336-row gate|up and the vocabulary matrices
/// (2.1x and 1.4x on Llama-3-8B's shape) and lost up to 6,144 rows.
pub const TCS_MIN_ROWS: usize = 8192;

/// Which tensor-core kernels a projection of `rows` output rows takes in a step of
/// `bucket` columns: by size unless forced (`cols32`, `staged`: Some(on) from the
/// environment or `candela doctor`). 32-column blocks only for batches over 8; staging
/// by default goes with them there, and from [`TCS_MIN_ROWS`] for batches up to 8.
pub fn tc_kernels(
    rows: usize,
    bucket: usize,
    cols32: Option<bool>,
    staged: Option<bool>,
) -> TcKernels {
    let wide = bucket > 8;
    let cols32 = wide && cols32.unwrap_or(rows >= TC32_MIN_ROWS);
    let staged = staged.unwrap_or(if wide { cols32 } else { rows >= TCS_MIN_ROWS });
    match (cols32, staged) {
        (true, true) => TcKernels::Staged32,
        (true, false) => TcKernels::Cols32,
        (false, true) => TcKernels::Staged,
        (false, false) => TcKernels::Cols8,
    }
}

/// Bytes of one stage buffer of the staged 32-column tensor-core kernels (`Tcs32Stage`
/// in tc.cuh, whose `tcs32_stage_bytes` it mirrors): for `r` weight matrices (2 for
/// SwiGLU's gate and up) of `quant_bytes` per 32-value block, rounds of `rb` blocks: 16
/// rows of values (each padded by 16 bytes), their scale pairs, Q4_K's super-block pairs
/// and 6-bit byte pairs, then `cols` columns (32, or 16 for `tcs16_*`) of quantized
/// activations (padded) and their scale pairs. `tcs32w_*`, `tcs32p_*` and `tcs16_*` take
/// two or four of them as dynamic shared memory.
pub fn tcs32_stage_bytes(quant_bytes: usize, r: usize, rb: usize, cols: usize) -> usize {
    r * 16 * (rb * quant_bytes + 16)
        + r * 16 * rb * 8
        + r * 16 * (rb / 8) * 8
        + r * 16 * rb * 2
        + cols * (rb * 32 + 16)
        + cols * rb * 8
}

/// Columns a block of the staged tensor-core kernels takes for a step of `bucket`
/// columns of a matrix of `rows` rows ([`TcKernels::Staged32`]; a block takes 16 rows) on
/// a card of `sms` multiprocessors: by default 16 (`tcs16_*`) for buckets of up to 16, so
/// that a batch of 9 to 16 does not multiply 16 repeated columns, and for wider buckets
/// of a matrix whose 32-column blocks would not cover the multiprocessors once (a
/// Llama-3-8B's 1,024-row K and V: 64 blocks, against 128 of 16 columns); else 32.
/// `narrow` forces it (`CANDELA_CUDA_TCS16=0|1`: Some(false) 32 for every bucket,
/// Some(true) 16 for every bucket, wider ones then taking several 16-column blocks side
/// by side).
pub fn staged_columns(bucket: usize, narrow: Option<bool>, rows: usize, sms: usize) -> usize {
    match narrow {
        Some(true) => 16,
        Some(false) => 32,
        None if bucket <= 16 => 16,
        None if rows.div_ceil(16) * bucket.div_ceil(32) < sms => 16,
        None => 32,
    }
}

/// Blocks of 32 values a round of the eight-part tensor-core kernels (`s8_*`, sum8.cuh)
/// stages per row: 8 for the 32-byte layout (Q8_0, Q5_0, Q6_K), else 16 (whole Q4_K
/// super-blocks).
pub fn s8_round_blocks(quant_bytes: usize) -> usize {
    if quant_bytes == 32 {
        8
    } else {
        16
    }
}

/// Bytes of one stage buffer of the `s8_*` kernels (`S8Layout` in sum8.cuh, which it
/// mirrors): `rr` weight rows of a round's `rb` blocks (padded by 16 bytes) and their
/// scales (Q4_K: the super-block pairs and the blocks' byte pairs, padded by 8; else
/// `rb + 1` pairs a row), then `cols` columns of activations (padded by 16 bytes) and
/// their `rb + 1` scale pairs, each part 16-byte aligned.
pub fn s8_stage_bytes(quant_bytes: usize, q4k: bool, rr: usize, cols: usize, rb: usize) -> usize {
    let up16 = |x: usize| x.div_ceil(16) * 16;
    let w = rr * (rb * quant_bytes + 16);
    let sc = if q4k {
        rr * (rb / 8) * 8 + rr * (rb * 2 + 8)
    } else {
        rr * (rb + 1) * 8
    };
    let act = up16(w + sc);
    up16(act + cols * (rb * 32 + 16) + cols * (rb + 1) * 8)
}

/// Stage buffers of an `s8_*` kernel (sum8.cuh's `s8_stages`) for `r` matrices (2 for
/// SwiGLU) of `rt` row tiles by `nt` column tiles: small tiles do little between rounds,
/// so more rounds' copies are in flight while one is multiplied (4 buffers for 1 or 2
/// tiles of 16 by 8, 3 for 4, 2 for 8 and more: two blocks a multiprocessor each way).
pub fn s8_stages(r: usize, rt: usize, nt: usize) -> usize {
    match r * rt * nt {
        0..=2 => 4,
        3..=4 => 3,
        _ => 2,
    }
}

/// The tile of an `s8_*` launch for a projection of `rows` output rows (of each of the
/// two matrices for SwiGLU's gate and up) in a step of `bucket` columns on a card of
/// `sms` multiprocessors: (row tiles of 16, column tiles of 8) a block. Column tiles up
/// to the bucket's (1 for buckets of up to 8, 2 up to 16, else 4), row tiles 1, 2 or 4
/// (1 or 2 for SwiGLU, whose block holds both matrices' sums). The largest tile whose
/// blocks still cover the multiprocessors once (a larger tile reads each staged column
/// for more rows and each staged row for more columns; more columns first), else the
/// smallest (small matrices want blocks on every multiprocessor). `forced`
/// (`CANDELA_CUDA_SUM8_ROWS`: 16, 32 or 64) fixes the rows where the kernel has them.
pub fn s8_tile(
    rows: usize,
    swiglu: bool,
    bucket: usize,
    sms: usize,
    forced: Option<usize>,
) -> (usize, usize) {
    let nt_max = match bucket {
        0..=8 => 1,
        9..=16 => 2,
        _ => 4,
    };
    let rt_max = if swiglu { 2 } else { 4 };
    let forced_rt = forced
        .filter(|r| [16, 32, 64].contains(r))
        .map(|r| (r / 16).min(rt_max));
    let blocks = |rt: usize, nt: usize| rows.div_ceil(16 * rt) * bucket.div_ceil(8 * nt);
    let mut best: Option<(usize, usize)> = None;
    for nt in [4, 2, 1].into_iter().filter(|&nt| nt <= nt_max) {
        for rt in [4, 2, 1].into_iter().filter(|&rt| rt <= rt_max) {
            if forced_rt.is_some_and(|f| f != rt) || blocks(rt, nt) < sms {
                continue;
            }
            if best.is_none_or(|(br, bn)| rt * nt > br * bn) {
                best = Some((rt, nt));
            }
        }
    }
    best.unwrap_or((forced_rt.unwrap_or(1), 1))
}

/// Which projections add their terms in eight parts a row (sum8.cuh: `mv8_*`/`mvq8_*`
/// single-stream, `s8_*` batched) rather than in the 32-lane order (`mv_*`, tc.cuh);
/// either way single-stream and batched steps use the same order for a projection, so
/// batched logits keep the single-stream bits. `CANDELA_CUDA_SUM8`: `0` none (the
/// default), `gate_up` the gate|up projection only, `1` every projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sum8 {
    Off,
    /// The gate|up projection (the SwiGLU pair) only: on an H100 its eight-part kernels
    /// were faster for single streams and for batches alike on Llama-3-8B's and
    /// SmolLM2's shapes, while the other projections' single-stream mat-vecs were slower.
    GateUp,
    All,
}

impl Sum8 {
    /// The setting's value (`0`/`off`, `gate_up`, `1`/`all`); None for anything else.
    pub fn parse(v: &str) -> Option<Sum8> {
        match v {
            "0" | "off" => Some(Sum8::Off),
            "gate_up" => Some(Sum8::GateUp),
            "1" | "all" => Some(Sum8::All),
            _ => None,
        }
    }

    /// The setting in words (`candela doctor`'s lines).
    pub fn label(self) -> &'static str {
        match self {
            Sum8::Off => "sums in 32 lanes",
            Sum8::GateUp => "gate|up summed in eight parts",
            Sum8::All => "every projection summed in eight parts",
        }
    }

    /// Whether a projection (`swiglu`: the gate|up pair) sums in eight parts.
    pub fn applies(self, swiglu: bool) -> bool {
        match self {
            Sum8::Off => false,
            Sum8::GateUp => swiglu,
            Sum8::All => true,
        }
    }
}

/// Least positions of a position chunk of the per-head decode attention (attn.cuh's
/// `ATT_MIN_CHUNK`), and by default of the tensor-core one.
pub const ATT_MIN_CHUNK: usize = 256;

/// The tensor-core decode attention's least chunk length from a setting
/// (`CANDELA_CUDA_ATT_TC_CHUNK`): a multiple of 64 (its block's four warps take
/// 16-position tiles) from 64 to [`ATT_MIN_CHUNK`]; None for anything else.
pub fn atc_chunk(v: &str) -> Option<usize> {
    v.parse::<usize>().ok().filter(|&n| atc_chunk_ok(n))
}

/// Whether `n` positions can be the tensor-core attention's least chunk length (see
/// [`atc_chunk`]).
pub fn atc_chunk_ok(n: usize) -> bool {
    (64..=ATT_MIN_CHUNK).contains(&n) && n.is_multiple_of(64)
}

/// Most position chunks one head's decode attention is split into (the kernels'
/// `ATT_MAX_CHUNKS`).
pub const ATT_MAX_CHUNKS: usize = 16;

/// Position chunks a head's decode attention is split into at long contexts, for a model
/// of `n_heads` query heads on a card of `sms` multiprocessors: enough for a single
/// stream's heads to cover the multiprocessors about twice (a chunk holds at least 256 positions, so
/// shorter contexts are not split), at most [`ATT_MAX_CHUNKS`]. The single-stream and
/// batched kernels cut a sequence's positions the same way for a given count.
pub fn attn_chunks(n_heads: usize, sms: usize) -> usize {
    (2 * sms / n_heads.max(1)).clamp(1, ATT_MAX_CHUNKS)
}

/// Blocks a head of each row takes in a batched attention launch of `bucket` rows (each
/// block works through every this-many-th chunk of the head's `chunks`): a power of two
/// (so the blocks share a head's chunks evenly) up to about five blocks per
/// multiprocessor (`sms` of them) in all, at least one. On an H100 at 1,024 positions
/// (8 rows) the best totals were 512–576 blocks: SmolLM2's shape (9 heads) took 20.7 µs
/// a layer with 3 blocks a head, 16.6–16.8 with 4, 14.2 with 8; Llama-3-8B's (32 heads)
/// 70.4 with 1, 39.9–40.7 with 2, 46.1–47.1 with 4 and 47.0–48.3 with 8.
pub fn attn_blocks_per_head(n_heads: usize, bucket: usize, chunks: usize, sms: usize) -> usize {
    let fit = (5 * sms / (n_heads * bucket).max(1)).clamp(1, chunks.max(1));
    1 << fit.ilog2()
}

/// How the batched attention groups a KV group's `n_heads / n_kv_heads` query heads:
/// (heads per block, blocks per group), at most four heads a block (their scores and
/// weighted-V sums live in registers and shared memory), the group cut into equal
/// parts. Each block reads the group's cached K and V once for all its heads.
pub fn attn_head_groups(n_heads: usize, n_kv_heads: usize) -> (usize, usize) {
    let group = (n_heads / n_kv_heads.max(1)).max(1);
    let parts = group.div_ceil(4);
    (group.div_ceil(parts), parts)
}

/// Query heads of one KV group the tensor-core decode attention takes at most (the rows
/// of its products: `ATC_ROWS` in attn_tc.cuh).
pub const ATC_ROWS: usize = 16;
/// Warps of a tensor-core attention block (`ATC_WARPS`).
pub const ATC_WARPS: usize = 4;

/// Whether the tensor-core decode attention (attn_tc.cuh) covers a model: heads of 64 or
/// 128 values (its kernels' sizes) and KV groups of at most [`ATC_ROWS`] query heads.
pub fn attn_tc_fits(head_dim: usize, n_heads: usize, n_kv_heads: usize) -> bool {
    matches!(head_dim, 64 | 128)
        && n_kv_heads > 0
        && n_heads.is_multiple_of(n_kv_heads)
        && n_heads / n_kv_heads <= ATC_ROWS
}

/// Dynamic shared memory (bytes) of a tensor-core attention block for groups of `group`
/// query heads: the group's queries (always [`ATC_ROWS`] rows), the new K and V, each
/// warp's max and sum per row and its output rows.
pub fn attn_tc_smem(head_dim: usize, group: usize) -> usize {
    4 * (ATC_ROWS * head_dim
        + 2 * head_dim
        + 2 * ATC_WARPS * ATC_ROWS
        + ATC_WARPS * group * head_dim)
}

/// Blocks per multiprocessor of a single-stream mat-vec over rows of `k` values. Each
/// block quantizes the whole activation vector into its shared memory before it takes
/// rows, so long rows want fewer blocks: on an H100, 8 blocks won on SmolLM2's shape
/// (rows of 576 and 1,536; 4 were 1.5 % slower a step), 4 on Llama-3-8B's rows of 4,096
/// (a step 9 % faster than with 8), 2 on its rows of 14,336.
pub fn mv_blocks_per_sm(k: usize) -> usize {
    match k {
        0..=2048 => 8,
        2049..=8192 => 4,
        _ => 2,
    }
}

/// Whether a single-stream mat-vec over rows of `k` values (`rows` of them, all the
/// matrices on one input together) reads activations quantized once by a one-block
/// kernel (`qact`) instead of every block normalizing and quantizing the f32 input into
/// its shared memory. Hundreds of blocks each reading the input from L2 cost more than
/// the extra launch on long rows. On an H100 (`candela doctor`, µs per op in a graph,
/// the quantizing launch included) Llama-3-8B's shape went Q|K|V 24.4 → 12.8, output
/// projection 6.8 → 5.5, gate|up 41.1 → 40.5, down 37.9 → 35.7, vocabulary 97.4 → 91.8
/// (a step 3,789 → 3,279 µs, one sequence 247 → 298 tok/s), while SmolLM2's rows of 576
/// and 1,536 lost to the launch (a step 582 → 637 µs). The gain grows with the blocks
/// repeating the work (with the rows) and with the input's length, so only what was
/// timed is taken: both at least Llama-3-8B's 4,096.
pub fn mv_prequant(k: usize, rows: usize) -> bool {
    k >= MVQ_MIN && rows >= MVQ_MIN
}

/// Shortest input and fewest rows [`mv_prequant`] quantizes once for.
pub const MVQ_MIN: usize = 4096;

/// Blocks per multiprocessor of a mat-vec on activations quantized once (with 42–56
/// registers a thread, four to six blocks of 256 are resident). On an H100 (`candela
/// doctor`'s sweep, Llama-3-8B's shape) 4 gave a step of 3,245 µs against 3,287 with 8
/// (Q|K|V 12.3 against 12.8 µs, gate|up 39.9 against 40.5) and 3,808 with 2.
pub const MVQ_BLOCKS_PER_SM: usize = 4;

/// Whether a batched projection of `rows` rows over `k` inputs, `bucket` columns wide,
/// takes the dp4a mat-mat on columns quantized once (`mmq_*`: each warp reads a weight
/// row once, coalesced, for the bucket's columns in shared memory) instead of a
/// tensor-core one: in steps of up to 8 sequences, for matrices of up to 8,192 rows
/// whose columns fit four blocks a multiprocessor. On an H100 at 8 rows
/// (`candela doctor`, µs per launch in a graph) Llama-3-8B's Q|K|V went 56.8 → 38.7 and
/// output projection 24.7 → 16.8, SmolLM2's down projection 9.0 → 6.5 (its other small
/// ones level); the larger ones lost (gate|up 74.6 → 83.2, the vocabulary 134 → 180, the
/// 14,336-wide down, one block a multiprocessor, 62.3 → 101.5), as did every matrix at
/// 32 rows.
pub fn mmq(rows: usize, k: usize, bucket: usize) -> bool {
    bucket <= 8 && rows <= MMQ_MAX_ROWS && bucket * column_bytes(k) <= MMQ_MAX_SMEM
}

/// Most rows [`mmq`] takes.
pub const MMQ_MAX_ROWS: usize = 8192;

/// Most shared memory a block of [`mmq`]'s kernels may hold (a quarter of an H100
/// multiprocessor's).
pub const MMQ_MAX_SMEM: usize = 56 << 10;

/// What a batched step computes past the last layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// One token of each of several sequences: every row's logits.
    Decode,
    /// Consecutive prompt positions of one sequence (each position's K/V is written to
    /// the cache before attention reads any): logits of every row, of the last row
    /// only, or none (a chunk before the prompt's last).
    Prefill(Logits),
}

/// The logits a prefill step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Logits {
    None,
    Last,
    All,
}

/// Cut a prompt of `n` tokens into prefill steps: the largest bucket that fits what is
/// left each time (every step then fills its bucket, so its last row is the bucket's
/// last), and a final single token where one is left over.
pub fn prefill_chunks(n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let take = BUCKETS
            .iter()
            .rev()
            .copied()
            .find(|&b| b <= left)
            .unwrap_or(1);
        out.push(take);
        left -= take;
    }
    out
}

/// What a prefill step of rows whose logits are wanted as `want` marks returns: none,
/// the last row's alone (the step fills its bucket, so that row is the bucket's last),
/// or all of them.
pub fn prefill_logits(want: &[bool]) -> Logits {
    match want.iter().rposition(|&w| w) {
        None => Logits::None,
        Some(i) if i + 1 == want.len() && want.iter().filter(|&&w| w).count() == 1 => Logits::Last,
        Some(_) => Logits::All,
    }
}

/// The rows a prefill step of `logits` copies back (the step's last alone for `Last`)
/// and, of those, the indices of the ones `want` marks, in order.
pub fn rows_back(want: &[bool], logits: Logits) -> (usize, Vec<usize>) {
    match logits {
        Logits::None => (0, Vec::new()),
        Logits::Last => (1, vec![0]),
        Logits::All => (want.len(), (0..want.len()).filter(|&i| want[i]).collect()),
    }
}

/// The rows of a packed prefill pass whose logits are wanted, sequence after sequence
/// (`(new tokens, all logits)` each): every row of a sequence that wants all, else its
/// last; with how many rows each sequence gets back.
pub fn packed_want(seqs: &[(usize, bool)]) -> (Vec<bool>, Vec<usize>) {
    let mut want = Vec::with_capacity(seqs.iter().map(|s| s.0).sum());
    let mut back = Vec::with_capacity(seqs.len());
    for &(n, all) in seqs {
        want.extend((0..n).map(|i| all || i + 1 == n));
        back.push(if all { n } else { n.min(1) });
    }
    (want, back)
}

/// One sequence of a batched step: the token it feeds, its position (the cache length)
/// and cache capacity, and its per-layer `(K, V)` cache device pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqRecord {
    pub token: u32,
    pub pos: usize,
    pub cap: usize,
    pub kv: Vec<(u64, u64)>,
}

/// Fill `words` with the step buffer for `seqs` (at most `bucket` of them, each with
/// `n_layers` cache pointer pairs and room for its position): the count, then each
/// record; the rest of the bucket's records are zero (the kernels stop at the count).
pub fn fill_step(
    words: &mut Vec<u64>,
    seqs: &[SeqRecord],
    bucket: usize,
    n_layers: usize,
) -> Result<(), String> {
    if seqs.is_empty() || seqs.len() > bucket {
        return Err(format!(
            "a batched step takes 1..={bucket} sequences, got {}",
            seqs.len()
        ));
    }
    words.clear();
    words.push(seqs.len() as u64);
    for (i, s) in seqs.iter().enumerate() {
        if s.kv.len() != n_layers {
            return Err(format!(
                "sequence {i} has {} cache layers, the model {n_layers}",
                s.kv.len()
            ));
        }
        if s.pos >= s.cap {
            return Err(format!(
                "sequence {i} has no room in its cache (position {}, capacity {})",
                s.pos, s.cap
            ));
        }
        words.extend([s.token as u64, s.pos as u64, s.cap as u64]);
        words.extend(s.kv.iter().map(|&(k, _)| k));
        words.extend(s.kv.iter().map(|&(_, v)| v));
    }
    words.resize(step_words(bucket, n_layers), 0);
    Ok(())
}

/// Whether a pass of sequences feeding `lens` new tokens each goes to the packed batched
/// prefill (with batched prefill on): every pass but a decode step of several sequences
/// and a single sequence's single token, which takes the single-stream step directly
/// (through the packed prefill it would reach that same step after reading the cache's
/// pointers an extra time).
pub fn packed_prefill(lens: &[usize]) -> bool {
    lens != [1] && !batched(lens, 1)
}

/// Whether a pass of sequences feeding `lens` new tokens each goes to packed wide passes
/// (where that is on): several sequences, not a decode step (some chunk of more than one
/// token), and more rows in all than `wide_past` (the longest chunk that prefills in
/// batched steps, or on the tensor path before the wide prefill takes over).
pub fn packed_wide(lens: &[usize], wide_past: usize) -> bool {
    lens.len() > 1 && lens.iter().any(|&n| n > 1) && lens.iter().sum::<usize>() > wide_past
}

/// Whether a pass of sequences feeding `lens` new tokens each runs as batched steps:
/// two or more sequences, each with 1..=`max` tokens (prompt chunks go one token of
/// every sequence per step).
pub fn batched(lens: &[usize], max: usize) -> bool {
    lens.len() >= 2 && lens.iter().all(|&n| (1..=max).contains(&n))
}

/// The batched steps of a pass: step `t` feeds token `t` of every sequence that has one,
/// as indices into `lens`. Every sequence's tokens go in order, one step each.
pub fn token_steps(lens: &[usize]) -> Vec<Vec<usize>> {
    let longest = lens.iter().copied().max().unwrap_or(0);
    (0..longest)
        .map(|t| (0..lens.len()).filter(|&i| lens[i] > t).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_core_attention_chunks_are_whole_rounds_of_its_warps() {
        assert_eq!(atc_chunk("64"), Some(64));
        assert_eq!(atc_chunk("128"), Some(128));
        assert_eq!(atc_chunk("256"), Some(ATT_MIN_CHUNK));
        for bad in ["0", "32", "96", "320", "512", "x", ""] {
            assert_eq!(atc_chunk(bad), None, "{bad}");
        }
        // The kernels' own constant.
        let src = include_str!("cuda/attn.cuh");
        assert!(
            src.contains(&format!("#define ATT_MIN_CHUNK {ATT_MIN_CHUNK}\n")),
            "attn.cuh's ATT_MIN_CHUNK differs from the host's"
        );
    }

    #[test]
    fn sum8_settings_pick_their_projections() {
        assert_eq!(Sum8::parse("0"), Some(Sum8::Off));
        assert_eq!(Sum8::parse("off"), Some(Sum8::Off));
        assert_eq!(Sum8::parse("1"), Some(Sum8::All));
        assert_eq!(Sum8::parse("all"), Some(Sum8::All));
        assert_eq!(Sum8::parse("gate_up"), Some(Sum8::GateUp));
        assert_eq!(Sum8::parse("yes"), None);
        assert_eq!(Sum8::parse(""), None);
        for swiglu in [false, true] {
            assert!(!Sum8::Off.applies(swiglu));
            assert!(Sum8::All.applies(swiglu));
            assert_eq!(Sum8::GateUp.applies(swiglu), swiglu);
        }
    }

    #[test]
    fn head_groups_cover_each_kv_group_in_parts_of_at_most_four() {
        for group in 1..=32 {
            let (gs, parts) = attn_head_groups(group * 2, 2);
            assert!((1..=4).contains(&gs), "group {group}: {gs} heads a block");
            // The kernel's parts: heads s * gs .. min(gs, group - s * gs), none empty.
            let sizes: Vec<usize> = (0..parts).map(|s| gs.min(group - s * gs)).collect();
            assert!(sizes.iter().all(|&n| n >= 1), "group {group}: {sizes:?}");
            assert_eq!(
                sizes.iter().sum::<usize>(),
                group,
                "group {group}: {sizes:?}"
            );
        }
        assert_eq!(attn_head_groups(32, 8), (4, 1)); // Llama-3-8B
        assert_eq!(attn_head_groups(9, 3), (3, 1)); // SmolLM2-135M
        assert_eq!(attn_head_groups(14, 2), (4, 2)); // Qwen2.5-0.5B: 4 + 3
        assert_eq!(attn_head_groups(16, 16), (1, 1));
    }

    #[test]
    fn attention_splits_into_at_most_the_kernels_chunks() {
        // SmolLM2 (9 heads) and Qwen2.5-0.5B (14): the most; Llama-3-8B (32): 8.
        assert_eq!(attn_chunks(9, 132), 16);
        assert_eq!(attn_chunks(14, 132), 16);
        assert_eq!(attn_chunks(32, 132), 8);
        assert_eq!(attn_chunks(128, 132), 2);
        assert_eq!(attn_chunks(1000, 132), 1);
        assert_eq!(attn_chunks(0, 132), 16);
        for h in 1..300 {
            let c = attn_chunks(h, 132);
            assert!((1..=ATT_MAX_CHUNKS).contains(&c));
            for bucket in BUCKETS {
                let b = attn_blocks_per_head(h, bucket, c, 132);
                assert!(b >= 1 && b <= c, "heads {h} bucket {bucket}: {b} of {c}");
            }
        }
        // Batches of many rows take few blocks a head, small ones many, sharing a head's
        // chunks evenly (a power of two).
        assert_eq!(attn_blocks_per_head(9, 32, 16, 132), 2);
        assert_eq!(attn_blocks_per_head(9, 8, 16, 132), 8);
        assert_eq!(attn_blocks_per_head(32, 8, 8, 132), 2);
        assert_eq!(attn_blocks_per_head(32, 32, 8, 132), 1);
        assert_eq!(attn_blocks_per_head(9, 2, 16, 132), 16);
        assert_eq!(attn_blocks_per_head(14, 4, 16, 132), 8);
        // A smaller card (28 multiprocessors) splits less and spreads fewer blocks.
        assert_eq!(attn_chunks(9, 28), 6);
        assert_eq!(attn_chunks(32, 28), 1);
        assert_eq!(attn_blocks_per_head(9, 8, 6, 28), 1);
        assert_eq!(attn_blocks_per_head(9, 2, 6, 28), 4);
        for h in 1..300 {
            for bucket in BUCKETS {
                assert!(attn_blocks_per_head(h, bucket, 16, 132).is_power_of_two());
            }
        }
    }

    #[test]
    fn activations_quantized_once_on_long_rows_and_small_batched_matrices() {
        assert!(!mv_prequant(576, 3072));
        assert!(!mv_prequant(1536, 576));
        assert!(!mv_prequant(4864, 896)); // Qwen2.5-Coder-0.5B's down projection
        assert!(mv_prequant(4096, 6144) && mv_prequant(4096, 4096) && mv_prequant(4096, 28672));
        assert!(mv_prequant(14336, 4096) && mv_prequant(4096, 128_256));
        // The 8B's Q|K|V and output projection at 8 rows; not its gate|up (rows),
        // vocabulary (rows) or down (shared memory); nothing past 8 rows.
        assert!(mmq(5120, 4096, 8) && mmq(1024, 4096, 8) && mmq(4096, 4096, 8));
        assert!(!mmq(14336, 4096, 8) && !mmq(49152, 4096, 8) && !mmq(4096, 14336, 8));
        assert!(!mmq(4096, 4096, 16) && !mmq(576, 1536, 32));
        assert!(mmq(576, 1536, 8) && mmq(960, 576, 2));
    }

    #[test]
    fn mat_vec_blocks_fall_with_the_row_length() {
        assert_eq!(mv_blocks_per_sm(576), 8);
        assert_eq!(mv_blocks_per_sm(1536), 8);
        assert_eq!(mv_blocks_per_sm(4096), 4);
        assert_eq!(mv_blocks_per_sm(14336), 2);
        let mut last = usize::MAX;
        for k in (32..40_000).step_by(32) {
            let b = mv_blocks_per_sm(k);
            assert!(b >= 1 && b <= last);
            last = b;
        }
    }

    #[test]
    fn tensor_core_kernels_by_size_unless_forced() {
        use TcKernels::*;
        // SmolLM2's projections stay on 8 columns, its gate|up and vocabulary go wide,
        // staged.
        assert_eq!(tc_kernels(576, 32, None, None), Cols8);
        assert_eq!(tc_kernels(960, 64, None, None), Cols8);
        assert_eq!(tc_kernels(1536, 32, None, None), Staged32);
        assert_eq!(tc_kernels(49152, 16, None, None), Staged32);
        // Batches of up to 8 never take the 32-column kernels; large matrices are staged.
        assert_eq!(tc_kernels(128256, 8, Some(true), None), Staged);
        assert_eq!(tc_kernels(6144, 8, None, None), Cols8);
        assert_eq!(tc_kernels(14336, 4, None, None), Staged);
        // Forcing either way wins over the size.
        assert_eq!(tc_kernels(49152, 32, Some(false), Some(true)), Staged);
        assert_eq!(tc_kernels(49152, 32, Some(false), None), Cols8);
        assert_eq!(tc_kernels(49152, 32, None, Some(false)), Cols32);
        assert_eq!(tc_kernels(49152, 32, Some(true), Some(true)), Staged32);
        assert_eq!(tc_kernels(576, 32, Some(true), None), Staged32);
        assert_eq!(tc_kernels(576, 32, Some(true), Some(false)), Cols32);
        assert_eq!(tc_kernels(576, 32, None, Some(true)), Staged);
        assert_eq!(tc_kernels(49152, 8, Some(true), Some(true)), Staged);
        assert_eq!(tc_kernels(576, 8, None, Some(true)), Staged);
        assert_eq!(tc_kernels(128256, 2, Some(true), Some(false)), Cols8);
    }

    #[test]
    fn buckets_hold_every_batch_size_with_the_least_padding() {
        assert_eq!(bucket(0), None);
        assert_eq!(bucket(1), Some(2));
        assert_eq!(bucket(2), Some(2));
        assert_eq!(bucket(3), Some(4));
        assert_eq!(bucket(8), Some(8));
        assert_eq!(bucket(9), Some(16));
        assert_eq!(bucket(33), Some(64));
        assert_eq!(bucket(64), Some(64));
        assert_eq!(bucket(65), None);
        for n in 1..=MAX_BUCKET {
            let b = bucket(n).unwrap();
            assert!(b >= n && (b == BUCKETS[0] || b / 2 < n), "n {n} bucket {b}");
        }
    }

    #[test]
    fn split_covers_every_sequence_once_in_order() {
        assert!(split(0).is_empty());
        assert_eq!(split(5), vec![(0, 5)]);
        assert_eq!(split(64), vec![(0, 64)]);
        assert_eq!(split(130), vec![(0, 64), (64, 64), (128, 2)]);
        for n in [1, 63, 65, 200, 256] {
            let parts = split(n);
            let mut next = 0;
            for &(s, len) in &parts {
                assert_eq!(s, next);
                assert!((1..=MAX_BUCKET).contains(&len));
                next += len;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn column_chunks_fit_shared_memory() {
        let smem = 96 << 10;
        // SmolLM2-135M: hidden 576, ffn 1536: the whole 32-wide batch in one chunk.
        assert_eq!(columns_per_chunk(576, 32, smem), 32);
        assert_eq!(columns_per_chunk(1536, 32, smem), 32);
        assert_eq!(columns_per_chunk(1536, 64, smem), 51);
        // An 8B model's down projection (14336 inputs): a few columns at a time.
        let ch = columns_per_chunk(14336, 64, smem);
        assert_eq!(ch, 5);
        assert!(ch * column_bytes(14336) <= smem);
        // Never zero, never wider than the bucket or the kernel's scratch.
        assert_eq!(columns_per_chunk(1 << 20, 8, smem), 1);
        assert_eq!(columns_per_chunk(32, 4, smem), 4);
        assert_eq!(columns_per_chunk(32, 256, smem), MAX_COLUMNS);
    }

    fn rec(token: u32, pos: usize, layers: usize) -> SeqRecord {
        SeqRecord {
            token,
            pos,
            cap: pos + 256,
            kv: (0..layers as u64)
                .map(|l| (1000 * token as u64 + l, 2000 * token as u64 + l))
                .collect(),
        }
    }

    #[test]
    fn prefill_chunks_fill_their_buckets_and_cover_the_prompt() {
        assert!(prefill_chunks(0).is_empty());
        assert_eq!(prefill_chunks(1), vec![1]);
        assert_eq!(prefill_chunks(2), vec![2]);
        assert_eq!(prefill_chunks(7), vec![4, 2, 1]);
        assert_eq!(prefill_chunks(100), vec![64, 32, 4]);
        assert_eq!(prefill_chunks(512), vec![64; 8]);
        for n in 0..300 {
            let c = prefill_chunks(n);
            assert_eq!(c.iter().sum::<usize>(), n, "n {n}");
            // Every step but a final single token is a whole bucket, largest first.
            for (i, &k) in c.iter().enumerate() {
                assert!(
                    BUCKETS.contains(&k) || (k == 1 && i + 1 == c.len()),
                    "n {n}: {c:?}"
                );
            }
            assert!(c.windows(2).all(|w| w[0] >= w[1]), "n {n}: {c:?}");
        }
    }

    #[test]
    fn prefill_steps_return_only_the_logits_wanted() {
        assert_eq!(prefill_logits(&[false, false]), Logits::None);
        assert_eq!(prefill_logits(&[false, true]), Logits::Last);
        assert_eq!(prefill_logits(&[true]), Logits::Last);
        assert_eq!(prefill_logits(&[true, false]), Logits::All);
        assert_eq!(prefill_logits(&[false, true, true]), Logits::All);
        assert_eq!(prefill_logits(&[true, false, true]), Logits::All);
    }

    #[test]
    fn prefill_steps_hand_back_the_wanted_rows_in_order() {
        for want in [
            vec![false, false, false, false],
            vec![false, false, false, true],
            vec![true, false, false, true],
            vec![false, true, true, false],
        ] {
            let logits = prefill_logits(&want);
            let (back, keep) = rows_back(&want, logits);
            // Every wanted row comes back once, and nothing else is kept.
            assert_eq!(keep.len(), want.iter().filter(|&&w| w).count(), "{want:?}");
            assert!(keep.iter().all(|&i| i < back), "{want:?}");
            assert!(keep.windows(2).all(|w| w[0] < w[1]), "{want:?}");
            if logits == Logits::All {
                assert!(keep.iter().all(|&i| want[i]), "{want:?}");
            }
        }
        assert_eq!(rows_back(&[false, true], Logits::Last), (1, vec![0]));
    }

    #[test]
    fn a_packed_pass_wants_each_prompts_last_row_or_all_of_them() {
        let (want, back) = packed_want(&[(3, false), (1, false), (2, true), (4, false)]);
        assert_eq!(
            want,
            [false, false, true, true, true, true, false, false, false, true]
        );
        assert_eq!(back, [1, 1, 2, 1]);
        // Rows back, sequence by sequence, are exactly the wanted rows.
        assert_eq!(
            back.iter().sum::<usize>(),
            want.iter().filter(|&&w| w).count()
        );
        let (want, back) = packed_want(&[]);
        assert!(want.is_empty() && back.is_empty());
    }

    #[test]
    fn wide_models_prefill_only_short_chunks_in_batched_steps() {
        assert_eq!(default_prefill_max(576), 64);
        assert_eq!(default_prefill_max(896), 64);
        assert_eq!(default_prefill_max(2048), 64);
        assert_eq!(default_prefill_max(4096), 32);
        assert_eq!(default_prefill_max(8192), 32);
    }

    #[test]
    fn long_prompts_prefill_wide_by_default_in_checked_layouts() {
        // f16 GEMMs: any width; int8 GEMMs: up to hidden 1,024.
        assert!(wide_by_default(576, true, true));
        assert!(wide_by_default(4096, true, true));
        assert!(wide_by_default(896, false, true));
        assert!(wide_by_default(1024, false, true));
        assert!(!wide_by_default(4096, false, true));
        // A layout not checked on a GPU (Q4_0) stays on the tensor path either way.
        assert!(!wide_by_default(576, true, false));
        assert!(!wide_by_default(576, false, false));
    }

    #[test]
    fn wide_scratch_counts_each_gemm_kinds_buffers() {
        // Llama-3-8B: 4,096 wide, 32 heads of 128, 8 KV heads, FFN 14,336, 32 layers; the
        // largest matrix is gate|up.
        let s = WideShape {
            hidden: 4096,
            q: 4096,
            kv: 1024,
            ffn: 14336,
            n_layers: 32,
            largest: 2 * 14336 * 4096,
        };
        assert_eq!(s.kmax(), 14336);
        let b = s.buffers(WIDE_ROWS);
        assert_eq!(b.qkv, 1024 * 6144);
        assert_eq!(b.step, 1 + 1024 * (3 + 64));
        assert_eq!(b.xds, 1024 * 2 * 448);
        let common = 4 * 1024 * (4096 + 6144 + 4096 + 4096) + 8 * (1 + 1024 * 67);
        let f16 = 2 * 1024 * 14336
            + 2 * 2 * 14336 * 4096
            + 4 * 1024 * 2 * 14336
            + 2 * 1024 * 14336
            + (32 << 20);
        let int8 = 4 * 1024 * 14336 + 1024 * 14336 + 4 * 1024 * 2 * 448;
        assert_eq!(s.scratch_bytes(true), common + f16);
        assert_eq!(s.scratch_bytes(false), common + int8);
        // About 0.52 GB with the f16 GEMMs, most of it the dequantized gate|up.
        assert!((510_000_000..530_000_000).contains(&s.scratch_bytes(true)));
    }

    #[test]
    fn tcs32_stage_sizes() {
        // Rounds of 8 blocks (static shared memory: two stages under 48 KB) and of 16
        // (dynamic: SwiGLU's Q4_K pair the largest, 70,656 bytes for two).
        assert_eq!(
            tcs32_stage_bytes(16, 1, 8, 32),
            2304 + 1024 + 128 + 256 + 8704 + 2048
        );
        assert!(2 * tcs32_stage_bytes(32, 2, 8, 32) <= 48 << 10);
        assert_eq!(2 * tcs32_stage_bytes(16, 2, 16, 32), 70_656);
        assert_eq!(2 * tcs32_stage_bytes(32, 1, 16, 32), 64_512);
        assert!(tcs32_stage_bytes(32, 2, 16, 32) > tcs32_stage_bytes(16, 2, 16, 32));
        // 16 columns (tcs16_*): the activations' half of the stage halves; two SwiGLU
        // blocks' Q4_K stages fit a multiprocessor's 228 KB.
        assert_eq!(
            tcs32_stage_bytes(16, 2, 16, 32) - tcs32_stage_bytes(16, 2, 16, 16),
            16 * (16 * 32 + 16) + 16 * 16 * 8
        );
        assert!(2 * 2 * tcs32_stage_bytes(16, 2, 16, 16) < 228 << 10);
        for (qb, r, rb, c) in [
            (16, 1, 8, 32),
            (32, 2, 16, 32),
            (16, 2, 16, 16),
            (32, 1, 16, 16),
        ] {
            assert_eq!(tcs32_stage_bytes(qb, r, rb, c) % 16, 0);
        }
    }

    #[test]
    fn batches_of_up_to_16_take_16_column_blocks() {
        assert_eq!(staged_columns(16, None, 4096, 132), 16);
        assert_eq!(staged_columns(16, Some(true), 4096, 132), 16);
        assert_eq!(staged_columns(16, Some(false), 4096, 132), 32);
        assert_eq!(staged_columns(32, None, 4096, 132), 32);
        assert_eq!(staged_columns(32, Some(true), 4096, 132), 16);
        assert_eq!(staged_columns(64, Some(true), 4096, 132), 16);
        assert_eq!(staged_columns(64, Some(false), 4096, 132), 32);
    }

    #[test]
    fn small_matrices_of_wide_batches_take_16_column_blocks() {
        // An 8B's K and V (1,024 rows): 64 blocks of 32 columns on 132 multiprocessors.
        assert_eq!(staged_columns(32, None, 1024, 132), 16);
        // Its Q and output projection (4,096 rows): 256 blocks.
        assert_eq!(staged_columns(32, None, 4096, 132), 32);
        // 64 columns of the same K: 128 blocks, still under one a multiprocessor.
        assert_eq!(staged_columns(64, None, 1024, 132), 16);
        assert_eq!(staged_columns(64, None, 2048, 132), 32);
        // Forced either way, whatever the size.
        assert_eq!(staged_columns(32, Some(false), 1024, 132), 32);
    }

    #[test]
    fn wide_kernels_take_chunks_of_more_than_eight_columns() {
        assert!(!wide_columns(1));
        assert!(!wide_columns(8));
        assert!(wide_columns(9));
        assert!(wide_columns(64));
    }

    /// The CUDA mat-vec (rows_dot) and the tensor-core mat-mat (tc.cuh) must add a row's
    /// half-block terms in the same order for batched decode to stay bit-identical to
    /// single-stream decode. Modelled here in f32 on the CPU: the mat-vec's lane j sums
    /// terms j, j + 32, ... and the warp adds the 32 lane sums with xor partners 16, 8,
    /// 4, 2, 1; the tensor-core block's warp w keeps lanes w + 8l (l = 0..3), adds them as
    /// (l0 + l2) + (l1 + l3), then pairs warps 4, 2, 1 apart.
    #[test]
    fn tensor_core_sum_order_is_the_mat_vec_lane_tree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut sequential_differs = 0;
        for trial in 0..2000 {
            let nh = [1, 7, 32, 36, 48, 96, 256, 448, 896][trial % 9];
            let terms: Vec<(f32, f32)> = (0..nh)
                .map(|_| {
                    let scale = 10f32.powi(rng.gen_range(-3..4));
                    (
                        rng.gen_range(-1.0..1.0) * scale,
                        rng.gen_range(-40.0..40.0f32).round(),
                    )
                })
                .collect();
            let lane = |j: usize| {
                let mut acc = 0f32;
                for i in (j..nh).step_by(32) {
                    acc = terms[i].0.mul_add(terms[i].1, acc);
                }
                acc
            };
            // The mat-vec: a warp's xor butterfly over its 32 lane sums.
            let mut v: Vec<f32> = (0..32).map(lane).collect();
            for o in [16, 8, 4, 2, 1] {
                let prev = v.clone();
                for (l, x) in v.iter_mut().enumerate() {
                    *x = prev[l] + prev[l ^ o];
                }
            }
            let matvec = v[0];
            // The tensor-core block.
            let mut w: Vec<f32> = (0..8)
                .map(|w| (lane(w) + lane(w + 16)) + (lane(w + 8) + lane(w + 24)))
                .collect();
            for o in [4, 2, 1] {
                for k in 0..o {
                    w[k] += w[k + o];
                }
            }
            assert_eq!(matvec.to_bits(), w[0].to_bits(), "nh {nh}, trial {trial}");
            let sequential = terms.iter().fold(0f32, |acc, t| t.0.mul_add(t.1, acc));
            sequential_differs += usize::from(sequential.to_bits() != matvec.to_bits());
        }
        // The order matters: summing in K order gives other bits for many rows.
        assert!(sequential_differs > 100, "{sequential_differs}");
    }

    /// The eight-part order (sum8.cuh): the mat-vec's lane p of a row adds blocks p, p +
    /// 8, ... in order, then 8 lanes add their sums with xor partners 4, 2, 1; the
    /// tensor-core block's warp w takes, round by round (`rb` blocks, a multiple of 8),
    /// the round's blocks w, w + 8, ..., and the warps add their sums 4, 2, 1 apart. Both
    /// are the same f32 operations on the same values in the same order.
    #[test]
    fn eight_part_sums_are_the_same_in_the_mat_vec_and_the_tensor_core_block() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut sequential_differs = 0;
        for trial in 0..2000 {
            let nb = [1, 7, 8, 18, 48, 128, 448, 152][trial % 8];
            let rb = [8, 16][trial % 2];
            // A block's term: (weight scale * activation scale, integer dot), then an
            // offset term for the kinds that have one.
            let terms: Vec<(f32, f32, f32)> = (0..nb)
                .map(|_| {
                    let scale = 10f32.powi(rng.gen_range(-3..4));
                    (
                        rng.gen_range(-1.0..1.0) * scale,
                        rng.gen_range(-4000.0..4000.0f32).round(),
                        rng.gen_range(-1.0..1.0) * scale,
                    )
                })
                .collect();
            let add = |z: f32, b: usize| {
                let (d, s, m) = terms[b];
                m.mul_add(1.0, d.mul_add(s, z))
            };
            // The mat-vec: 8 lanes, then the xor butterfly.
            let mut v: Vec<f32> = (0..8).map(|p| (p..nb).step_by(8).fold(0f32, add)).collect();
            for o in [4, 2, 1] {
                let prev = v.clone();
                for (l, x) in v.iter_mut().enumerate() {
                    *x = prev[l] + prev[l ^ o];
                }
            }
            // The tensor-core block: rounds of rb blocks, warp w the round's w, w + 8, ...
            let mut acc = [0f32; 8];
            for b0 in (0..nb).step_by(rb) {
                for (w, z) in acc.iter_mut().enumerate() {
                    for bl in (w..rb).step_by(8) {
                        if b0 + bl < nb {
                            *z = add(*z, b0 + bl);
                        }
                    }
                }
            }
            for o in [4, 2, 1] {
                for k in 0..o {
                    acc[k] += acc[k + o];
                }
            }
            assert_eq!(
                v[0].to_bits(),
                acc[0].to_bits(),
                "nb {nb}, rb {rb}, trial {trial}"
            );
            let sequential = (0..nb).fold(0f32, add);
            sequential_differs += usize::from(sequential.to_bits() != v[0].to_bits());
        }
        assert!(sequential_differs > 100, "{sequential_differs}");
    }

    /// The mat-mats' `i2f_exact` (prefill.cuh): an integer sum's float by adding it to
    /// the bits of 1.5 * 2^23 and taking 1.5 * 2^23 away is `(float)c` for every |c| <
    /// 2^22 (an mma's sums stay under 2^19).
    #[test]
    fn integer_sums_convert_exactly_without_the_conversion_unit() {
        let i2f = |c: i32| f32::from_bits((0x4B40_0000 + c) as u32) - 12_582_912.0;
        for c in (-(1 << 22) + 1)..(1 << 22) {
            assert_eq!(i2f(c).to_bits(), (c as f32).to_bits(), "{c}");
        }
    }

    #[test]
    fn eight_part_tiles_are_the_largest_that_cover_the_card() {
        // Llama-3-8B's shape at 32 columns on an H100 (132 multiprocessors).
        assert_eq!(s8_tile(14336, true, 32, 132, None), (2, 4)); // gate|up: 448 blocks
        assert_eq!(s8_tile(5120, false, 32, 132, None), (2, 4)); // Q|K: 160 blocks
        assert_eq!(s8_tile(4096, false, 32, 132, None), (1, 4)); // down, output: 256
        assert_eq!(s8_tile(1024, false, 32, 132, None), (1, 1)); // V: 256 blocks
        assert_eq!(s8_tile(128_256, false, 32, 132, None), (4, 4));
        // 64 columns: two column blocks a row tile.
        assert_eq!(s8_tile(4096, false, 64, 132, None), (2, 4));
        // Narrow buckets take narrow column tiles.
        assert_eq!(s8_tile(14336, true, 8, 132, None), (2, 1));
        assert_eq!(s8_tile(4096, false, 8, 132, None), (1, 1));
        // SmolLM2's small matrices: the smallest tile, blocks on every multiprocessor.
        assert_eq!(s8_tile(576, false, 32, 132, None), (1, 1));
        assert_eq!(s8_tile(960, false, 32, 132, None), (1, 1));
        assert_eq!(s8_tile(1536, true, 32, 132, None), (1, 2));
        assert_eq!(s8_tile(576, false, 16, 132, None), (1, 1));
        assert_eq!(s8_tile(576, false, 2, 132, None), (1, 1));
        assert_eq!(s8_tile(49152, false, 32, 132, None), (4, 4));
        // Forced rows, within what the kernels have.
        assert_eq!(s8_tile(49152, false, 32, 132, Some(16)), (1, 4));
        assert_eq!(s8_tile(576, false, 32, 132, Some(64)), (4, 1));
        assert_eq!(s8_tile(49152, true, 32, 132, Some(64)), (2, 4));
        assert_eq!(s8_tile(14336, true, 32, 132, Some(48)), (2, 4));
        // Every tile is one the kernels have.
        for rows in [1, 16, 576, 1024, 4096, 14336, 128_256] {
            for bucket in BUCKETS {
                for swiglu in [false, true] {
                    let (rt, nt) = s8_tile(rows, swiglu, bucket, 132, None);
                    assert!([1, 2, 4].contains(&rt) && [1, 2, 4].contains(&nt));
                    assert!(!swiglu || rt <= 2);
                }
            }
        }
    }

    #[test]
    fn eight_part_stage_sizes() {
        // sum8.cuh's static_asserts and the host's sizes of its dynamic shared memory:
        // Q4_K, 64 rows, 32 columns, rounds of 16 blocks.
        assert_eq!(
            s8_stage_bytes(16, true, 64, 32, 16),
            17408 + 1024 + 2560 + 16896 + 4352
        );
        // Q8_0's rounds of 8 blocks.
        assert_eq!(
            s8_stage_bytes(32, false, 64, 32, 8),
            17408 + 4608 + 8704 + 2304
        );
        // Every kernel's stage buffers fit twice in an H100's 227 KiB.
        for (qb, q4k) in [(16, true), (16, false), (32, false)] {
            let rb = s8_round_blocks(qb);
            for (r, rt) in [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)] {
                for nt in [1, 2, 4] {
                    let bytes = s8_stage_bytes(qb, q4k, 16 * r * rt, 8 * nt, rb);
                    assert_eq!(bytes % 16, 0);
                    assert!(
                        2 * s8_stages(r, rt, nt) * bytes <= 227 << 10,
                        "{r} {rt} {nt}"
                    );
                }
            }
        }
        assert_eq!(s8_stages(1, 1, 2), 4);
        assert_eq!(s8_stages(1, 1, 4), 3);
        assert_eq!(s8_stages(2, 2, 4), 2);
    }

    #[test]
    fn step_buffer_has_the_count_then_one_record_per_sequence() {
        let mut w = vec![7; 3];
        let seqs = [rec(5, 10, 2), rec(9, 0, 2), rec(3, 300, 2)];
        fill_step(&mut w, &seqs, 4, 2).unwrap();
        assert_eq!(w.len(), step_words(4, 2));
        assert_eq!(w[0], 3);
        let r = record_words(2);
        // Record b starts at word 1 + b * r, in the single-stream step buffer's order.
        assert_eq!(&w[1..1 + r], &[5, 10, 266, 5000, 5001, 10000, 10001]);
        assert_eq!(&w[1 + r..1 + 2 * r], &[9, 0, 256, 9000, 9001, 18000, 18001]);
        assert_eq!(w[1 + 2 * r], 3);
        assert_eq!(w[1 + 2 * r + 1], 300);
        // The padding record is zero.
        assert!(w[1 + 3 * r..].iter().all(|&x| x == 0));
    }

    #[test]
    fn step_buffer_refuses_bad_batches() {
        let mut w = Vec::new();
        assert!(fill_step(&mut w, &[], 2, 2).is_err());
        assert!(fill_step(&mut w, &[rec(1, 0, 2), rec(2, 0, 2), rec(3, 0, 2)], 2, 2).is_err());
        assert!(fill_step(&mut w, &[rec(1, 0, 3)], 2, 2).is_err());
        let mut full = rec(1, 5, 2);
        full.cap = 5;
        assert!(fill_step(&mut w, &[full], 2, 2).is_err());
    }

    #[test]
    fn one_token_of_one_sequence_is_not_a_packed_prefill() {
        assert!(!packed_prefill(&[1]));
        assert!(!packed_prefill(&[1, 1, 1]));
        assert!(packed_prefill(&[2]));
        assert!(packed_prefill(&[5, 1]));
        assert!(packed_prefill(&[1, 1, 3]));
    }

    #[test]
    fn only_passes_of_several_short_chunks_are_batched() {
        assert!(!batched(&[], 64));
        assert!(!batched(&[1], 64));
        assert!(batched(&[1, 1], 64));
        assert!(batched(&vec![1; 40], 64));
        assert!(batched(&[1, 5, 1], 64));
        assert!(batched(&[64, 3], 64));
        assert!(!batched(&[65, 3], 64));
        assert!(!batched(&[0, 3], 64));
    }

    #[test]
    fn token_steps_feed_every_token_once_in_order() {
        assert!(token_steps(&[]).is_empty());
        assert_eq!(token_steps(&[1, 1, 1]), vec![vec![0, 1, 2]]);
        assert_eq!(
            token_steps(&[2, 1, 3]),
            vec![vec![0, 1, 2], vec![0, 2], vec![2]]
        );
        let lens = [5, 1, 40, 17, 40];
        let steps = token_steps(&lens);
        assert_eq!(steps.len(), 40);
        for (i, &n) in lens.iter().enumerate() {
            let fed: Vec<usize> = (0..steps.len())
                .filter(|&t| steps[t].contains(&i))
                .collect();
            assert_eq!(fed, (0..n).collect::<Vec<_>>(), "sequence {i}");
        }
    }

    #[test]
    fn tensor_core_attention_covers_the_common_shapes_within_default_shared_memory() {
        // Llama-3-8B, SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-7B: covered.
        for (hd, nh, nkv) in [(128, 32, 8), (64, 9, 3), (64, 14, 2), (128, 28, 4)] {
            assert!(attn_tc_fits(hd, nh, nkv), "{hd} {nh} {nkv}");
        }
        // Gemma 3's 256-value heads, 80-value heads, groups past 16 heads, no KV heads.
        for (hd, nh, nkv) in [
            (256, 8, 4),
            (80, 32, 32),
            (128, 64, 2),
            (128, 8, 0),
            (128, 12, 8),
        ] {
            assert!(!attn_tc_fits(hd, nh, nkv), "{hd} {nh} {nkv}");
        }
        // The largest block fits the 48 KiB a launch gets without an attribute.
        assert!(attn_tc_smem(128, ATC_ROWS) <= 48 * 1024);
        assert_eq!(attn_tc_smem(64, 3), 4 * (16 * 64 + 128 + 128 + 4 * 3 * 64));
    }

    #[test]
    fn packed_wide_passes_cover_every_row_once_in_order() {
        let lens = [30, 1, 700, 500, 0, 9];
        let passes = wide_passes(&lens, 1024);
        assert_eq!(passes.len(), 2);
        for p in &passes {
            // Rows of a pass are consecutive from 0 and within the cap.
            let mut row = 0;
            for s in p {
                assert_eq!(s.row, row);
                row += s.n;
            }
            assert!(row <= 1024 && row > 0);
        }
        // The 500-token chunk is cut at the first pass's end and continues the next.
        assert_eq!(
            passes[0].last(),
            Some(&WideSeg {
                seq: 3,
                start: 0,
                n: 293,
                row: 731
            })
        );
        assert_eq!(
            passes[1][0],
            WideSeg {
                seq: 3,
                start: 293,
                n: 207,
                row: 0
            }
        );
        for (seq, &len) in lens.iter().enumerate() {
            let mut next = 0;
            for s in passes.iter().flatten().filter(|s| s.seq == seq) {
                assert_eq!(s.start, next, "sequence {seq}");
                next += s.n;
            }
            assert_eq!(next, len, "sequence {seq}");
        }
        // A chunk longer than several passes; nothing at all.
        let long = wide_passes(&[2500], 1024);
        let ns: Vec<usize> = long.iter().map(|p| p[0].n).collect();
        assert_eq!(ns, [1024, 1024, 452]);
        assert!(wide_passes(&[], 1024).is_empty());
        assert!(wide_passes(&[0, 0], 1024).is_empty());
    }

    #[test]
    fn packed_wide_passes_take_several_prompts_past_the_batched_limit() {
        // 32 prompts of 30 tokens with a 32-token limit: 960 rows, packed.
        assert!(packed_wide(&[30; 32], 32));
        // Long and short chunks together.
        assert!(packed_wide(&[500, 3, 1], 64));
        // A decode step of 40 sequences is never packed, however many rows.
        assert!(!packed_wide(&[1; 40], 32));
        // One sequence: its own wide passes; few rows: batched steps.
        assert!(!packed_wide(&[4000], 64));
        assert!(!packed_wide(&[20, 30], 64));
        assert!(!packed_wide(&[], 0));
    }
}

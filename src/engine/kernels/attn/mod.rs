//! Attention of one query head over one KV head of an f16 cache, on the CPU.
//!
//! The arithmetic is that of ggml's CPU flash-attention kernel for one query row (the
//! path llama.cpp takes for decoding and for prompts shorter than its 64-row tile, as
//! built for x86 with AVX-512): Q rounded to f16; each score is the f16 dot product
//! `q · k` summed the way ggml's AVX-512 `ggml_vec_dot_f16` sums it (64 lanes with
//! fused multiply-adds, its fixed reduction tree), times the scale; an online softmax
//! over the positions in order, with `expf`; the weighted sum of V kept in f16 (each
//! step `acc = f16(fma(v, w, acc))`, rescaled in f16 when the maximum grows); the sum of
//! weights as `S = fma(S, ms, w)`; at the end `f32(acc) * (1 / S)`.
//!
//! The implementations, picked once at run time, give bit-identical results: the
//! portable loop (the reference); on x86-64 an AVX-512 kernel ([`avx512`]) that splits
//! the work into passes, the same passes over AVX2 registers ([`passes`], [`avx2`]),
//! each computing `expf` 16 or 8 lanes at a time ([`expf`], checked against the C
//! library's `expf` before it is used), and an AVX2 + F16C + FMA version of the loop
//! where that check fails (another libm) or a head is wider than 256. On aarch64 a NEON version of the
//! loop (`neon`) takes the place of the x86 ones.
//!
//! A bf16 cache has its own entry point ([`attend_heads_bf16`], in [`wide`]): the same
//! loop in f32 throughout, on the portable, AVX2 and AVX-512 paths.

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod expf;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod passes;
mod q8;
#[cfg(target_arch = "x86_64")]
mod q8_avx2;
mod wide;

pub use q8::{attend_heads_q8, fwht, Q8Rows};
pub use wide::attend_heads_bf16;

/// A value the kernels read (from Q, a cache row or an accumulator): how it widens to
/// f32 (exactly, for every type here) and how an f32 rounds to it.
trait Elem: Copy {
    const ZERO: Self;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f16 {
    const ZERO: Self = f16::ZERO;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Elem for bf16 {
    const ZERO: Self = bf16::ZERO;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// Which implementation runs, slowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    Portable,
    /// aarch64 NEON: the portable loop's element steps four and eight lanes at a time
    /// ([`neon`]).
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// AVX2, FMA and F16C: the portable loop's element steps eight lanes at a time,
    /// `expf` from the C library.
    Avx2Loop,
    /// The same features and an 8-lane `expf` equal to the C library's: the passes of
    /// [`passes`] on AVX2 registers.
    Avx2,
    /// AVX-512 F/BW/VL/DQ on top of `Avx2`, and a 16-lane `expf` equal to the C
    /// library's: the passes on AVX-512 registers ([`avx512`]).
    Avx512,
}

fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(detect)
}

/// For the q8_0 kernel: 0 portable, 1 AVX2 + FMA + F16C, 2 that and the 8-lane `expf`,
/// 3 the 16-lane `expf`;
/// on aarch64 1 NEON, 2 NEON with `sdot` (when the matmuls' level, [`quant::isa`], is
/// [`quant::Isa::NeonDot`]).
///
/// [`quant::isa`]: super::quant::isa
/// [`quant::Isa::NeonDot`]: super::quant::Isa::NeonDot
fn simd_level() -> u8 {
    match path() {
        Path::Portable => 0,
        #[cfg(target_arch = "aarch64")]
        Path::Neon => 1 + u8::from(super::quant::isa() == super::quant::Isa::NeonDot),
        Path::Avx2Loop => 1,
        Path::Avx2 => 2,
        Path::Avx512 => 3,
    }
}

/// The attention path in use, by name (`portable`, `neon`, `avx2-loop`, `avx2`, `avx512`).
pub fn level_name() -> &'static str {
    match path() {
        Path::Portable => "portable",
        #[cfg(target_arch = "aarch64")]
        Path::Neon => "neon",
        Path::Avx2Loop => "avx2-loop",
        Path::Avx2 => "avx2",
        Path::Avx512 => "avx512",
    }
}

/// The best path the CPU supports, or a slower one named by `CANDELA_ATTN_PATH`
/// (`portable`, `avx2-loop` or `avx2`; for comparing them in benches).
fn detect() -> Path {
    let cap = match std::env::var("CANDELA_ATTN_PATH").as_deref() {
        Ok("portable") => Path::Portable,
        Ok("avx2-loop") => Path::Avx2Loop,
        Ok("avx2") => Path::Avx2,
        _ => Path::Avx512,
    };
    best().min(cap)
}

fn best() -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            if has!("avx512f")
                && has!("avx512bw")
                && has!("avx512vl")
                && has!("avx512dq")
                && expf::agrees_with_libm()
            {
                return Path::Avx512;
            }
            if expf::agrees_with_libm_avx2() {
                return Path::Avx2;
            }
            return Path::Avx2Loop;
        }
    }
    // NEON is baseline on aarch64.
    #[cfg(target_arch = "aarch64")]
    return Path::Neon;
    #[cfg(not(target_arch = "aarch64"))]
    Path::Portable
}

/// The paths this CPU can run, the reference first (for tests and benches).
#[cfg(test)]
fn paths() -> Vec<Path> {
    match path() {
        Path::Portable => vec![Path::Portable],
        #[cfg(target_arch = "aarch64")]
        Path::Neon => vec![Path::Portable, Path::Neon],
        Path::Avx2Loop => vec![Path::Portable, Path::Avx2Loop],
        Path::Avx2 => vec![Path::Portable, Path::Avx2Loop, Path::Avx2],
        Path::Avx512 => vec![Path::Portable, Path::Avx2Loop, Path::Avx2, Path::Avx512],
    }
}

/// One group of up to [`MAX_GROUP`] heads through the passes of `path` (AVX-512 or
/// AVX2), over an f16 or bf16 cache.
///
/// # Safety
/// `path` is `Avx512` or `Avx2` and its features were detected; `hd <= 256`.
#[cfg(target_arch = "x86_64")]
unsafe fn passes_group<E: avx512::Lanes + passes::Cache>(
    path: Path,
    q: &[f32],
    hd: usize,
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
) {
    macro_rules! by_group {
        ($m:ident) => {
            match q.len() / hd {
                1 => $m::heads::<E, 1>(q, hd, k, v, scale, out),
                2 => $m::heads::<E, 2>(q, hd, k, v, scale, out),
                3 => $m::heads::<E, 3>(q, hd, k, v, scale, out),
                _ => $m::heads::<E, 4>(q, hd, k, v, scale, out),
            }
        };
    }
    // SAFETY: the caller's.
    unsafe {
        if path == Path::Avx512 {
            by_group!(avx512)
        } else {
            by_group!(avx2)
        }
    }
}

/// Prefetch the cache lines of `x` into L1 (the x86 kernels' cold cache rows).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse")]
fn prefetch<T>(x: &[T]) {
    use std::arch::x86_64::*;
    for c in x.chunks(64 / size_of::<T>()) {
        _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().cast());
    }
}

/// [`heads_body`] with the NEON steps: Q as `Qt` (f16 over an f16 cache, f32 over bf16),
/// the cache's `E`, accumulators as `At` (f16 or f32).
#[cfg(target_arch = "aarch64")]
fn heads_neon<Qt: neon::Widen8, E: neon::Widen8, At: neon::Narrow8>(
    q: &[f32],
    hd: usize,
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
) {
    heads_body(
        q,
        hd,
        k,
        v,
        scale,
        out,
        // SAFETY (the three): NEON is baseline on aarch64; equal lengths.
        |a: &[Qt], b| unsafe { neon::dot(a, b) },
        |a: &mut [At], x, w| unsafe { neon::mad(a, x, w) },
        |a: &mut [At], w| unsafe { neon::scale(a, w) },
    )
}

/// Lanes of ggml's AVX-512 f16 dot product: four 16-lane accumulators.
const LANES: usize = 64;

/// The end of ggml's reduction of the 64 lanes. Its four 16-lane registers are first
/// added lane by lane (`r0 += r2`, `r1 += r3`, `r0 += r1`; the callers do that), then
/// `_mm512_reduce_add_ps(r0)` halves 16 -> 8 -> 4 lanes and adds `(u0 + u2) + (u1 + u3)`.
/// `lo` and `hi` are lanes `0..8` and `8..16` of `r0`.
#[inline]
fn reduce16(lo: [f32; 8], hi: [f32; 8]) -> f32 {
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = hi[i] + lo[i];
    }
    let u = [t[4] + t[0], t[5] + t[1], t[6] + t[2], t[7] + t[3]];
    (u[0] + u[2]) + (u[1] + u[3])
}

/// `out = softmax(q·K^T * scale) V` over the `k.len() / q.len()` cached positions.
/// `k` and `v` are `(positions, head_dim)`, `out` is `head_dim`.
pub fn attend(q: &[f32], k: &[f16], v: &[f16], scale: f32, out: &mut [f32]) {
    attend_heads_with(path(), q, q.len(), k, v, scale, out)
}

fn attend_with(simd: bool, q: &[f32], k: &[f16], v: &[f16], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    debug_assert!(v.len() == k.len() && out.len() == hd);
    if hd > 256 {
        // Heads wider than any model we know of take the allocating road.
        let mut qh = vec![f16::ZERO; hd];
        let mut acc = vec![f16::ZERO; hd];
        return attend_in(simd, q, k, v, scale, out, &mut qh, &mut acc);
    }
    let mut qh = [f16::ZERO; 256];
    let mut acc = [f16::ZERO; 256];
    attend_in(simd, q, k, v, scale, out, &mut qh[..hd], &mut acc[..hd])
}

#[allow(clippy::too_many_arguments)]
fn attend_in(
    simd: bool,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    scale: f32,
    out: &mut [f32],
    qh: &mut [f16],
    acc: &mut [f16],
) {
    attend_one(
        q,
        k,
        v,
        scale,
        out,
        qh,
        acc,
        |a, b| dot(simd, a, b),
        |a, x, w| mad_h(simd, a, x, w),
        |a, w| scale_h(simd, a, w),
    )
}

/// The loop of one head: Q rounded to `Qt` in `qh`, the weighted sum of V kept in `At`
/// in `acc`, with the given dot product, `acc = At(fma(v, w, acc))` and
/// `acc = At(acc * w)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_one<Qt: Elem, E: Copy, At: Elem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
    qh: &mut [Qt],
    acc: &mut [At],
    dotf: impl Fn(&[Qt], &[E]) -> f32,
    madf: impl Fn(&mut [At], &[E], f32),
    scalef: impl Fn(&mut [At], f32),
) {
    let hd = q.len();
    let len = k.len() / hd;
    for (d, &x) in qh.iter_mut().zip(q) {
        *d = Qt::from_f32(x);
    }
    acc.fill(At::ZERO);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
    for j in 0..len {
        let s = dotf(qh, &k[j * hd..(j + 1) * hd]) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            let old = m;
            m = s;
            ms = (old - m).exp();
            scalef(acc, ms);
        } else {
            vs = (s - m).exp();
        }
        madf(acc, &v[j * hd..(j + 1) * hd], vs);
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
    }
}

/// Heads sharing one KV head, at most this many interleaved in one pass.
const MAX_GROUP: usize = 4;

/// [`attend`] for the `q.len() / hd` query heads that share one KV head (grouped-query
/// attention), side by side in `q` and `out`. Each head gets exactly what [`attend`]
/// gives it; the heads are interleaved position by position, so the K and V rows are
/// read once for all of them and their independent chains (dot, `exp`, f16 update)
/// overlap in the CPU.
pub fn attend_heads(q: &[f32], hd: usize, k: &[f16], v: &[f16], scale: f32, out: &mut [f32]) {
    attend_heads_with(path(), q, hd, k, v, scale, out)
}

fn attend_heads_with(
    path: Path,
    q: &[f32],
    hd: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    out: &mut [f32],
) {
    debug_assert!(hd > 0 && q.len().is_multiple_of(hd) && out.len() == q.len());
    let simd = path != Path::Portable;
    if hd > 256 {
        for (qh, o) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            attend_with(simd, qh, k, v, scale, o);
        }
        return;
    }
    for (qg, og) in q.chunks(MAX_GROUP * hd).zip(out.chunks_mut(MAX_GROUP * hd)) {
        #[cfg(target_arch = "x86_64")]
        if matches!(path, Path::Avx512 | Path::Avx2) {
            // SAFETY: the path's features were detected; `hd <= 256 = passes::MAX_HD`.
            unsafe { passes_group(path, qg, hd, k, v, scale, og) };
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2, FMA and F16C were detected.
            unsafe { heads_f16c(qg, hd, k, v, scale, og) };
            continue;
        }
        #[cfg(target_arch = "aarch64")]
        if simd {
            heads_neon::<f16, f16, f16>(qg, hd, k, v, scale, og);
            continue;
        }
        heads_body(
            qg,
            hd,
            k,
            v,
            scale,
            og,
            |a, b| dot(false, a, b),
            |a, x, w| mad_h(false, a, x, w),
            |a, w| scale_h(false, a, w),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn heads_f16c(q: &[f32], hd: usize, k: &[f16], v: &[f16], scale: f32, out: &mut [f32]) {
    heads_body(
        q,
        hd,
        k,
        v,
        scale,
        out,
        // SAFETY (the three): the features are enabled here; equal lengths.
        |a: &[f16], b| unsafe { dot_f16c(a, b) },
        |a, x, w| unsafe { mad_f16c(a, x, w) },
        |a, w| unsafe { scale_f16c(a, w) },
    )
}

/// The loop of [`attend_one`] for up to [`MAX_GROUP`] heads at once (`hd <= 256`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn heads_body<Qt: Elem, E: Copy, At: Elem>(
    q: &[f32],
    hd: usize,
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
    dotf: impl Fn(&[Qt], &[E]) -> f32,
    madf: impl Fn(&mut [At], &[E], f32),
    scalef: impl Fn(&mut [At], f32),
) {
    let gn = q.len() / hd;
    let len = k.len() / hd;
    let mut qh = [[Qt::ZERO; 256]; MAX_GROUP];
    let mut acc = [[At::ZERO; 256]; MAX_GROUP];
    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut sum = [0f32; MAX_GROUP];
    for h in 0..gn {
        for (d, &x) in qh[h][..hd].iter_mut().zip(&q[h * hd..(h + 1) * hd]) {
            *d = Qt::from_f32(x);
        }
    }
    for j in 0..len {
        let kj = &k[j * hd..(j + 1) * hd];
        let vj = &v[j * hd..(j + 1) * hd];
        for h in 0..gn {
            let acc = &mut acc[h][..hd];
            let s = dotf(&qh[h][..hd], kj) * scale;
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > m[h] {
                let old = m[h];
                m[h] = s;
                ms = (old - s).exp();
                scalef(acc, ms);
            } else {
                vs = (s - m[h]).exp();
            }
            madf(acc, vj, vs);
            sum[h] = sum[h].mul_add(ms, vs);
        }
    }
    for h in 0..gn {
        let inv = if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] };
        for (o, a) in out[h * hd..(h + 1) * hd].iter_mut().zip(&acc[h][..hd]) {
            *o = a.to_f32() * inv;
        }
    }
}

/// `q · k` over f16 inputs, summed as ggml's AVX-512 `ggml_vec_dot_f16`: lane `i % 64`
/// of the first `n - n % 64` elements by fused multiply-add, the lanes reduced in
/// ggml's tree, the rest added in f64.
#[inline]
fn dot(simd: bool, q: &[f16], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2, FMA and F16C were detected; slices have equal length.
        return unsafe { dot_f16c(q, k) };
    }
    #[cfg(target_arch = "aarch64")]
    if simd {
        // SAFETY: NEON is baseline on aarch64; slices have equal length.
        return unsafe { neon::dot(q, k) };
    }
    let _ = simd;
    dot_ref(q, k)
}

/// The portable [`dot`], for any element types.
#[inline]
fn dot_ref<Q: Elem, E: Elem>(q: &[Q], k: &[E]) -> f32 {
    let n = q.len();
    let np = n / LANES * LANES;
    let mut acc = [0f32; LANES];
    for c in 0..np / LANES {
        for (l, a) in acc.iter_mut().enumerate() {
            let i = c * LANES + l;
            *a = k[i].to_f32().mul_add(q[i].to_f32(), *a);
        }
    }
    // Registers of 16 lanes: r = (r0 + r2) + (r1 + r3), lane by lane.
    let r = |l: usize| (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]);
    let lo: [f32; 8] = std::array::from_fn(r);
    let hi: [f32; 8] = std::array::from_fn(|l| r(8 + l));
    tail(reduce16(lo, hi), q, k, np)
}

/// ggml's leftovers of the dot product: products rounded to f32, summed in f64.
#[inline]
fn tail<Q: Elem, E: Elem>(head: f32, q: &[Q], k: &[E], np: usize) -> f32 {
    let mut s = head as f64;
    for i in np..q.len() {
        s += (k[i].to_f32() * q[i].to_f32()) as f64;
    }
    s as f32
}

/// `acc = f16(fma(v, w, f32(acc)))`, element by element (ggml's `ggml_vec_mad_f16`).
#[inline]
fn mad_h(simd: bool, acc: &mut [f16], v: &[f16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as for `dot`.
        return unsafe { mad_f16c(acc, v, w) };
    }
    #[cfg(target_arch = "aarch64")]
    if simd {
        // SAFETY: as for `dot`.
        return unsafe { neon::mad(acc, v, w) };
    }
    let _ = simd;
    mad_ref(acc, v, w)
}

/// The portable [`mad_h`], for any accumulator and element type.
#[inline]
fn mad_ref<A: Elem, E: Elem>(acc: &mut [A], v: &[E], w: f32) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = A::from_f32(x.to_f32().mul_add(w, a.to_f32()));
    }
}

/// `acc = f16(f32(acc) * w)` (ggml's `ggml_vec_scale_f16`).
#[inline]
fn scale_h(simd: bool, acc: &mut [f16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as for `dot`.
        return unsafe { scale_f16c(acc, w) };
    }
    #[cfg(target_arch = "aarch64")]
    if simd {
        // SAFETY: NEON is baseline on aarch64.
        return unsafe { neon::scale(acc, w) };
    }
    let _ = simd;
    scale_ref(acc, w)
}

/// The portable [`scale_h`], for any accumulator type.
#[inline]
fn scale_ref<A: Elem>(acc: &mut [A], w: f32) {
    for a in acc.iter_mut() {
        *a = A::from_f32(a.to_f32() * w);
    }
}

/// A type the AVX2 loops read eight values of at a time, widened to f32.
#[cfg(target_arch = "x86_64")]
trait Load8: Elem {
    /// # Safety
    /// AVX2 and F16C are available; `p` is valid for reading eight values.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
impl Load8 for f16 {
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Load8 for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // A bf16 is the upper half of the f32 of the same value.
        // SAFETY: the caller's.
        unsafe {
            let x = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x))
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Load8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

/// The portable [`dot_ref`] with AVX2: ggml's 64 lanes as eight 8-lane registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16c<Q: Load8, E: Load8>(q: &[Q], k: &[E]) -> f32 {
    unsafe {
        use std::arch::x86_64::*;
        let n = q.len();
        let np = n / LANES * LANES;
        // acc[a] holds lanes 8a..8a+8.
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < np {
            for (a, r) in acc.iter_mut().enumerate() {
                let at = i + 8 * a;
                let (kv, qv) = (E::load8(k.as_ptr().add(at)), Q::load8(q.as_ptr().add(at)));
                *r = _mm256_fmadd_ps(kv, qv, *r);
            }
            i += LANES;
        }
        // 16-lane register j is (acc[2j], acc[2j + 1]).
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        // `reduce16` in registers: t = hi + lo; u[i] = t[4 + i] + t[i];
        // (u0 + u2) + (u1 + u3). The same additions, operands in the same order.
        let t = _mm256_add_ps(hi, lo);
        let u = _mm_add_ps(_mm256_extractf128_ps::<1>(t), _mm256_castps256_ps128(t));
        let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
        let r = _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<1>(w, w)));
        if np == n {
            return r;
        }
        tail(r, q, k, np)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mad_f16c(acc: &mut [f16], v: &[f16], w: f32) {
    unsafe {
        use std::arch::x86_64::*;
        let n8 = acc.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i < n8 {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let p = acc.as_mut_ptr().add(i) as *mut __m128i;
            let y = _mm256_fmadd_ps(x, wv, _mm256_cvtph_ps(_mm_loadu_si128(p)));
            _mm_storeu_si128(p, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
            i += 8;
        }
        for i in n8..acc.len() {
            acc[i] = f16::from_f32(v[i].to_f32().mul_add(w, acc[i].to_f32()));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_f16c(acc: &mut [f16], w: f32) {
    unsafe {
        use std::arch::x86_64::*;
        let n8 = acc.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i < n8 {
            let p = acc.as_mut_ptr().add(i) as *mut __m128i;
            let y = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), wv);
            _mm_storeu_si128(p, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
            i += 8;
        }
        for a in &mut acc[n8..] {
            *a = f16::from_f32(a.to_f32() * w);
        }
    }
}

#[cfg(test)]
mod tests;

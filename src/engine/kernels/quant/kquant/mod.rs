//! K-quant weights (Q4_K, Q6_K: 256-value super-blocks) against activations quantized
//! to Q8_K (f32 scale `1 / (-127 / max)`, i8 values, i16 sums per 16), reproducing
//! the arithmetic llama.cpp's CPU backend runs on x86:
//!
//! - Q6_K: `ggml_vec_dot_q6_K_q8_K` (AVX2): integer sums in eight i32 lanes, the `-32`
//!   offset taken off per lane through the activation sums, one fused multiply-add per
//!   lane and super-block, `hsum_float_8` at the end.
//! - Q4_K: `ggml_vec_dot_q4_K_q8_K` (AVX2) likewise: the integer sums of `scale * dot`
//!   in eight i32 lanes (lane t: bytes 4t..4t+3 of every 32 values), one fused
//!   multiply-add of `d` per lane and super-block; the mins as four i32 lanes (`min *
//!   bsum` of two sub-blocks each), one fused multiply-add of `-dmin` each; at the end
//!   `hsum_float_8` plus `(m0 + m2) + (m1 + m3)`. Not the order of the repacked
//!   `q4_K_8x8_q8_K` gemv that llama.cpp picks on AVX2 CPUs when repacking is on: the
//!   references in `tests/fixtures` are made with repacking off, and that un-repacked
//!   arithmetic is the one reproduced here, on every CPU.
//!
//! The portable reference ([`KWeight::dot_ref`]) encodes that order; the AVX2 tiles
//! below, the 512-bit multi-row kernels in `zmm.rs` (AVX-512 VNNI, two rows or
//! more) and the NEON tiles in `neon.rs` (aarch64) equal it bit for bit, so an
//! ARM CPU computes what the x86 one does (not what llama.cpp's own ARM code does).
//!
//! Must not depend on anything outside `quant`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::drive::{self, Tiled};
use super::{f16_at, hsum8, isa, isa_available, Isa};

/// Values per super-block.
pub const QK_K: usize = 256;

/// Rows of activations quantized to Q8_K, reused between calls.
#[derive(Debug, Default)]
pub struct KActs {
    k: usize,
    m: usize,
    d: Vec<f32>,
    qs: Vec<i8>,
    /// Sum of each 16 values of `qs`.
    bsums: Vec<i16>,
}

/// One Q8_K row, borrowed from [`KActs`].
#[derive(Clone, Copy)]
pub(super) struct KRow<'a> {
    d: &'a [f32],
    qs: &'a [i8],
    bsums: &'a [i16],
}

/// Q8_K quantization of whole super-blocks: AVX2 on x86-64 and NEON on aarch64 (unless
/// capped to scalar), else the portable [`quantize_k_scalar`], which both equal bit for
/// bit.
fn quantize_k(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: AVX2 and FMA are present at any level above Scalar; the slices are
        // sized by `KActs::quantize` (and checked again inside).
        return unsafe { quantize_k_avx2(x, d, qs, bsums) };
    }
    #[cfg(target_arch = "aarch64")]
    if isa() != Isa::Scalar {
        // SAFETY: NEON is baseline on aarch64; the slices are sized by `KActs::quantize`
        // (and checked again inside).
        return unsafe { neon::quantize_k_neon(x, d, qs, bsums) };
    }
    quantize_k_scalar(x, d, qs, bsums)
}

/// [`quantize_k_scalar`] with AVX2: the magnitude maximum by vector max (exact; a NaN
/// is skipped as the scalar comparison skips it), the first value of that magnitude
/// found by a scalar scan, the products by the one factor, round half to even (a NaN
/// product to 0, as the scalar cast does), the clamp at 127 and the integer sums are
/// each exact, so the bits are the scalar path's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_k_avx2(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    unsafe {
        use std::arch::x86_64::*;
        let nb = x.len() / QK_K;
        assert!(d.len() >= nb && qs.len() >= nb * QK_K && bsums.len() >= nb * 16);
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK_K);
            let mut m = _mm256_setzero_ps();
            for i in 0..QK_K / 8 {
                // max_ps returns its second operand when either is NaN: m stays.
                m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))), m);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
            let q = &mut qs[b * QK_K..(b + 1) * QK_K];
            let bs = &mut bsums[b * 16..(b + 1) * 16];
            if amax == 0.0 {
                d[b] = zero_block(q, bs);
                continue;
            }
            let iscale = -127.0 / signed_max(&x[b * QK_K..(b + 1) * QK_K], amax);
            let is = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for g in 0..QK_K / 32 {
                let v: [__m256i; 4] = std::array::from_fn(|i| {
                    let y = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * g + 8 * i)), is);
                    // A NaN product becomes 0, as the scalar path's `as i32` makes it.
                    let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
                    let r = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    _mm256_min_epi32(_mm256_cvtps_epi32(r), top)
                });
                // Every value is in -127..=127, so the saturating packs are exact; they
                // interleave the 128-bit lanes, which the permutation puts back in order.
                let w = _mm256_packs_epi16(
                    _mm256_packs_epi32(v[0], v[1]),
                    _mm256_packs_epi32(v[2], v[3]),
                );
                let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(q.as_mut_ptr().add(32 * g) as *mut __m256i, w);
            }
            sums_of_16(q, bs);
            d[b] = 1.0 / iscale;
        }
    }
}

/// The first value of `xs` whose magnitude is `amax` (the largest, found by a vector
/// max), with its sign: the reference's scale source (NaNs never match).
fn signed_max(xs: &[f32], amax: f32) -> f32 {
    xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax)
}

/// An all-zero super-block's values and sums; its `d` (0).
fn zero_block(q: &mut [i8], bs: &mut [i16]) -> f32 {
    q.fill(0);
    bs.fill(0);
    0.0
}

/// `bsums`: the sum of each 16 quantized values (exact in any order; the compiler
/// vectorizes it).
fn sums_of_16(q: &[i8], bs: &mut [i16]) {
    for (s, q16) in bs.iter_mut().zip(q.chunks_exact(16)) {
        *s = q16.iter().map(|&v| v as i16).sum();
    }
}

/// ggml's `quantize_row_q8_K_ref` (which the x86 build uses): the scale comes from the
/// value of largest magnitude (the first one on ties) with its sign, values are
/// rounded half to even and clamped at 127.
fn quantize_k_scalar(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    for (b, xs) in x.chunks_exact(QK_K).enumerate() {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let q = &mut qs[b * QK_K..(b + 1) * QK_K];
        let bs = &mut bsums[b * 16..(b + 1) * 16];
        if amax == 0.0 {
            d[b] = zero_block(q, bs);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in q.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        sums_of_16(q, bs);
        d[b] = 1.0 / iscale;
    }
}

impl KActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantize `x`, rows of `k` values (`k` a multiple of 256), replacing the contents.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        assert!(
            k.is_multiple_of(QK_K) && x.len().is_multiple_of(k),
            "KActs::quantize: bad shape"
        );
        let m = x.len() / k;
        let nb = k / QK_K;
        self.k = k;
        self.m = m;
        self.d.resize(m * nb, 0.0);
        self.qs.resize(m * k, 0);
        self.bsums.resize(m * nb * 16, 0);
        let work = self
            .d
            .chunks_mut(nb)
            .zip(self.qs.chunks_mut(k))
            .zip(self.bsums.chunks_mut(nb * 16))
            .zip(x.chunks(k));
        if m >= 16 {
            work.par_bridge()
                .for_each(|(((d, q), s), x)| quantize_k(x, d, q, s));
        } else {
            work.for_each(|(((d, q), s), x)| quantize_k(x, d, q, s));
        }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    fn row(&self, r: usize) -> KRow<'_> {
        let nb = self.k / QK_K;
        KRow {
            d: &self.d[r * nb..(r + 1) * nb],
            qs: &self.qs[r * self.k..(r + 1) * self.k],
            bsums: &self.bsums[r * nb * 16..(r + 1) * nb * 16],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KKind {
    Q4K,
    Q6K,
}

/// One K-quant weight matrix `(n, k)`; super-block `b` of column `c` is `c * k / 256 + b`.
#[derive(Debug)]
pub struct KWeight {
    kind: KKind,
    n: usize,
    k: usize,
    d: Vec<f32>,
    /// Q4_K only.
    dmin: Vec<f32>,
    /// 16 bytes per super-block: Q4_K's eight 6-bit scales then eight mins (unpacked),
    /// or Q6_K's sixteen i8 scales.
    sc: Vec<u8>,
    /// Q4_K: 128 bytes of nibbles; Q6_K: 128 bytes of low nibbles then 64 of high bits.
    q: Vec<u8>,
}

impl KWeight {
    /// Repack a GGUF tensor; None unless it is a Q4_K or Q6_K matrix.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let (kind, bsz, qlen) = match t.dtype() {
            GgmlDType::Q4K => (KKind::Q4K, 144, 128),
            GgmlDType::Q6K => (KKind::Q6K, 210, 192),
            _ => return Ok(None),
        };
        let (n, k) = t.shape().dims2()?;
        if !k.is_multiple_of(QK_K) {
            return Ok(None);
        }
        let raw = t.data()?;
        let nb = n * k / QK_K;
        if raw.len() != nb * bsz {
            candle_core::bail!(
                "{kind:?} tensor has {} bytes, expected {}",
                raw.len(),
                nb * bsz
            );
        }
        let mut w = KWeight {
            kind,
            n,
            k,
            d: Vec::with_capacity(nb),
            dmin: Vec::new(),
            sc: Vec::with_capacity(nb * 16),
            q: Vec::with_capacity(nb * qlen),
        };
        for blk in raw.chunks_exact(bsz) {
            match kind {
                KKind::Q4K => {
                    w.d.push(f16_at(blk, 0));
                    w.dmin.push(f16_at(blk, 2));
                    let s = &blk[4..16];
                    // ggml's get_scale_min_k4.
                    let mut sc = [0u8; 16];
                    for j in 0..8 {
                        let (d, m) = if j < 4 {
                            (s[j] & 63, s[j + 4] & 63)
                        } else {
                            (
                                (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
                                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
                            )
                        };
                        sc[j] = d;
                        sc[8 + j] = m;
                    }
                    w.sc.extend_from_slice(&sc);
                    w.q.extend_from_slice(&blk[16..144]);
                }
                KKind::Q6K => {
                    w.d.push(f16_at(blk, 208));
                    w.sc.extend_from_slice(&blk[192..208]);
                    w.q.extend_from_slice(&blk[0..192]);
                }
            }
        }
        Ok(Some(w))
    }

    pub fn kind(&self) -> KKind {
        self.kind
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The 256 weight values of super-block `wb`, without offsets: Q4_K 0..15 (the
    /// min is applied separately), Q6_K 0..63 (the -32 is applied through `bsums`).
    fn values(&self, wb: usize) -> [i32; QK_K] {
        let mut v = [0i32; QK_K];
        match self.kind {
            KKind::Q4K => {
                let q = &self.q[wb * 128..(wb + 1) * 128];
                for c in 0..4 {
                    for l in 0..32 {
                        v[64 * c + l] = (q[32 * c + l] & 0xF) as i32;
                        v[64 * c + 32 + l] = (q[32 * c + l] >> 4) as i32;
                    }
                }
            }
            KKind::Q6K => {
                let blk = &self.q[wb * 192..(wb + 1) * 192];
                for h in 0..2 {
                    let (ql, qh) = (&blk[64 * h..64 * h + 64], &blk[128 + 32 * h..160 + 32 * h]);
                    let o = 128 * h;
                    for l in 0..32 {
                        v[o + l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32;
                        v[o + 32 + l] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32;
                        v[o + 64 + l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
                        v[o + 96 + l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
                    }
                }
            }
        }
        v
    }

    /// Portable reference of one dot product, in llama.cpp's order (module docs).
    fn dot_ref(&self, c: usize, x: KRow<'_>) -> f32 {
        let nb = self.k / QK_K;
        match self.kind {
            KKind::Q4K => {
                // Eight lanes of `d * Σ scale·dot` (lane t: bytes 4t..4t+3 of every 32
                // values) and four of `-dmin * Σ min·bsum` (lane u: sub-blocks 2u, 2u+1).
                let mut acc = [0f32; 8];
                let mut accm = [0f32; 4];
                for b in 0..nb {
                    let wb = c * nb + b;
                    let v = self.values(wb);
                    let y = &x.qs[b * QK_K..(b + 1) * QK_K];
                    let sc = &self.sc[wb * 16..wb * 16 + 16];
                    let bs = &x.bsums[b * 16..b * 16 + 16];
                    let d = x.d[b] * self.d[wb];
                    let dmin = -x.d[b] * self.dmin[wb];
                    for (u, a) in accm.iter_mut().enumerate() {
                        let q8s = |s: usize| bs[2 * s] as i32 + bs[2 * s + 1] as i32;
                        let prod = sc[8 + 2 * u] as i32 * q8s(2 * u)
                            + sc[9 + 2 * u] as i32 * q8s(2 * u + 1);
                        *a = dmin.mul_add(prod as f32, *a);
                    }
                    for (t, a) in acc.iter_mut().enumerate() {
                        let mut s = 0i32;
                        for (g, &scale) in sc[..8].iter().enumerate() {
                            let e0 = 32 * g + 4 * t;
                            let dot: i32 = (e0..e0 + 4).map(|e| v[e] * y[e] as i32).sum();
                            s += scale as i32 * dot;
                        }
                        *a = d.mul_add(s as f32, *a);
                    }
                }
                hsum8(acc) + ((accm[0] + accm[2]) + (accm[1] + accm[3]))
            }
            KKind::Q6K => {
                let mut acc = [0f32; 8];
                for b in 0..nb {
                    let wb = c * nb + b;
                    let v = self.values(wb);
                    let y = &x.qs[b * QK_K..(b + 1) * QK_K];
                    let sc = |i: usize| self.sc[wb * 16 + i] as i8 as i32;
                    let bs = &x.bsums[b * 16..b * 16 + 16];
                    let dd = self.d[wb] * x.d[b];
                    for (u, a) in acc.iter_mut().enumerate() {
                        let mut s = 0i32;
                        for g in 0..8 {
                            let e0 = 32 * g + 4 * u;
                            let dot: i32 = (e0..e0 + 4).map(|e| v[e] * y[e] as i32).sum();
                            s += sc(2 * g + u / 4) * dot;
                        }
                        s -= 32
                            * (bs[2 * u] as i32 * sc(2 * u) + bs[2 * u + 1] as i32 * sc(2 * u + 1));
                        *a = dd.mul_add(s as f32, *a);
                    }
                }
                hsum8(acc)
            }
        }
    }

    /// `out[r * ldo + c] = x_r · w_c` (activations quantized by [`KActs::quantize`]).
    pub fn matmul_into(&self, x: &KActs, out: &mut [f32], ldo: usize) {
        self.matmul_into_isa(isa(), x, out, ldo)
    }

    /// [`KWeight::matmul_into`] at a chosen level (at most [`isa()`]).
    pub fn matmul_into_isa(&self, level: Isa, x: &KActs, out: &mut [f32], ldo: usize) {
        assert!(isa_available(level), "{level:?} is not supported");
        assert_eq!(
            x.k, self.k,
            "matmul: activation width differs from the weight's"
        );
        // Q4_K from four rows on: the AVX2 tiles (four rows by two columns) measured
        // faster than the 512-bit pairs (Xeon, one thread: 8 rows 0.68 vs 0.82 ms, 64 rows
        // 4.4 vs 5.6 ms on a 896 x 4864 projection; 2 rows 0.34 vs 0.25 ms).
        #[cfg(target_arch = "x86_64")]
        if level == Isa::Avx512Vnni && x.m >= 2 && (self.kind == KKind::Q6K || x.m < 4) {
            // SAFETY: the CPU has AVX-512 VNNI (checked above) and the widths agree.
            return unsafe { super::pairs::matmul(self, self.n, x, out, ldo) };
        }
        drive::matmul(self, level, self.n, x.m, |r| x.row(r), out, ldo);
    }

    /// `x (m, k)` times the transposed weight: `(m, n)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        super::tensor_matmul(
            x,
            self.n,
            self.k,
            |a: &mut KActs, xs, k| a.quantize(xs, k),
            |a, out| self.matmul_into(a, out, self.n),
        )
    }
}

impl Tiled for KWeight {
    type Row<'a> = KRow<'a>;

    #[inline]
    fn tile<const R: usize, const C: usize>(
        &self,
        level: Isa,
        c: usize,
        rows: [KRow<'_>; R],
    ) -> [[f32; R]; C] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `level` is at most `isa()`; `c + C <= n` and every row has `k`
            // values (checked by the driver and `matmul_into_isa`).
            unsafe {
                match (level, self.kind) {
                    (Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512Vnni, KKind::Q4K) => {
                        return self.q4k_avx2::<R, C>(c, rows)
                    }
                    (Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512Vnni, KKind::Q6K) => {
                        return self.q6k_avx2::<R, C>(c, rows)
                    }
                    (Isa::Scalar, _) => {}
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // SAFETY: as above; NeonDot means the CPU has dotprod.
            unsafe {
                match (level, self.kind) {
                    (Isa::NeonDot, KKind::Q4K) => return self.q4k_sdot::<R, C>(c, rows),
                    (Isa::NeonDot, KKind::Q6K) => return self.q6k_sdot::<R, C>(c, rows),
                    (Isa::Neon, KKind::Q4K) => return self.q4k_smull::<R, C>(c, rows),
                    (Isa::Neon, KKind::Q6K) => return self.q6k_smull::<R, C>(c, rows),
                    _ => {}
                }
            }
        }
        let _ = level;
        std::array::from_fn(|j| rows.map(|r| self.dot_ref(c + j, r)))
    }

    fn prefetch(&self, c0: usize, c1: usize) {
        let nb = self.k / QK_K;
        let qlen = self.q.len() / (self.n * nb);
        drive::prefetch_bytes(
            self.q.as_ptr().wrapping_add(c0 * nb * qlen),
            (c1 - c0) * nb * qlen,
        );
        drive::prefetch_bytes(
            self.sc.as_ptr().wrapping_add(c0 * nb * 16),
            (c1 - c0) * nb * 16,
        );
    }
}

/// The x86 tiles. Integer sums are exact in any order (products fit i16 pairs:
/// Q4_K 15 * 128 * 2, Q6_K 63 * 128 * 2), so the kernels group them as suits the
/// registers, then do the float steps of the reference exactly. There is no VNNI
/// variant: the weights are unsigned already, so `vpdpbusd` saves nothing before the
/// per-sub-block scale, and `vpdpwssd` (scale and accumulate in one) puts its latency
/// in the accumulation chain — one-row (decode) tiles measured slower with it.
macro_rules! k_x86 {
    ($q4:ident, $q6:ident, $feat:literal) => {
        #[cfg(target_arch = "x86_64")]
        impl KWeight {
            #[target_feature(enable = $feat)]
            unsafe fn $q4<const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [KRow<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    use std::arch::x86_64::*;
                    let nb = self.k / QK_K;
                    let m4 = _mm256_set1_epi8(0x0F);
                    let mut acc = [[_mm256_setzero_ps(); R]; C];
                    let mut accm = [[_mm_setzero_ps(); R]; C];
                    for b in 0..nb {
                        let mut sumi = [[_mm256_setzero_si256(); R]; C];
                        for ch in 0..4 {
                            for j in 0..C {
                                let wb = (c + j) * nb + b;
                                let bits = _mm256_loadu_si256(
                                    self.q.as_ptr().add(wb * 128 + 32 * ch) as *const __m256i,
                                );
                                let sc = self.sc.as_ptr().add(wb * 16 + 2 * ch);
                                let halves = [
                                    (_mm256_and_si256(bits, m4), _mm256_set1_epi16(*sc as i16)),
                                    (
                                        _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4),
                                        _mm256_set1_epi16(*sc.add(1) as i16),
                                    ),
                                ];
                                for (hi, (qv, scale)) in halves.into_iter().enumerate() {
                                    for r in 0..R {
                                        let y = _mm256_loadu_si256(
                                            rows.get_unchecked(r)
                                                .qs
                                                .as_ptr()
                                                .add(b * QK_K + 64 * ch + 32 * hi)
                                                as *const __m256i,
                                        );
                                        let p = _mm256_maddubs_epi16(qv, y);
                                        let s = sumi.get_unchecked_mut(j).get_unchecked_mut(r);
                                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, scale));
                                    }
                                }
                            }
                        }
                        for j in 0..C {
                            let wb = (c + j) * nb + b;
                            // The eight mins as i16.
                            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(
                                self.sc.as_ptr().add(wb * 16 + 8) as *const __m128i,
                            ));
                            let (dw, dmin) =
                                (*self.d.get_unchecked(wb), *self.dmin.get_unchecked(wb));
                            for r in 0..R {
                                let row = rows.get_unchecked(r);
                                let bs = _mm256_loadu_si256(
                                    row.bsums.as_ptr().add(b * 16) as *const __m256i
                                );
                                // Sums of each sub-block's two halves, then lane u:
                                // min[2u] * q8s[2u] + min[2u + 1] * q8s[2u + 1].
                                let q8s = _mm_hadd_epi16(
                                    _mm256_castsi256_si128(bs),
                                    _mm256_extracti128_si256(bs, 1),
                                );
                                let prod = _mm_madd_epi16(mins, q8s);
                                let dy = *row.d.get_unchecked(b);
                                let am = accm.get_unchecked_mut(j).get_unchecked_mut(r);
                                *am = _mm_fmadd_ps(
                                    _mm_set1_ps(-dy * dmin),
                                    _mm_cvtepi32_ps(prod),
                                    *am,
                                );
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                *a = _mm256_fmadd_ps(
                                    _mm256_set1_ps(dy * dw),
                                    _mm256_cvtepi32_ps(sumi[j][r]),
                                    *a,
                                );
                            }
                        }
                    }
                    let mut out = [[0f32; R]; C];
                    for j in 0..C {
                        for r in 0..R {
                            let mut lanes = [0f32; 8];
                            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][r]);
                            let mut m = [0f32; 4];
                            _mm_storeu_ps(m.as_mut_ptr(), accm[j][r]);
                            out[j][r] = hsum8(lanes) + ((m[0] + m[2]) + (m[1] + m[3]));
                        }
                    }
                    out
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn $q6<const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [KRow<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    use std::arch::x86_64::*;
                    let nb = self.k / QK_K;
                    let m15 = _mm256_set1_epi8(15);
                    let mut acc = [[_mm256_setzero_ps(); R]; C];
                    for b in 0..nb {
                        let mut sumi = [[_mm256_setzero_si256(); R]; C];
                        for j in 0..C {
                            let wb = (c + j) * nb + b;
                            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                self.sc.as_ptr().add(wb * 16) as *const __m128i,
                            ));
                            for r in 0..R {
                                let bs = _mm256_loadu_si256(
                                    rows.get_unchecked(r).bsums.as_ptr().add(b * 16)
                                        as *const __m256i,
                                );
                                sumi[j][r] = _mm256_sub_epi32(
                                    sumi[j][r],
                                    _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5),
                                );
                            }
                        }
                        for h in 0..2 {
                            for t in 0..4 {
                                for j in 0..C {
                                    let wb = (c + j) * nb + b;
                                    let blk = self.q.as_ptr().add(wb * 192);
                                    let ql = _mm256_loadu_si256(
                                        blk.add(64 * h + 32 * (t & 1)) as *const __m256i
                                    );
                                    let qh =
                                        _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                                    let lo = if t < 2 {
                                        _mm256_and_si256(ql, m15)
                                    } else {
                                        _mm256_and_si256(_mm256_srli_epi16(ql, 4), m15)
                                    };
                                    // Bits 2t..2t+1 of qh to bits 4..5.
                                    let hb = match t {
                                        0 => _mm256_slli_epi16(
                                            _mm256_and_si256(qh, _mm256_set1_epi8(3)),
                                            4,
                                        ),
                                        1 => _mm256_slli_epi16(
                                            _mm256_and_si256(qh, _mm256_set1_epi8(12)),
                                            2,
                                        ),
                                        2 => _mm256_and_si256(qh, _mm256_set1_epi8(48)),
                                        _ => _mm256_srli_epi16(
                                            _mm256_and_si256(qh, _mm256_set1_epi8(-64)),
                                            2,
                                        ),
                                    };
                                    let qv = _mm256_or_si256(lo, hb);
                                    let g = 4 * h + t;
                                    let sp = self.sc.as_ptr().add(wb * 16 + 2 * g) as *const i8;
                                    let scale = _mm256_set_m128i(
                                        _mm_set1_epi16(*sp.add(1) as i16),
                                        _mm_set1_epi16(*sp as i16),
                                    );
                                    for r in 0..R {
                                        let y = _mm256_loadu_si256(
                                            rows.get_unchecked(r).qs.as_ptr().add(b * QK_K + 32 * g)
                                                as *const __m256i,
                                        );
                                        let p = _mm256_maddubs_epi16(qv, y);
                                        let s = sumi.get_unchecked_mut(j).get_unchecked_mut(r);
                                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, scale));
                                    }
                                }
                            }
                        }
                        for j in 0..C {
                            let dx = *self.d.get_unchecked((c + j) * nb + b);
                            for r in 0..R {
                                let dd =
                                    _mm256_set1_ps(dx * *rows.get_unchecked(r).d.get_unchecked(b));
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi[j][r]), *a);
                            }
                        }
                    }
                    let mut out = [[0f32; R]; C];
                    for j in 0..C {
                        for r in 0..R {
                            let mut lanes = [0f32; 8];
                            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][r]);
                            out[j][r] = hsum8(lanes);
                        }
                    }
                    out
                }
            }
        }
    };
}

k_x86!(q4k_avx2, q6k_avx2, "avx2,fma");

#[cfg(target_arch = "x86_64")]
mod zmm;

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(test)]
mod tests;

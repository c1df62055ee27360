//! Quantized matrix-vector kernels for the GGUF block types our models use most
//! (Q4_0, Q4_1, Q8_0), with activations quantized exactly the way ggml's x86 path does
//! it (Q8_0/Q8_1 blocks, scale `amax/127`, inverse `127/amax`, round-half-even, `s`
//! rounded once). Matching ggml's arithmetic is what makes greedy outputs equal
//! llama.cpp's on small, sensitive models; candle's generic path rounds differently.
//!
//! Weights are repacked at load into a struct-of-arrays layout (scales as f32) so the
//! inner loop is integer multiply-adds that the compiler vectorises. Q5_0 and the
//! K-quants (Q4_K, Q6_K, with Q8_K activations) are in the submodules `q5_0` and
//! `kquant`; other types fall back to candle's `QMatMul` (see `model.rs`). Several
//! activation rows (batched decode, prefill) run two rows per 512-bit register where
//! AVX-512 is present (`zmm`), the 256-bit multi-row kernel below otherwise; NEON
//! kernels are in `neon`, `q5_0_neon` and `kquant_neon`. Every type's
//! dot product has AVX2 (x86) and NEON (aarch64: `sdot` and plain) kernels, and the
//! activation quantizers NEON (Q8_0/Q8_1/Q8_K) and AVX2 (Q8_0/Q8_1) ones; each equals
//! its portable reference bit for bit.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

mod drive;
mod kquant;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod pairs;
mod q5_0;
#[cfg(target_arch = "x86_64")]
mod zmm;

pub use kquant::{KActs, KKind, KWeight, QK_K};
pub use q5_0::Q5Weight;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

/// One weight matrix `(n, k)`: row `c` produces output column `c`.
#[derive(Debug)]
pub struct QWeight {
    kind: Kind,
    n: usize,
    k: usize,
    /// Per block scale `d` (and `m` for Q4_1), as f32, grouped by eight columns:
    /// `[c / 8][block][c % 8]` (see [`QWeight::sc`]), so that one load gives a block's
    /// scales for eight columns.
    d: Vec<f32>,
    m: Vec<f32>,
    /// Q4: 16 bytes of nibbles per block; Q8_0: 32 signed bytes per block (as u8).
    qs: Vec<u8>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `hsum_float_8`: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
#[inline]
fn hsum8(l: [f32; 8]) -> f32 {
    let r = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Rows of activations quantized to 8 bits per block (ggml's Q8_0/Q8_1 for the x86
/// path), reused between calls so that a decode step allocates nothing once warm.
#[derive(Debug, Default)]
pub struct QActs {
    k: usize,
    m: usize,
    d: Vec<f32>,
    /// `d * sum(qs)` rounded to f16 (only used against Q4_1).
    s: Vec<f32>,
    qs: Vec<i8>,
}

/// One quantized row, borrowed from [`QActs`].
#[derive(Clone, Copy)]
struct Row<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [i8],
}

/// ggml's `quantize_row_q8_0`/`q8_1` (x86 flavour) of one row into the given slices.
fn quantize_into(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: AVX2 and FMA are present at any level above Scalar; slices are sized
        // by the caller (`x`: nb*32, `d`/`s`: nb, `qs`: nb*32).
        return unsafe { quantize_avx2(x, d, s, qs) };
    }
    #[cfg(target_arch = "aarch64")]
    if isa() != Isa::Scalar {
        // SAFETY: NEON is baseline on aarch64; slices sized as above.
        return unsafe { neon::quantize_neon(x, d, s, qs) };
    }
    quantize_scalar(x, d, s, qs)
}

/// The same with AVX2, as ggml's x86 code does it: every step is exact (max, products
/// by one factor, round-half-even, integer sums), so it equals the scalar path bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    use std::arch::x86_64::*;
    let nb = x.len() / QK;
    assert!(d.len() >= nb && s.len() >= nb && qs.len() >= nb * QK);
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        let p = x.as_ptr().add(b * QK);
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        let dv = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mul = _mm256_set1_ps(id);
        let mut sum = _mm256_setzero_si256();
        let mut q = [0i32; QK];
        for (i, vi) in v.iter().enumerate() {
            let r = _mm256_round_ps(
                _mm256_mul_ps(*vi, mul),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let qi = _mm256_cvtps_epi32(r);
            sum = _mm256_add_epi32(sum, qi);
            _mm256_storeu_si256(q.as_mut_ptr().add(i * 8) as *mut __m256i, qi);
        }
        for (dst, &v) in qs[b * QK..b * QK + QK].iter_mut().zip(&q) {
            *dst = v as i8;
        }
        let mut sl = [0i32; 8];
        _mm256_storeu_si256(sl.as_mut_ptr() as *mut __m256i, sum);
        let total: i32 = sl.iter().sum();
        d[b] = f16::from_f32(dv).to_f32();
        s[b] = f16::from_f32(dv * total as f32).to_f32();
    }
}

/// Portable reference of [`quantize_into`].
fn quantize_scalar(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let dv = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qs[b * QK..b * QK + QK].iter_mut().zip(xs) {
            let qv = (v * id).round_ties_even() as i32;
            *q = qv as i8;
            sum += qv;
        }
        d[b] = f16::from_f32(dv).to_f32();
        s[b] = f16::from_f32(dv * sum as f32).to_f32();
    }
}

impl QActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantize `x`, `m` rows of `k` values (`k` a multiple of 32), replacing the contents.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        assert!(
            k.is_multiple_of(QK) && x.len().is_multiple_of(k),
            "QActs::quantize: bad shape"
        );
        let m = x.len() / k;
        let nb = k / QK;
        self.k = k;
        self.m = m;
        self.d.resize(m * nb, 0.0);
        self.s.resize(m * nb, 0.0);
        self.qs.resize(m * k, 0);
        let work = self
            .d
            .chunks_mut(nb)
            .zip(self.s.chunks_mut(nb))
            .zip(self.qs.chunks_mut(k))
            .zip(x.chunks(k));
        if m >= 16 {
            work.par_bridge()
                .for_each(|(((d, s), q), x)| quantize_into(x, d, s, q));
        } else {
            work.for_each(|(((d, s), q), x)| quantize_into(x, d, s, q));
        }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.k / QK;
        Row {
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
            qs: &self.qs[r * self.k..(r + 1) * self.k],
        }
    }
}

/// Quantize one row (tests and references).
pub fn quantize_row(x: &[f32]) -> QActs {
    let mut a = QActs::new();
    a.quantize(x, x.len());
    a
}

/// Instruction-set level of the kernels, detected once at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX2 + FMA with 256-bit VNNI (`vpdpbusd`, from AVX512-VNNI+VL or AVX-VNNI).
    Avx2Vnni,
    /// AVX-512 (F, BW, VL, VNNI): several activation rows run on 512-bit registers, two
    /// rows to a register (`quant/zmm.rs`); single rows as [`Isa::Avx2Vnni`].
    Avx512Vnni,
    /// aarch64 NEON (baseline ARMv8), see `quant/neon.rs`.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// aarch64 NEON with the `dotprod` extension (`sdot`).
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

/// Whether `level` runs on this CPU: a level of this architecture at most [`isa()`].
pub fn isa_available(level: Isa) -> bool {
    #[cfg(target_arch = "aarch64")]
    if matches!(level, Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512Vnni) {
        return false;
    }
    level as u8 <= isa() as u8
}

/// The best level this CPU supports.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        // CANDELA_ISA=scalar|avx2|avx2vnni|neon caps the level (for comparisons and tests).
        let cap = std::env::var("CANDELA_ISA").unwrap_or_default();
        if cap == "scalar" {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if cap == "avx2" && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    if cap != "avx2vnni"
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                    {
                        return Isa::Avx512Vnni;
                    }
                    return Isa::Avx2Vnni;
                }
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if cap != "neon" && std::arch::is_aarch64_feature_detected!("dotprod") {
            return Isa::NeonDot;
        }
        #[cfg(target_arch = "aarch64")]
        return Isa::Neon;
        #[cfg(not(target_arch = "aarch64"))]
        Isa::Scalar
    })
}

/// The SIMD levels of this CPU, for the tests that hold each against the portable
/// reference (on aarch64 at least plain NEON, which every ARMv8 core has;
/// `scripts/arm/test.sh` runs them there under qemu).
#[cfg(test)]
fn simd_levels() -> Vec<Isa> {
    let levels: Vec<Isa> = [
        Isa::Avx2,
        Isa::Avx2Vnni,
        Isa::Avx512Vnni,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon,
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot,
    ]
    .into_iter()
    .filter(|&l| isa_available(l))
    .collect();
    #[cfg(target_arch = "aarch64")]
    assert!(
        levels.contains(&Isa::Neon),
        "NEON must be tested on aarch64"
    );
    levels
}

/// Output pointer shared by the tasks of one matmul; each task writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct columns) and the owner outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl QWeight {
    /// Repack a GGUF tensor; None for types these kernels do not cover.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        let (n, k) = t.shape().dims2()?;
        if k % QK != 0 {
            return Ok(None);
        }
        let raw = t.data()?;
        let nb = n * k / QK;
        let (bsz, qlen) = match kind {
            Kind::Q4_0 => (18, 16),
            Kind::Q4_1 => (20, 16),
            Kind::Q8_0 => (34, 32),
        };
        if raw.len() != nb * bsz {
            candle_core::bail!(
                "{kind:?} tensor has {} bytes, expected {}",
                raw.len(),
                nb * bsz
            );
        }
        let nbk = k / QK;
        let grouped = n.div_ceil(8) * 8 * nbk;
        let mut w = QWeight {
            kind,
            n,
            k,
            d: vec![0.0; grouped],
            m: if kind == Kind::Q4_1 {
                vec![0.0; grouped]
            } else {
                Vec::new()
            },
            qs: Vec::with_capacity(nb * qlen),
        };
        for (i, blk) in raw.chunks_exact(bsz).enumerate() {
            let at = w.sc(i / nbk, i % nbk);
            w.d[at] = f16_at(blk, 0);
            let q0 = match kind {
                Kind::Q4_1 => {
                    w.m[at] = f16_at(blk, 2);
                    4
                }
                _ => 2,
            };
            w.qs.extend_from_slice(&blk[q0..q0 + qlen]);
        }
        Ok(Some(w))
    }

    /// Index of the scales of column `c`, block `b` in `d` and `m`.
    #[inline(always)]
    fn sc(&self, c: usize, b: usize) -> usize {
        ((c / 8) * (self.k / QK) + b) * 8 + c % 8
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Portable reference of one dot product (weight row `c` with one activation row),
    /// with the lane structure and rounding of ggml's AVX2 kernels: eight f32 lanes
    /// (lane i takes block elements 4i..4i+3), each block added with a fused
    /// multiply-add, then a fixed horizontal sum; Q4_1's `m * s` terms go into a
    /// separate scalar. The SIMD paths produce bit-identical results (tested).
    fn dot_lanes(&self, c: usize, x: Row<'_>) -> f32 {
        let nbk = self.k / QK;
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        let mut w = [0i32; QK];
        for b in 0..nbk {
            let wb = c * nbk + b;
            match self.kind {
                Kind::Q4_1 | Kind::Q4_0 => {
                    let off = if self.kind == Kind::Q4_0 { 8 } else { 0 };
                    let q = &self.qs[wb * 16..wb * 16 + 16];
                    for j in 0..16 {
                        w[j] = (q[j] & 0x0F) as i32 - off;
                        w[j + 16] = (q[j] >> 4) as i32 - off;
                    }
                }
                Kind::Q8_0 => {
                    for (j, v) in self.qs[wb * QK..wb * QK + QK].iter().enumerate() {
                        w[j] = *v as i8 as i32;
                    }
                }
            }
            let y = &x.qs[b * QK..b * QK + QK];
            let dd = self.d[self.sc(c, b)] * x.d[b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (4 * lane..4 * lane + 4).map(|e| w[e] * y[e] as i32).sum();
                *a = dd.mul_add(s as f32, *a);
            }
            if self.kind == Kind::Q4_1 {
                summs = self.m[self.sc(c, b)].mul_add(x.s[b], summs);
            }
        }
        hsum8(acc) + summs
    }

    /// Dot products of weight rows `c..c + C` with `R` activation rows, at the given
    /// level: `out[j][r]` is column `c + j` against row `r`. A weight block is unpacked
    /// once for all `R` rows and an activation block loaded once for all `C` columns;
    /// the `C * R` sums are independent chains (no FMA latency bound), each formed in
    /// exactly the order of [`QWeight::dot_lanes`].
    #[inline]
    fn dot_tile<const R: usize, const C: usize>(
        &self,
        isa: Isa,
        c: usize,
        rows: [Row<'_>; R],
    ) -> [[f32; R]; C] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `isa` comes from `isa()` (or a lower level), so the CPU has the
            // features each variant enables; shapes were checked by the caller.
            unsafe {
                match (isa, self.kind) {
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_0) => {
                        return self.dot_vnni::<0, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_1) => {
                        return self.dot_vnni::<1, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q8_0) => {
                        return self.dot_vnni::<2, R, C>(c, rows)
                    }
                    (Isa::Avx2, Kind::Q4_0) => return self.dot_avx2::<0, R, C>(c, rows),
                    (Isa::Avx2, Kind::Q4_1) => return self.dot_avx2::<1, R, C>(c, rows),
                    (Isa::Avx2, Kind::Q8_0) => return self.dot_avx2::<2, R, C>(c, rows),
                    (Isa::Scalar, _) => {}
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(isa, Isa::Neon | Isa::NeonDot) {
            return std::array::from_fn(|j| rows.map(|r| self.dot_neon(isa, c + j, r)));
        }
        let _ = isa;
        std::array::from_fn(|j| rows.map(|r| self.dot_lanes(c + j, r)))
    }

    /// One activation row against columns `c..c + 8`, `c` a multiple of 8 (the scales
    /// of those columns are one vector). Same sums as [`QWeight::dot_lanes`].
    #[inline]
    fn dot_row8(&self, isa: Isa, c: usize, row: Row<'_>) -> [f32; 8] {
        debug_assert!(c.is_multiple_of(8) && c + 8 <= self.n);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `dot_tile`; the grouped scale arrays are padded to whole
            // groups of eight columns.
            unsafe {
                match (isa, self.kind) {
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_0) => {
                        return self.dot8_vnni::<0>(c, row)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_1) => {
                        return self.dot8_vnni::<1>(c, row)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q8_0) => {
                        return self.dot8_vnni::<2>(c, row)
                    }
                    (Isa::Avx2, Kind::Q4_0) => return self.dot8_avx2::<0>(c, row),
                    (Isa::Avx2, Kind::Q4_1) => return self.dot8_avx2::<1>(c, row),
                    (Isa::Avx2, Kind::Q8_0) => return self.dot8_avx2::<2>(c, row),
                    (Isa::Scalar, _) => {}
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(isa, Isa::Neon | Isa::NeonDot) {
            return std::array::from_fn(|j| self.dot_neon(isa, c + j, row));
        }
        let _ = isa;
        std::array::from_fn(|j| self.dot_lanes(c + j, row))
    }

    /// `out[r * ldo + c] = x_r · w_c` for every row `r` of `x` and column `c` of the
    /// weight. Columns are split across the thread pool; each task runs all rows over
    /// its columns, so a weight row is read from memory once per call.
    pub fn matmul_into(&self, x: &QActs, out: &mut [f32], ldo: usize) {
        self.matmul_into_isa(isa(), x, out, ldo)
    }

    /// [`QWeight::matmul_into`] at a chosen level (at most [`isa()`]), for tests and benches.
    pub fn matmul_into_isa(&self, isa: Isa, x: &QActs, out: &mut [f32], ldo: usize) {
        assert!(isa_available(isa), "{isa:?} is not supported by this CPU");
        let (m, n) = (x.m, self.n);
        assert_eq!(
            x.k, self.k,
            "matmul: activation width differs from the weight's"
        );
        assert!(ldo >= n && (m == 0 || out.len() >= (m - 1) * ldo + n));
        if m == 0 {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(threads * 4).next_multiple_of(8);
        let ptr = OutPtr(out.as_mut_ptr());
        let tasks = n.div_ceil(chunk);
        let run = |ci: usize| {
            let c0 = ci * chunk;
            self.cols(isa, x, c0, (c0 + chunk).min(n), ptr, ldo);
        };
        if tasks == 1 {
            run(0);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }

    /// Columns `c0..c1` for every row, in tiles of rows that stay in L1: four rows by
    /// two columns at a time where there are four rows, else one row by eight columns.
    fn cols(&self, isa: Isa, x: &QActs, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        #[cfg(target_arch = "x86_64")]
        if x.m >= 2 {
            // SAFETY: the CPU has the features of `isa` (checked by the caller), `c0` is
            // a multiple of 8 and the output range was checked in `matmul_into_isa`.
            if isa == Isa::Avx512Vnni {
                return unsafe { self.cols_zmm(x, c0, c1, out, ldo) };
            }
            if isa == Isa::Avx2Vnni {
                return unsafe { self.cols_vnni(x, c0, c1, out, ldo) };
            }
        }
        const ROW_TILE: usize = 32;
        // SAFETY (every write below): in bounds (checked in matmul_into), and the
        // columns c0..c1 belong to this task alone.
        let put = |r: usize, c: usize, v: f32| unsafe { out.write(r * ldo + c, v) };
        for r0 in (0..x.m).step_by(ROW_TILE) {
            let r1 = (r0 + ROW_TILE).min(x.m);
            let mut c = c0;
            while c < c1 {
                let wide = if r1 - r0 >= 4 { 2 } else { 8 };
                let cw = if c + wide <= c1 { wide } else { 1 };
                let mut r = r0;
                while r + 4 <= r1 {
                    let rows = [x.row(r), x.row(r + 1), x.row(r + 2), x.row(r + 3)];
                    if cw == 2 {
                        let v = self.dot_tile::<4, 2>(isa, c, rows);
                        for (j, col) in v.iter().enumerate() {
                            for (i, &y) in col.iter().enumerate() {
                                put(r + i, c + j, y);
                            }
                        }
                    } else {
                        let [col] = self.dot_tile::<4, 1>(isa, c, rows);
                        for (i, &y) in col.iter().enumerate() {
                            put(r + i, c, y);
                        }
                    }
                    r += 4;
                }
                while r < r1 {
                    if cw == 8 {
                        let v = self.dot_row8(isa, c, x.row(r));
                        for (j, &y) in v.iter().enumerate() {
                            put(r, c + j, y);
                        }
                    } else {
                        for j in 0..cw {
                            let [[y]] = self.dot_tile::<1, 1>(isa, c + j, [x.row(r)]);
                            put(r, c + j, y);
                        }
                    }
                    r += 1;
                }
                c += cw;
            }
        }
    }

    /// Row `r` of `x` against columns `c0..c1` (`c0` a multiple of 8), eight at a time.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn one_row(
        &self,
        isa: Isa,
        x: &QActs,
        r: usize,
        c0: usize,
        c1: usize,
        out: OutPtr,
        ldo: usize,
    ) {
        let row = x.row(r);
        let mut c = c0;
        while c + 8 <= c1 {
            for (j, &y) in self.dot_row8(isa, c, row).iter().enumerate() {
                // SAFETY: in bounds (checked in matmul_into_isa); the columns are this task's.
                unsafe { out.write(r * ldo + c + j, y) };
            }
            c += 8;
        }
        while c < c1 {
            let [[y]] = self.dot_tile::<1, 1>(isa, c, [row]);
            // SAFETY: as above.
            unsafe { out.write(r * ldo + c, y) };
            c += 1;
        }
    }

    /// `x (m, k)` times the transposed weight: `(m, n)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        tensor_matmul(
            x,
            self.n,
            self.k,
            |a: &mut QActs, xs, k| a.quantize(xs, k),
            |a, out| self.matmul_into(a, out, self.n),
        )
    }
}

/// `x (m, k)` times a transposed `(n, k)` weight, for callers holding tensors (tests,
/// the tensor path): quantize the rows with `quantize`, run the kernel with `run`.
fn tensor_matmul<A: Default>(
    x: &Tensor,
    n: usize,
    k: usize,
    quantize: impl FnOnce(&mut A, &[f32], usize),
    run: impl FnOnce(&A, &mut [f32]),
) -> Result<Tensor> {
    let (m, kx) = x.dims2()?;
    if kx != k {
        candle_core::bail!("matmul: input has {kx} columns, weight expects {k}");
    }
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut acts = A::default();
    quantize(&mut acts, &xs, k);
    let mut out = vec![0f32; m * n];
    run(&acts, &mut out);
    Tensor::from_vec(out, (m, n), x.device())
}

impl OutPtr {
    /// # Safety
    /// `i` is inside the output slice and no other task writes it.
    #[inline]
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// Bits of the float 1.5 * 2^23. Any `i` with `|i| < 2^22` added to these bits, as an
/// integer, gives the float `1.5 * 2^23 + i` exactly, so subtracting `1.5 * 2^23` turns an
/// integer sum into its float value with no conversion instruction. The lane sums of
/// every kind stay far inside that range (at most 4 * 255 * 127 in magnitude).
#[cfg(target_arch = "x86_64")]
const MAGIC_BITS: i32 = 0x4B40_0000;

/// Per-thread buffers of the multi-row VNNI kernel: the activation-side corrections
/// and the `d_w * d_y` products of one tile, reused between calls.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct TileScratch {
    corr: Vec<i32>,
    dd: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static TILE_SCRATCH: std::cell::RefCell<TileScratch> =
        std::cell::RefCell::new(TileScratch::default());
}

/// Several activation rows at once with VNNI (decode steps of several sequences, and
/// prefill). Per (row, column, block) the work is one `vpdpbusd`, one conversion and
/// one FMA: everything that depends on only the row or only the column is hoisted.
///
/// * The weights are the unsigned operand of `vpdpbusd` for every kind: Q4_1 nibbles
///   as they are, Q4_0 nibbles without their `- 8`, Q8_0 bytes plus 128 (`^ 0x80`). The
///   offset comes back through the accumulator's start value, `-off * (sum of four
///   activations)` per lane, which depends on the row and block only. All of it is
///   exact integer arithmetic, so each lane holds the same four-product sum as
///   [`QWeight::dot_lanes`] (no saturation: `vpdpbusd` adds in 32 bits).
/// * The scale products `d_w * d_y` of eight columns are formed once per block and row
///   (one vector multiply, the same f32 products as the scalar code) and read back as
///   broadcasts; Q4_1's `m * s` chains run eight columns to a vector.
///
/// So the FMAs, their order and the final horizontal sum are those of `dot_lanes`.
#[cfg(target_arch = "x86_64")]
impl QWeight {
    /// # Safety
    /// VNNI, AVX512VL, AVX2 and FMA are available; `c0 % 8 == 0`, `c1 <= n`, and the
    /// output holds every row at stride `ldo` for columns `c0..c1`.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn cols_vnni(&self, x: &QActs, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        match self.kind {
            Kind::Q4_0 => self.cols_vnni_k::<0>(x, c0, c1, out, ldo),
            Kind::Q4_1 => self.cols_vnni_k::<1>(x, c0, c1, out, ldo),
            Kind::Q8_0 => self.cols_vnni_k::<2>(x, c0, c1, out, ldo),
        }
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn cols_vnni_k<const K: u8>(
        &self,
        x: &QActs,
        c0: usize,
        c1: usize,
        out: OutPtr,
        ldo: usize,
    ) {
        debug_assert!(c0.is_multiple_of(8) && c1 <= self.n);
        let nbk = self.k / QK;
        TILE_SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let s = &mut *s;
            if s.corr.len() < nbk * 8 * 8 {
                s.corr.resize(nbk * 8 * 8, 0);
                s.dd.resize(nbk * 8 * 8, 0.0);
            }
            let mut r = 0;
            while r < x.m {
                let left = x.m - r;
                // SAFETY: as for this function; the scratch holds nbk * 8 * 8 values.
                unsafe {
                    if left >= 8 {
                        self.rows_vnni::<K, 8>(x, r, c0, c1, s, out, ldo);
                        r += 8;
                    } else if left >= 4 {
                        self.rows_vnni::<K, 4>(x, r, c0, c1, s, out, ldo);
                        r += 4;
                    } else if left >= 2 {
                        self.rows_vnni::<K, 2>(x, r, c0, c1, s, out, ldo);
                        r += 2;
                    } else {
                        self.rows_vnni::<K, 1>(x, r, c0, c1, s, out, ldo);
                        r += 1;
                    }
                }
            }
        })
    }

    /// Rows `r0..r0 + R` against columns `c0..c1`, eight columns (one scale group) at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn rows_vnni<const K: u8, const R: usize>(
        &self,
        x: &QActs,
        r0: usize,
        c0: usize,
        c1: usize,
        s: &mut TileScratch,
        out: OutPtr,
        ldo: usize,
    ) {
        use std::arch::x86_64::*;
        let nbk = self.k / QK;
        let rows: [Row<'_>; R] = std::array::from_fn(|i| x.row(r0 + i));
        // Accumulator start values, `[b][r]` (eight lanes each): -off * four-sums of y.
        let corr = s.corr.as_mut_ptr();
        if K != 1 {
            let off = _mm256_set1_epi8(if K == 0 { 8 } else { -128 });
            for b in 0..nbk {
                for (i, row) in rows.iter().enumerate() {
                    let y = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                    let sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), off, y);
                    let neg = _mm256_sub_epi32(_mm256_set1_epi32(MAGIC_BITS), sum);
                    _mm256_storeu_si256(corr.add((b * R + i) * 8) as *mut __m256i, neg);
                }
            }
        }
        let dd = s.dd.as_mut_ptr();
        let mut g = c0;
        while g < c1 {
            let cols = (c1 - g).min(8);
            // Scale products `[b][r][column in group]`, and Q4_1's `m * s` sums.
            let mut summs = [_mm256_setzero_ps(); R];
            for b in 0..nbk {
                let si = self.sc(g, b);
                let dw = _mm256_loadu_ps(self.d.as_ptr().add(si));
                let mw = if K == 1 {
                    _mm256_loadu_ps(self.m.as_ptr().add(si))
                } else {
                    _mm256_setzero_ps()
                };
                for (i, row) in rows.iter().enumerate() {
                    let p = _mm256_mul_ps(dw, _mm256_set1_ps(*row.d.get_unchecked(b)));
                    _mm256_storeu_ps(dd.add((b * R + i) * 8), p);
                    if K == 1 {
                        summs[i] =
                            _mm256_fmadd_ps(mw, _mm256_set1_ps(*row.s.get_unchecked(b)), summs[i]);
                    }
                }
            }
            let mut sm = [[0f32; 8]; R];
            for (i, v) in summs.iter().enumerate() {
                _mm256_storeu_ps(sm[i].as_mut_ptr(), *v);
            }
            let mut j = 0;
            while j + 2 <= cols {
                self.pair_vnni::<K, R, 2>(&rows, g, j, corr, dd, &sm, out, r0, ldo);
                j += 2;
            }
            if j < cols {
                self.pair_vnni::<K, R, 1>(&rows, g, j, corr, dd, &sm, out, r0, ldo);
            }
            g += 8;
        }
    }

    /// Columns `g + j0 .. g + j0 + C` of the group starting at `g`, for the `R` rows.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn pair_vnni<const K: u8, const R: usize, const C: usize>(
        &self,
        rows: &[Row<'_>; R],
        g: usize,
        j0: usize,
        corr: *const i32,
        dd: *const f32,
        sm: &[[f32; 8]; R],
        out: OutPtr,
        r0: usize,
        ldo: usize,
    ) {
        use std::arch::x86_64::*;
        let nbk = self.k / QK;
        let qs = self.qs.as_ptr();
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let magic_i = _mm256_set1_epi32(MAGIC_BITS);
        let magic = _mm256_castsi256_ps(magic_i);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nbk {
            let mut ws = [_mm256_setzero_si256(); C];
            for (j, w) in ws.iter_mut().enumerate() {
                let wb = (g + j0 + j) * nbk + b;
                *w = if K == 2 {
                    _mm256_xor_si256(_mm256_loadu_si256(qs.add(wb * QK) as *const __m256i), flip)
                } else {
                    let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low)
                };
            }
            for (i, row) in rows.iter().enumerate() {
                let y = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                let start = if K == 1 {
                    magic_i
                } else {
                    _mm256_loadu_si256(corr.add((b * R + i) * 8) as *const __m256i)
                };
                for (j, w) in ws.iter().enumerate() {
                    let sum = _mm256_dpbusd_epi32(start, *w, y);
                    let d = _mm256_set1_ps(*dd.add((b * R + i) * 8 + j0 + j));
                    let a = acc.get_unchecked_mut(i).get_unchecked_mut(j);
                    // The lane sums sit in the low mantissa bits of MAGIC: one
                    // subtraction yields them as exact floats (cheaper than vcvtdq2ps).
                    let f = _mm256_sub_ps(_mm256_castsi256_ps(sum), magic);
                    *a = _mm256_fmadd_ps(d, f, *a);
                }
            }
        }
        for (i, accs) in acc.iter().enumerate() {
            for (j, a) in accs.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let v = hsum8(lanes) + if K == 1 { sm[i][j0 + j] } else { 0.0 };
                out.write((r0 + i) * ldo + g + j0 + j, v);
            }
        }
    }
}

/// The x86 kernels: `K` is the weight kind (0 Q4_0, 1 Q4_1, 2 Q8_0), `R` the number of
/// activation rows sharing one unpacked weight block. With VNNI one `vpdpbusd` replaces
/// `vpmaddubsw` + `vpmaddwd`; the integer sums are the same (no i16 saturation is
/// possible: |w| <= 15 or 128, |y| <= 127, so a pair sums to at most 32512).
macro_rules! x86_dot {
    ($name:ident, $name8:ident, $feat:literal, $vnni:expr) => {
        #[cfg(target_arch = "x86_64")]
        impl QWeight {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const K: u8, const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [Row<'_>; R],
            ) -> [[f32; R]; C] {
                use std::arch::x86_64::*;
                let nbk = self.k / QK;
                let mut acc = [[_mm256_setzero_ps(); R]; C];
                let mut summs = [[0f32; R]; C];
                let ones = _mm256_set1_epi16(1);
                let low = _mm256_set1_epi8(0x0F);
                let off8 = _mm256_set1_epi8(8);
                let qs = self.qs.as_ptr();
                for b in 0..nbk {
                    let mut ws = [_mm256_setzero_si256(); C];
                    for (j, w) in ws.iter_mut().enumerate() {
                        let wb = (c + j) * nbk + b;
                        *w = if K == 2 {
                            _mm256_loadu_si256(qs.add(wb * QK) as *const __m256i)
                        } else {
                            let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                            let q =
                                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low);
                            if K == 0 {
                                _mm256_sub_epi8(q, off8)
                            } else {
                                q
                            }
                        };
                    }
                    for r in 0..R {
                        let row = rows.get_unchecked(r);
                        let yq = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                        let dy = *row.d.get_unchecked(b);
                        for j in 0..C {
                            let w = ws[j];
                            // Q4_1 nibbles are unsigned already; signed weights move their
                            // sign onto the activations so `maddubs` sees |w| (ggml's trick).
                            let (ax, sy) = if K == 1 {
                                (w, yq)
                            } else {
                                (_mm256_sign_epi8(w, w), _mm256_sign_epi8(yq, w))
                            };
                            let sum = if $vnni {
                                _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
                            } else {
                                _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy))
                            };
                            let si = self.sc(c + j, b);
                            let dd = _mm256_set1_ps(*self.d.get_unchecked(si) * dy);
                            let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                            *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), *a);
                            if K == 1 {
                                let s = summs.get_unchecked_mut(j).get_unchecked_mut(r);
                                *s = self
                                    .m
                                    .get_unchecked(si)
                                    .mul_add(*row.s.get_unchecked(b), *s);
                            }
                        }
                    }
                }
                let mut out = [[0f32; R]; C];
                for j in 0..C {
                    for r in 0..R {
                        let mut lanes = [0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][r]);
                        out[j][r] = hsum8(lanes) + summs[j][r];
                    }
                }
                out
            }

            /// One activation row against the eight columns `c..c + 8` (`c % 8 == 0`):
            /// the eight `d_w * d_y` products and Q4_1's eight `m * s` chains are
            /// vector lanes (the same products and FMAs as the scalar ones, per lane).
            #[target_feature(enable = $feat)]
            unsafe fn $name8<const K: u8>(&self, c: usize, row: Row<'_>) -> [f32; 8] {
                use std::arch::x86_64::*;
                let nbk = self.k / QK;
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut summs = _mm256_setzero_ps();
                let ones = _mm256_set1_epi16(1);
                let low = _mm256_set1_epi8(0x0F);
                let off8 = _mm256_set1_epi8(8);
                let qs = self.qs.as_ptr();
                // The next eight columns' weights (one contiguous region), prefetched a
                // share per block: the loads of this group are spread over eight
                // streams, too many for the hardware prefetcher to run far ahead.
                let bsz = if K == 2 { QK } else { QK / 2 };
                let next = qs.wrapping_add((c + 8) * nbk * bsz);
                let lines = 8 * nbk * bsz / 64;
                let mut line = 0;
                for b in 0..nbk {
                    while line * nbk < (b + 1) * lines {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64) as *const i8);
                        line += 1;
                    }
                    let yq = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                    let si = self.sc(c, b);
                    let dd8 = _mm256_mul_ps(
                        _mm256_loadu_ps(self.d.as_ptr().add(si)),
                        _mm256_set1_ps(*row.d.get_unchecked(b)),
                    );
                    if K == 1 {
                        summs = _mm256_fmadd_ps(
                            _mm256_loadu_ps(self.m.as_ptr().add(si)),
                            _mm256_set1_ps(*row.s.get_unchecked(b)),
                            summs,
                        );
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        let wb = (c + j) * nbk + b;
                        let w = if K == 2 {
                            _mm256_loadu_si256(qs.add(wb * QK) as *const __m256i)
                        } else {
                            let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                            let q =
                                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low);
                            if K == 0 {
                                _mm256_sub_epi8(q, off8)
                            } else {
                                q
                            }
                        };
                        let (ax, sy) = if K == 1 {
                            (w, yq)
                        } else {
                            (_mm256_sign_epi8(w, w), _mm256_sign_epi8(yq, w))
                        };
                        let sum = if $vnni {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
                        } else {
                            _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy))
                        };
                        let dd = _mm256_permutevar8x32_ps(dd8, _mm256_set1_epi32(j as i32));
                        *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), *a);
                    }
                }
                let mut sm = [0f32; 8];
                _mm256_storeu_ps(sm.as_mut_ptr(), summs);
                let mut out = [0f32; 8];
                for j in 0..8 {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j]);
                    out[j] = hsum8(lanes) + sm[j];
                }
                out
            }
        }
    };
}

x86_dot!(dot_avx2, dot8_avx2, "avx2,fma", false);
x86_dot!(dot_vnni, dot8_vnni, "avx2,fma,avx512vnni,avx512vl", true);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Our kernels agree with candle's dequantized weights times exact activations to
    /// within the activation quantization error, for every type and odd shapes.
    #[test]
    fn matches_dequantized_reference() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (m, n, k) in [(1, 67, 64), (3, 130, 96), (7, 5, 32)] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let q = QTensor::quantize(&w, dt)?;
                let ours = QWeight::from_qtensor(&q)?.unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let got = ours.matmul(&x)?;
                let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
                let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err < 0.03 * scale.max(1.0) + 0.2,
                    "{dt:?} {m}x{n}x{k}: err {err} (scale {scale})"
                );
                // And candle's own quantized path lands in the same place.
                let theirs = candle_core::quantized::QMatMul::from_qtensor(q)?.forward(&x)?;
                let d2 = (&got - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d2 < 0.03 * scale.max(1.0) + 0.2, "{dt:?}: vs candle {d2}");
            }
        }
        Ok(())
    }

    /// The SIMD quantizer (AVX2 where present; NEON on aarch64) equals the scalar one
    /// bit for bit (ties, zeros, huge values).
    #[test]
    fn quantize_simd_equals_scalar() -> Result<()> {
        let dev = Device::Cpu;
        for nb in [1usize, 3, 18, 48] {
            let mut x: Vec<f32> = (Tensor::randn(0f32, 1.0, nb * QK, &dev)? * 5.0)?.to_vec1()?;
            x[0] = 127.0;
            x[1] = 0.5;
            x[2] = -2.5;
            if nb > 1 {
                x[QK..2 * QK].fill(0.0);
            }
            x[nb * QK - 1] = -3e5;
            let (mut d1, mut s1, mut q1) = (vec![0f32; nb], vec![0f32; nb], vec![0i8; nb * QK]);
            let (mut d2, mut s2, mut q2) = (vec![0f32; nb], vec![0f32; nb], vec![0i8; nb * QK]);
            quantize_scalar(&x, &mut d1, &mut s1, &mut q1);
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is baseline on aarch64; slices sized for `nb` blocks.
            unsafe {
                neon::quantize_neon(&x, &mut d2, &mut s2, &mut q2)
            };
            #[cfg(not(target_arch = "aarch64"))]
            quantize_into(&x, &mut d2, &mut s2, &mut q2);
            assert_eq!(q1, q2);
            assert_eq!(
                d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    #[test]
    fn quantize_row_rounds_half_even_and_keeps_sum() {
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5; // 0.5 * 127/127 = 0.5 → 0 (ties to even)
        x[2] = 1.5; // → 2
        x[3] = -2.5; // → -2
        let q = quantize_row(&x);
        assert_eq!(&q.qs[..4], &[127, 0, 2, -2]);
        assert_eq!(q.d[0], 1.0);
        assert_eq!(q.s[0], 127.0);
    }

    #[test]
    fn exact_on_integer_data() -> Result<()> {
        // With integer weights representable exactly in Q8_0 and activations whose
        // amax is 127, every step is exact.
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..64).map(|i| ((i % 7) as f32 - 3.0) * 1.0).collect();
        let mut wv = w.clone();
        wv[0] = 127.0; // block amax 127 → scale exactly 1
        wv[32] = 127.0;
        let wt = Tensor::from_vec(wv.clone(), (1, 64), &dev)?;
        let q = QTensor::quantize(&wt, GgmlDType::Q8_0)?;
        let ours = QWeight::from_qtensor(&q)?.unwrap();
        let mut xv: Vec<f32> = (0..64).map(|i| (i % 5) as f32).collect();
        xv[5] = 127.0;
        xv[40] = 127.0;
        let x = Tensor::from_vec(xv.clone(), (1, 64), &dev)?;
        let got = ours.matmul(&x)?.to_vec2::<f32>()?[0][0];
        let want: f32 = wv.iter().zip(&xv).map(|(a, b)| a * b).sum();
        assert_eq!(got, want);
        Ok(())
    }

    /// Every SIMD level this CPU has, for one and four rows at a time, agrees bit for
    /// bit with the portable lane emulation, for every type, on random data with extreme
    /// values and odd sizes (columns, rows, blocks per row).
    #[test]
    fn simd_equals_portable_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let levels = simd_levels();
        eprintln!("levels tested: {levels:?}");
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (m, n, k) in [
                (1, 37, 256),
                (7, 53, 96),
                (9, 5, 32),
                (4, 130, 544),
                (8, 67, 576),
                (19, 43, 160),
                (2, 11, 64),
                (3, 16, 64),
                (5, 9, 96),
                (6, 24, 32),
            ] {
                let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * 3.0)?;
                let ours = QWeight::from_qtensor(&QTensor::quantize(&w, dt)?)?.unwrap();
                let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &dev)?.to_vec1()?;
                for (i, v) in x.iter_mut().step_by(37).enumerate() {
                    *v *= 1e4 * (i as f32 - 1.5);
                }
                let mut acts = QActs::new();
                acts.quantize(&x, k);
                let mut want = vec![0f32; m * n];
                for r in 0..m {
                    for c in 0..n {
                        want[r * n + c] = ours.dot_lanes(c, acts.row(r));
                    }
                }
                for &level in &levels {
                    let mut got = vec![f32::NAN; m * (n + 3)];
                    ours.matmul_into_isa(level, &acts, &mut got, n + 3);
                    for r in 0..m {
                        for c in 0..n {
                            let (a, b) = (want[r * n + c], got[r * (n + 3) + c]);
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{dt:?} {level:?} {m}x{n}x{k} ({r},{c}): {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

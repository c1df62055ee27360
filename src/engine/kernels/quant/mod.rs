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
//! AVX-512 is present (`zmm`), the 256-bit multi-row kernels otherwise (`avx2`
//! with VNNI, `avx2_rows` without); NEON
//! kernels are in `neon`, `q5_0_neon` and `kquant_neon`. Every type's
//! dot product has AVX2 (x86) and NEON (aarch64: `sdot` and plain) kernels, and the
//! activation quantizers NEON (Q8_0/Q8_1/Q8_K) and AVX2 (Q8_0/Q8_1) ones; each equals
//! its portable reference bit for bit.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(in crate::engine::kernels) use avx2::hsum8x8;
#[cfg(target_arch = "x86_64")]
mod avx2_rows;
mod drive;
mod kquant;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "aarch64")]
pub(in crate::engine::kernels) use neon::{lanes_sdot, lanes_smull};
#[cfg(target_arch = "x86_64")]
mod pairs;
mod q5_0;
mod qweight;
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

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `hsum_float_8`: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
#[inline]
pub(in crate::engine::kernels) fn hsum8(l: [f32; 8]) -> f32 {
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
pub(in crate::engine::kernels) fn quantize_into(
    x: &[f32],
    d: &mut [f32],
    s: &mut [f32],
    qs: &mut [i8],
) {
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
    unsafe {
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
            let mut q = [_mm256_setzero_si256(); 4];
            for (qi, vi) in q.iter_mut().zip(&v) {
                let r = _mm256_round_ps(
                    _mm256_mul_ps(*vi, mul),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                *qi = _mm256_cvtps_epi32(r);
                sum = _mm256_add_epi32(sum, *qi);
            }
            // Every value is in -127..=127, so the saturating packs are exact; they
            // interleave the 128-bit lanes, which the permutation puts back in order.
            let w = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK) as *mut __m256i, w);
            // Integer sums are exact in any order.
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
            d[b] = f16::from_f32(dv).to_f32();
            s[b] = f16::from_f32(dv * total as f32).to_f32();
        }
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

    #[inline]
    pub fn rows(&self) -> usize {
        self.m
    }

    #[inline]
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
    /// AVX2 + FMA with 256-bit VNNI (`vpdpbusd`): AVX-VNNI's encoding where the CPU
    /// has it (see [`vex_vnni`]), else AVX512-VNNI+VL's.
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

/// Whether the [`Isa::Avx2Vnni`] kernels use the AVX-VNNI (VEX) encoding of
/// `vpdpbusd`, the only one on CPUs with AVX-VNNI but no AVX-512 (Intel client cores
/// from Alder Lake on); elsewhere they use the AVX512-VL one. The AVX-512 level's
/// one-row kernels always use the latter.
#[cfg(target_arch = "x86_64")]
#[inline]
fn vex_vnni() -> bool {
    #[cfg(test)]
    if EVEX_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    is_x86_feature_detected!("avxvnni")
}

/// Tests: run the [`Isa::Avx2Vnni`] kernels in the AVX512-VL encoding even where
/// AVX-VNNI is present, so that both encodings are held against the reference (the
/// results are the same either way, so other tests running meanwhile are unaffected).
#[cfg(all(test, target_arch = "x86_64"))]
static EVEX_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `level` runs on this CPU: a level of this architecture at most [`isa()`].
pub fn isa_available(level: Isa) -> bool {
    #[cfg(target_arch = "aarch64")]
    if matches!(level, Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512Vnni) {
        return false;
    }
    level as u8 <= isa() as u8
}

/// The best level this CPU supports.
#[inline]
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
                let evex =
                    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
                if evex
                    && cap != "avx2vnni"
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                {
                    return Isa::Avx512Vnni;
                }
                if evex || is_x86_feature_detected!("avxvnni") {
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

/// Runs `f` once per SIMD level of this CPU (see [`simd_levels`]), and for
/// [`Isa::Avx2Vnni`] once more in the AVX512-VL encoding where the CPU has both.
#[cfg(test)]
fn for_each_simd_kernel(mut f: impl FnMut(Isa)) {
    for level in simd_levels() {
        f(level);
        #[cfg(target_arch = "x86_64")]
        if level == Isa::Avx2Vnni
            && vex_vnni()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
        {
            use std::sync::atomic::Ordering::Relaxed;
            static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _held = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
            EVEX_ONLY.store(true, Relaxed);
            f(level);
            EVEX_ONLY.store(false, Relaxed);
        }
    }
}

/// Output pointer shared by the tasks of one matmul; each task writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct columns) and the owner outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

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
        unsafe {
            *self.0.add(i) = v;
        }
    }
}

/// Bits of the float 1.5 * 2^23. Any `i` with `|i| < 2^22` added to these bits, as an
/// integer, gives the float `1.5 * 2^23 + i` exactly, so subtracting `1.5 * 2^23` turns an
/// integer sum into its float value with no conversion instruction. The lane sums of
/// every kind stay far inside that range (at most 4 * 255 * 127 in magnitude).
#[cfg(target_arch = "x86_64")]
const MAGIC_BITS: i32 = 0x4B40_0000;

#[cfg(test)]
mod tests;

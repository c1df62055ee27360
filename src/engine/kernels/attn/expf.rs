//! `expf` for 16 lanes at once (AVX-512) or 8 (AVX2 + FMA), bit-identical to glibc's
//! scalar `expf`, which is what `f32::exp` calls on x86-64 Linux and what llama.cpp's
//! softmax calls.
//!
//! glibc (2.27 and later; `sysdeps/ieee754/flt-32/e_expf.c`, from Arm's
//! optimized-routines) computes in double: `k = round(x * 32/ln2)`, `r = x * 32/ln2 - k`,
//! `2^(k/32)` from a 32-entry table with `k / 32` added to its exponent, times a
//! degree-3 polynomial in `r`, rounded to f32 once. On a CPU with FMA and AVX2 glibc runs
//! its `__expf_fma` build, in which the compiler fused `x * 32/ln2 + shift`,
//! `x * 32/ln2 - k` and the polynomial steps; this module does the same operations, fused
//! the same way (read from the disassembly of Debian's glibc 2.36 libm), lane by lane:
//! four doubles to a register with AVX2 (the table read by a gather), eight with AVX-512
//! (the table held in four registers, read by permutes). Its special cases
//! (`|x| >= 88`, NaN) are selected per lane afterwards.
//!
//! Another libm (an older glibc, musl, macOS) may round differently, so the kernel that
//! uses this checks it against `f32::exp` once at start-up ([`agrees_with_libm`],
//! [`agrees_with_libm_avx2`]) and stays on the scalar `expf` if they disagree.

use std::arch::x86_64::*;

/// `2^(i/32)` as f64 bits, minus `i << 47` (glibc's `__exp2f_data.tab`).
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// 32 / ln 2.
const INV_LN2_N: u64 = 0x40471547652b82fe;
/// 1.5 * 2^52: adding it rounds to an integer, kept in the low mantissa bits.
const SHIFT: u64 = 0x4338000000000000;
/// The polynomial, scaled for `r` in units of 1/32.
const C0: u64 = 0x3ebc6af84b912394;
const C1: u64 = 0x3f2ebfce50fac4f3;
const C2: u64 = 0x3f962e42ff0c52d6;
/// Above this `expf` overflows to infinity.
const OVER: f32 = f32::from_bits(0x42b1_7217); // 0x1.62e42ep6
/// Below this `expf` underflows to +0.
const UNDER: f32 = f32::from_bits(0xc2cf_f1b4); // -0x1.9fe368p6
/// Below this (and not below `UNDER`) glibc returns the least subnormal directly.
const MAY_UNDER: f32 = f32::from_bits(0xc2ce_8ecf); // -0x1.9d1d9ep6

#[inline]
#[target_feature(enable = "avx512f")]
fn pd(bits: u64) -> __m512d {
    _mm512_set1_pd(f64::from_bits(bits))
}

/// The main path for 8 lanes in double.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp8(xd: __m512d) -> __m256 {
    // SAFETY: each load reads 8 of the table's 32 entries.
    let tab = |i: usize| unsafe { _mm512_loadu_si512(TAB[i..i + 8].as_ptr().cast()) };
    let kd = _mm512_fmadd_pd(pd(INV_LN2_N), xd, pd(SHIFT));
    let ki = _mm512_castpd_si512(kd);
    let kd = _mm512_sub_pd(kd, pd(SHIFT));
    let r = _mm512_fmsub_pd(pd(INV_LN2_N), xd, kd);
    // T[ki % 32]: two 16-entry lookups, picked by bit 4.
    let lo = _mm512_permutex2var_epi64(tab(0), ki, tab(8));
    let hi = _mm512_permutex2var_epi64(tab(16), ki, tab(24));
    let t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), lo, hi);
    let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
    let z = _mm512_fmadd_pd(r, pd(C0), pd(C1));
    let r2 = _mm512_mul_pd(r, r);
    let y = _mm512_fmadd_pd(r, pd(C2), _mm512_set1_pd(1.0));
    let y = _mm512_fmadd_pd(z, r2, y);
    _mm512_cvtpd_ps(_mm512_mul_pd(y, s))
}

/// `expf` of each lane, bit for bit glibc's.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) fn exp16(x: __m512) -> __m512 {
    let lo = exp8(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    let hi = exp8(_mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(x)));
    let y = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(lo), hi);
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(UNDER));
    let may_under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(MAY_UNDER)) & !under;
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(OVER));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let y = _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
    let y = _mm512_mask_blend_ps(may_under, y, _mm512_set1_ps(f32::from_bits(1)));
    let y = _mm512_mask_blend_ps(over, y, _mm512_set1_ps(f32::INFINITY));
    _mm512_mask_blend_ps(nan, y, _mm512_add_ps(x, x))
}

/// [`exp16`] over a slice whose length is a multiple of 16, in place.
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) fn exp_slice(xs: &mut [f32]) {
    for c in xs.chunks_exact_mut(16) {
        // SAFETY: `c` holds 16 floats.
        unsafe {
            let p = c.as_mut_ptr();
            _mm512_storeu_ps(p, exp16(_mm512_loadu_ps(p)));
        }
    }
}

#[inline]
#[target_feature(enable = "avx")]
fn pd4(bits: u64) -> __m256d {
    _mm256_set1_pd(f64::from_bits(bits))
}

/// The main path for 4 lanes in double, as [`exp8`] with AVX2 registers.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp4(xd: __m256d) -> __m128 {
    let kd = _mm256_fmadd_pd(pd4(INV_LN2_N), xd, pd4(SHIFT));
    let ki = _mm256_castpd_si256(kd);
    let kd = _mm256_sub_pd(kd, pd4(SHIFT));
    let r = _mm256_fmsub_pd(pd4(INV_LN2_N), xd, kd);
    let i = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
    // SAFETY: every index is below 32, the table's length.
    let t = unsafe { _mm256_i64gather_epi64::<8>(TAB.as_ptr().cast(), i) };
    let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
    let z = _mm256_fmadd_pd(r, pd4(C0), pd4(C1));
    let r2 = _mm256_mul_pd(r, r);
    let y = _mm256_fmadd_pd(r, pd4(C2), _mm256_set1_pd(1.0));
    let y = _mm256_fmadd_pd(z, r2, y);
    _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
}

/// `expf` of each of 8 lanes, bit for bit glibc's (AVX2 and FMA).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp8x(x: __m256) -> __m256 {
    let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
    let y = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi);
    let lt = |c: f32| _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(c));
    let (under, may_under) = (lt(UNDER), lt(MAY_UNDER));
    let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(OVER));
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
    // `under` implies `may_under`: the least subnormal first, then zero over it.
    let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::from_bits(1)), may_under);
    let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), under);
    let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over);
    _mm256_blendv_ps(y, _mm256_add_ps(x, x), nan)
}

/// [`exp8x`] over a slice whose length is a multiple of 8, in place.
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_slice_avx2(xs: &mut [f32]) {
    for c in xs.chunks_exact_mut(8) {
        // SAFETY: `c` holds 8 floats.
        unsafe {
            let p = c.as_mut_ptr();
            _mm256_storeu_ps(p, exp8x(_mm256_loadu_ps(p)));
        }
    }
}

/// Arguments that exercise each table entry, the polynomial's range and every special
/// case; a multiple of 16 long.
fn sample() -> Vec<f32> {
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0xffc0_0001),
        OVER,
        f32::from_bits(OVER.to_bits() + 1),
        UNDER,
        f32::from_bits(UNDER.to_bits() + 1),
        f32::from_bits(UNDER.to_bits() - 1),
        MAY_UNDER,
        f32::from_bits(MAY_UNDER.to_bits() - 1),
        f32::from_bits(MAY_UNDER.to_bits() + 1),
        -88.0,
        88.0,
        -87.5,
        f32::MIN_POSITIVE,
        -f32::from_bits(1),
        // Two of the arguments where computing `x * 32/ln2 - k` unfused changes the result.
        f32::from_bits(0x4202_422f),
        f32::from_bits(0xc27c_65d9),
    ];
    // A spread of bit patterns over the negative and positive finite ranges that matter.
    let mut b = 0x3000_0000u32;
    while b < 0x42d0_0000 {
        xs.push(f32::from_bits(b));
        xs.push(-f32::from_bits(b));
        b += 0x1_2345;
    }
    while !xs.len().is_multiple_of(16) {
        xs.push(-1.0);
    }
    xs
}

/// Whether `exp` on [`sample`] gives what `f32::exp` gives, bit for bit.
fn agrees(exp: impl Fn(&mut [f32])) -> bool {
    let xs = sample();
    let mut ys = xs.clone();
    exp(&mut ys);
    xs.iter()
        .zip(&ys)
        .all(|(x, y)| x.exp().to_bits() == y.to_bits())
}

/// Whether the CPU has AVX-512 F and DQ and [`exp16`] gives the C library's results.
pub(super) fn agrees_with_libm() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512dq")
        // SAFETY: the features were detected.
        && agrees(|xs| unsafe { exp_slice(xs) })
}

/// Whether the CPU has AVX2 and FMA and [`exp8x`] gives the C library's results.
pub(super) fn agrees_with_libm_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        // SAFETY: the features were detected.
        && agrees(|xs| unsafe { exp_slice_avx2(xs) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A vector `expf` over a slice, by name.
    type Kernel = (&'static str, fn(&mut [f32]));

    /// The vector `expf`s this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut ks: Vec<Kernel> = Vec::new();
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected.
            ks.push(("avx2", |xs| unsafe { exp_slice_avx2(xs) }));
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
            // SAFETY: the features were detected.
            ks.push(("avx512", |xs| unsafe { exp_slice(xs) }));
        }
        if ks.is_empty() {
            eprintln!("no AVX2 + FMA here: vector expf not tested");
        }
        ks
    }

    /// How many of `xs` each kernel gets wrong, summed.
    fn check(xs: &mut Vec<f32>) -> usize {
        while !xs.len().is_multiple_of(16) {
            xs.push(0.0);
        }
        let mut bad = 0;
        for (name, exp) in kernels() {
            let mut ys = xs.clone();
            exp(&mut ys);
            for (x, y) in xs.iter().zip(&ys) {
                if x.exp().to_bits() != y.to_bits() {
                    if bad < 10 {
                        eprintln!(
                            "{name} expf({x:e} = {:#x}): libm {:e}, ours {y:e}",
                            x.to_bits(),
                            x.exp()
                        );
                    }
                    bad += 1;
                }
            }
        }
        bad
    }

    /// The start-up checks pass on this CPU for each kernel it has (with glibc).
    #[test]
    fn sample_agrees() {
        let names: Vec<_> = kernels().into_iter().map(|(n, _)| n).collect();
        if names.contains(&"avx2") {
            assert!(agrees_with_libm_avx2());
        }
        if names.contains(&"avx512") {
            assert!(agrees_with_libm());
        }
    }

    /// Ten million random bit patterns plus uniform arguments in attention's range.
    #[test]
    fn random_agrees_with_libm() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut xs: Vec<f32> = (0..5_000_000).map(|_| f32::from_bits(rng.gen())).collect();
        xs.extend((0..5_000_000).map(|_| rng.gen_range(-120f32..0.0)));
        assert_eq!(check(&mut xs), 0);
    }

    /// Every f32, in chunks, through each kernel (about a minute per kernel on one
    /// core): `cargo test --release --lib exhaustive -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn exhaustive_agrees_with_libm() {
        let chunk = 1u64 << 24;
        let mut bad = 0;
        for c in 0..(1u64 << 32) / chunk {
            let mut xs: Vec<f32> = (c * chunk..(c + 1) * chunk)
                .map(|b| f32::from_bits(b as u32))
                .collect();
            bad += check(&mut xs);
        }
        eprintln!("exhaustive expf: {bad} of 2^32 (per kernel) differ");
        assert_eq!(bad, 0);
    }
}

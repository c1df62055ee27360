//! The AVX2 registers of [`super::passes`]: 8 lanes (F16C for the f16 conversions, FMA),
//! the 64 lanes of a dot product in eight registers, `expf` by
//! [`exp8x`](super::expf::exp8x).

use super::expf::exp_slice_avx2;
use super::passes::{self, Cache, Lanes};
use std::arch::x86_64::*;

/// One group of `G` query heads over one KV head of an f16 or bf16 cache;
/// `hd <= passes::MAX_HD`.
///
/// # Safety
/// AVX2, FMA and F16C must be available.
// Not inlined: one copy per group size and type, apart from the dispatch.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn heads<E: Cache, const G: usize>(
    q: &[f32],
    hd: usize,
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: the features `Avx2` needs are enabled here.
    unsafe { passes::heads::<Avx2, E, G>(q, hd, k, v, scale, out) }
}

struct Avx2;

impl Lanes for Avx2 {
    const W: usize = 8;

    /// As many as fit 16 registers with the `g` weights and a V register: 8 (all of a
    /// 64-wide head) for one head, 4 for two or three, 2 for four.
    fn regs(g: usize) -> usize {
        match g {
            1 => 8,
            2 | 3 => 4,
            _ => 2,
        }
    }
    type F = __m256;

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn store(p: *mut f32, x: __m256) {
        unsafe { _mm256_storeu_ps(p, x) }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_e<E: Cache>(p: *const E, n: usize) -> __m256 {
        unsafe {
            if n == 8 {
                return E::load8(p);
            }
            // No 16-bit masked load below AVX-512: the part through a zeroed buffer.
            let mut b = [E::ZERO; 8];
            std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), n);
            E::load8(b.as_ptr())
        }
    }

    #[inline]
    #[target_feature(enable = "avx,fma")]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn round_f16(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn select(bits: u32, a: __m256, b: __m256) -> __m256 {
        let lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let set = _mm256_and_si256(_mm256_set1_epi32(bits as i32), lane);
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(xs: &mut [f32]) {
        exp_slice_avx2(xs)
    }

    /// Register `a` holds lanes `8a..8a + 8` of ggml's 64; ggml's 16-lane register `j`
    /// is `(a[2j], a[2j + 1])`, so its `(r0 + r2) + (r1 + r3)` is `lo` and `hi` below,
    /// and the first step of its reduction (lanes `i` and `i + 8`) is `hi + lo`.
    #[inline]
    #[target_feature(enable = "avx,fma")]
    unsafe fn dot<const NC: usize>(k: *const f32, q: *const f32) -> __m256 {
        let mut a = [_mm256_setzero_ps(); 8];
        for c in 0..NC {
            for (i, ai) in a.iter_mut().enumerate() {
                let o = c * 64 + 8 * i;
                // SAFETY: the caller's `k` and `q` hold `64 * NC` values.
                let (kv, qv) = unsafe { (_mm256_loadu_ps(k.add(o)), _mm256_loadu_ps(q.add(o))) };
                *ai = _mm256_fmadd_ps(kv, qv, *ai);
            }
        }
        let lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
        _mm256_add_ps(hi, lo)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce(r: &[__m256]) -> __m256 {
        reduce8x8(r)
    }
}

/// The eight lane sums `t[p]` (8 lanes each, after ggml's first halving) reduced the rest
/// of ggml's way: `u[i] = t[i + 4] + t[i]`, then `(u0 + u2) + (u1 + u3)`. Each level adds,
/// for two (then four, eight) positions at once, the same pairs of lanes. Lane `p` of the
/// result is position `p`.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8x8(t: &[__m256]) -> __m256 {
    debug_assert_eq!(t.len(), 8);
    // Level 2: lanes i and i + 4; half h of u[c] is position 2c + h.
    let u: [__m256; 4] = std::array::from_fn(|c| {
        let (a, b) = (t[2 * c], t[2 * c + 1]);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    });
    // Level 3: u0 + u2 and u1 + u3; half h of w[c] is positions 4c + h and 4c + h + 2.
    let w: [__m256; 2] = std::array::from_fn(|c| {
        let (a, b) = (u[2 * c], u[2 * c + 1]);
        _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(a, b),
            _mm256_shuffle_ps::<0xee>(a, b),
        )
    });
    // Level 4: the two sums; lane 4h + i is position 2i + h.
    let (a, b) = (w[0], w[1]);
    let f = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(a, b),
        _mm256_shuffle_ps::<0xdd>(a, b),
    );
    _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

//! The AVX-512 registers of [`super::passes`]: 16 lanes, the 64 lanes of a dot product
//! in four registers, `expf` by [`exp16`](super::expf::exp16).

use super::expf::exp_slice;
use super::passes::{self, Lanes};
use half::f16;
use std::arch::x86_64::*;

/// One group of `G` query heads over one KV head; `hd <= passes::MAX_HD`.
///
/// # Safety
/// AVX-512 F, BW, VL and DQ, F16C and FMA must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
pub(super) unsafe fn heads<const G: usize>(
    q: &[f32],
    hd: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: the features `Avx512` needs are enabled here.
    unsafe { passes::heads::<Avx512, G>(q, hd, k, v, scale, out) }
}

struct Avx512;

impl Lanes for Avx512 {
    const W: usize = 16;
    const R: usize = 4;
    type F = __m512;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, x: __m512) {
        unsafe { _mm512_storeu_ps(p, x) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_h(p: *const f16, n: usize) -> __m512 {
        unsafe {
            _mm512_cvtph_ps(if n == 16 {
                _mm256_loadu_si256(p.cast())
            } else {
                _mm256_maskz_loadu_epi16(((1u32 << n) - 1) as u16, p.cast())
            })
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_f16(x: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn select(bits: u32, a: __m512, b: __m512) -> __m512 {
        _mm512_mask_blend_ps(bits as u16, a, b)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn exp(xs: &mut [f32]) {
        exp_slice(xs)
    }

    /// ggml's four 16-lane registers, then `(r0 + r2) + (r1 + r3)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot<const NC: usize>(k: *const f32, q: *const f32) -> __m512 {
        let mut a = [_mm512_setzero_ps(); 4];
        for c in 0..NC {
            for (i, ai) in a.iter_mut().enumerate() {
                let o = c * 64 + 16 * i;
                // SAFETY: the caller's `k` and `q` hold `64 * NC` values.
                let (kv, qv) = unsafe { (_mm512_loadu_ps(k.add(o)), _mm512_loadu_ps(q.add(o))) };
                *ai = _mm512_fmadd_ps(kv, qv, *ai);
            }
        }
        _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce(r: &[__m512]) -> __m512 {
        reduce16x16(r.try_into().expect("16 registers"))
    }
}

/// The sixteen lane sums `r[p]` (one 16-lane register each) reduced as ggml's
/// `_mm512_reduce_add_ps` does each one: halves of 8, then 4, then `(u0 + u2) + (u1 + u3)`. Each level adds, for two (then
/// four, eight, sixteen) positions at once, the same pairs of lanes. Lane `p` of the
/// result is position `p`.
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16x16(r: &[__m512; 16]) -> __m512 {
    {
        // Level 1: lanes i and i + 8; lanes 0..8 for r[2c], 8..16 for r[2c + 1].
        let t: [__m512; 8] = std::array::from_fn(|c| {
            let (a, b) = (r[2 * c], r[2 * c + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xee>(a, b),
            )
        });
        // Level 2: lanes i and i + 4; block b of u[c] is position 4c + b.
        let u: [__m512; 4] = std::array::from_fn(|c| {
            let (a, b) = (t[2 * c], t[2 * c + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xdd>(a, b),
            )
        });
        // Level 3: u0 + u2 and u1 + u3, within each block.
        let w: [__m512; 2] = std::array::from_fn(|c| {
            let (a, b) = (u[2 * c], u[2 * c + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xee>(a, b),
            )
        });
        // Level 4: the two halves; lane 4b + i is position 4i + b.
        let (a, b) = (w[0], w[1]);
        let f = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(a, b),
            _mm512_shuffle_ps::<0xdd>(a, b),
        );
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(idx, f)
    }
}

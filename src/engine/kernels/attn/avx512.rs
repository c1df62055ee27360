//! The AVX-512 path of [`super::attend_heads`] and [`super::attend_heads_bf16`]: the
//! same arithmetic as the portable loop, reordered so that independent work overlaps.
//! Written once for both cache types ([`Lanes`]): over f16, Q and the accumulators are
//! rounded to f16; over bf16 they stay in f32.
//!
//! Positions are taken in blocks. Per block, three passes:
//! 1. scores: every `q · k` of the block (they do not depend on the softmax state). K rows
//!    are widened to f32 once for all heads of the group; each dot product keeps
//!    ggml's 64 lanes (four 16-lane registers, fused multiply-adds), and sixteen
//!    positions' lane sums are reduced together by a transpose that adds the same pairs
//!    as ggml's reduction tree, so each score is bit for bit the scalar one;
//! 2. softmax weights: the running maximum in order, each position's `expf` argument
//!    (`old - new` when the maximum grows, `s - m` otherwise), then `expf` 16 at a time
//!    ([`super::expf`], glibc's own rounding);
//! 3. V: the accumulators of all heads stay in registers while the block's V rows
//!    stream by; each step rescales (when the maximum grew) and adds exactly as before,
//!    and the sum of weights `S = fma(S, ms, vs)` runs alongside.
//!
//! A decode step finds the KV cache cold, so pass 1 prefetches the V rows of its
//! positions and the K rows ahead of it.

use super::expf::exp_slice;
use super::{prefetch, tail, Elem, LANES, MAX_GROUP};
use half::{bf16, f16};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Positions per block.
const BLOCK: usize = 128;
/// Widest head handled here (the caller checks).
pub(super) const MAX_HD: usize = 256;

/// A cache element type as this kernel reads it.
pub(super) trait Lanes: Elem {
    /// Q and the V accumulators rounded to f16 (ggml's f16 flash attention) rather than
    /// kept in f32.
    const HALF: bool;
    /// Sixteen values from `p`, widened to f32.
    ///
    /// # Safety
    /// AVX-512 F, BW and VL are available; `p` is valid for reading sixteen values.
    unsafe fn load16(p: *const Self) -> __m512;
    /// The values of `p` where `mask` has a bit set, widened to f32; zeros elsewhere.
    ///
    /// # Safety
    /// As [`Lanes::load16`], for the values whose bits are set.
    unsafe fn load16_masked(mask: u16, p: *const Self) -> __m512;
}

impl Lanes for f16 {
    const HALF: bool = true;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller's.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(mask: u16, p: *const Self) -> __m512 {
        // SAFETY: the caller's.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

impl Lanes for bf16 {
    const HALF: bool = false;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller's.
        unsafe { widen_bf16(_mm256_loadu_si256(p.cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(mask: u16, p: *const Self) -> __m512 {
        // SAFETY: the caller's.
        unsafe { widen_bf16(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

/// Sixteen bf16 bit patterns as the f32 values they are (the upper halves of them).
#[inline]
#[target_feature(enable = "avx512f")]
fn widen_bf16(x: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
}

/// One group of `G` query heads over one KV head; `hd <= MAX_HD`.
///
/// # Safety
/// AVX-512 F, BW, VL and DQ, F16C and FMA must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
pub(super) unsafe fn heads<E: Lanes, const G: usize>(
    q: &[f32],
    hd: usize,
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
) {
    unsafe {
        debug_assert!(G <= MAX_GROUP && hd <= MAX_HD && q.len() == G * hd && out.len() == G * hd);
        let len = k.len() / hd;
        let np = hd / LANES * LANES;
        // Q, rounded to f16 over an f16 cache.
        let mut qf = [[0f32; MAX_HD]; G];
        for h in 0..G {
            for d in 0..hd {
                let x = q[h * hd + d];
                qf[h][d] = if E::HALF {
                    f16::from_f32(x).to_f32()
                } else {
                    x
                };
            }
        }
        // The accumulators (f16 values over an f16 cache), held as f32 between blocks.
        let mut acc = [[0f32; MAX_HD]; G];
        let mut m = [f32::NEG_INFINITY; G];
        let mut sum = [0f32; G];
        let mut sc = [[0f32; BLOCK]; G];
        let mut ms = [[0f32; BLOCK]; G];
        // Converted K rows; only the rows of the current positions are ever read.
        let mut kf = [const { MaybeUninit::<f32>::uninit() }; 16 * MAX_HD];
        let mut j0 = 0;
        while j0 < len {
            let bl = (len - j0).min(BLOCK);
            let kb = &k[j0 * hd..(j0 + bl) * hd];
            // Pass 1: scores.
            for p0 in (0..bl).step_by(16) {
                let n = (bl - p0).min(16);
                let rows = &kb[p0 * hd..(p0 + n) * hd];
                // In a decode step the cache is cold: ask now for these positions' V rows
                // (pass 3) and for K rows 32 positions ahead (at the start, 16 to 48), so
                // that their loads find them.
                let at = (j0 + p0) * hd;
                prefetch(&v[at..at + n * hd]);
                let from = if at == 0 { 16 * hd } else { at + 32 * hd };
                prefetch(&k[from.min(k.len())..(at + 48 * hd).min(k.len())]);
                match np / LANES {
                    0 => sc.iter_mut().for_each(|s| s[p0..p0 + 16].fill(0.0)),
                    1 => scores::<E, G, 1>(rows, hd, &mut kf, &qf, &mut sc, p0),
                    2 => scores::<E, G, 2>(rows, hd, &mut kf, &qf, &mut sc, p0),
                    3 => scores::<E, G, 3>(rows, hd, &mut kf, &qf, &mut sc, p0),
                    _ => scores::<E, G, 4>(rows, hd, &mut kf, &qf, &mut sc, p0),
                }
                if np < hd {
                    for p in 0..n {
                        let row = &kb[(p0 + p) * hd..(p0 + p + 1) * hd];
                        for h in 0..G {
                            sc[h][p0 + p] = tail(sc[h][p0 + p], &qf[h][..hd], row, np);
                        }
                    }
                }
            }
            // Pass 2: the weights. `sc` becomes the `expf` arguments, then `vs`; `ms` is
            // 1 except where the maximum grew.
            let sv = _mm512_set1_ps(scale);
            let one = _mm512_set1_ps(1.0);
            for h in 0..G {
                let s = &mut sc[h];
                for c in (0..bl).step_by(16) {
                    let p = s[c..].as_mut_ptr();
                    _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), sv));
                }
                let mut grew = [0u16; BLOCK / 16];
                let mut mh = m[h];
                for j in 0..bl {
                    let x = s[j];
                    if x > mh {
                        s[j] = mh - x;
                        mh = x;
                        grew[j / 16] |= 1 << (j % 16);
                    } else {
                        s[j] = x - mh;
                    }
                }
                m[h] = mh;
                let nc = bl.div_ceil(16) * 16;
                exp_slice(&mut s[..nc]);
                for c in (0..nc).step_by(16) {
                    let g = grew[c / 16];
                    let e = _mm512_loadu_ps(s[c..].as_ptr());
                    _mm512_storeu_ps(ms[h][c..].as_mut_ptr(), _mm512_mask_blend_ps(g, one, e));
                    _mm512_storeu_ps(s[c..].as_mut_ptr(), _mm512_mask_blend_ps(g, e, one));
                }
            }
            // Pass 3: V, 64 dimensions (four registers, the last ones masked) at a time.
            let vb = &v[j0 * hd..(j0 + bl) * hd];
            for cb in (0..hd).step_by(64) {
                let mask: [u16; 4] = std::array::from_fn(|r| {
                    let rem = hd.saturating_sub(cb + 16 * r);
                    if rem >= 16 {
                        u16::MAX
                    } else {
                        ((1u32 << rem) - 1) as u16
                    }
                });
                let mut a = [[_mm512_setzero_ps(); 4]; G];
                for h in 0..G {
                    for r in 0..4 {
                        a[h][r] = _mm512_loadu_ps(acc[h][cb + 16 * r..].as_ptr());
                    }
                }
                let with_sum = cb == 0;
                for j in 0..bl {
                    let row = vb.as_ptr().wrapping_add(j * hd + cb);
                    let x: [__m512; 4] = std::array::from_fn(|r| {
                        let p = row.wrapping_add(16 * r);
                        if mask[r] == u16::MAX {
                            E::load16(p)
                        } else {
                            E::load16_masked(mask[r], p)
                        }
                    });
                    for h in 0..G {
                        let w = ms[h][j];
                        let e = sc[h][j];
                        if w != 1.0 {
                            let wv = _mm512_set1_ps(w);
                            for ar in a[h].iter_mut() {
                                *ar = round::<E>(_mm512_mul_ps(*ar, wv));
                            }
                        }
                        let ev = _mm512_set1_ps(e);
                        for r in 0..4 {
                            a[h][r] = round::<E>(_mm512_fmadd_ps(x[r], ev, a[h][r]));
                        }
                        if with_sum {
                            sum[h] = sum[h].mul_add(w, e);
                        }
                    }
                }
                for h in 0..G {
                    for r in 0..4 {
                        _mm512_storeu_ps(acc[h][cb + 16 * r..].as_mut_ptr(), a[h][r]);
                    }
                }
            }
            j0 += bl;
        }
        for h in 0..G {
            let inv = if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] };
            for (o, a) in out[h * hd..(h + 1) * hd].iter_mut().zip(&acc[h][..hd]) {
                *o = a * inv;
            }
        }
    }
}

/// The lane sums of up to sixteen positions' dot products (the first `64 * NC` values of
/// each row of `rows`, `hd` apart, converted into `kf`), for each head, reduced into
/// `sc[h][p0..p0 + 16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
fn scores<E: Lanes, const G: usize, const NC: usize>(
    rows: &[E],
    hd: usize,
    kf: &mut [MaybeUninit<f32>; 16 * MAX_HD],
    qf: &[[f32; MAX_HD]; G],
    sc: &mut [[f32; BLOCK]; G],
    p0: usize,
) {
    const { assert!(NC * LANES <= MAX_HD) };
    let w = NC * LANES;
    assert!(w <= hd && rows.len() <= 16 * hd);
    for (p, row) in rows.chunks_exact(hd).enumerate() {
        for c in 0..4 * NC {
            // SAFETY: `16 * c + 16 <= w <= hd`; `p < 16`, so `p * w + 16 * c + 16 <= kf.len()`.
            unsafe {
                let x = E::load16(row.as_ptr().add(16 * c));
                _mm512_storeu_ps(kf.as_mut_ptr().add(p * w + 16 * c).cast(), x);
            }
        }
    }
    let n = rows.len() / hd;
    for h in 0..G {
        let mut r = [_mm512_setzero_ps(); 16];
        for (p, rp) in r.iter_mut().enumerate() {
            if p >= n {
                break;
            }
            let mut a = [_mm512_setzero_ps(); 4];
            for c in 0..NC {
                for (i, ai) in a.iter_mut().enumerate() {
                    let o = c * LANES + 16 * i;
                    // SAFETY: `p * w + o + 16 <= 16 * w <= kf.len()`, written above;
                    // `o + 16 <= w`.
                    let (kv, qv) = unsafe {
                        (
                            _mm512_loadu_ps(kf.as_ptr().add(p * w + o).cast()),
                            _mm512_loadu_ps(qf[h].as_ptr().add(o)),
                        )
                    };
                    *ai = _mm512_fmadd_ps(kv, qv, *ai);
                }
            }
            *rp = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
        }
        // SAFETY: `p0 + 16 <= BLOCK`.
        unsafe { _mm512_storeu_ps(sc[h].as_mut_ptr().add(p0), reduce16x16(&r)) };
    }
}

/// An accumulator as the cache type keeps it: over f16, `f32(f16(x))` rounding to
/// nearest even (as `f16::from_f32`); over bf16, `x`.
#[inline]
#[target_feature(enable = "avx512f")]
fn round<E: Lanes>(x: __m512) -> __m512 {
    if E::HALF {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    } else {
        x
    }
}

/// The sixteen lane sums `r[p]` reduced as ggml's `_mm512_reduce_add_ps` does each one:
/// halves of 8, then 4, then `(u0 + u2) + (u1 + u3)`. Each level adds, for two (then
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

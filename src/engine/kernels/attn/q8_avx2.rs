//! The AVX2 path of the q8_0-cache kernel ([`super::q8`]): the portable loop's arithmetic
//! reordered into passes over a chunk of positions, as the f16 kernel's ([`super::passes`]):
//!
//! 1. scores: each K row's bytes are made absolute once for all heads of the group (as
//!    ggml's `mul_sum_i8_pairs_float`), each block's exact integer sums added with one
//!    fused multiply-add per head; the eight lane sums of eight positions are reduced
//!    together ([`hsum8x8`], ggml's pairing), so each score is the portable one;
//! 2. softmax weights: the running maximum in order, then `expf` a register at a time;
//! 3. V: a column block of every head's accumulators stays in registers while the
//!    chunk's V rows stream by, each row dequantized once (`d * (x - 128)`, exact) and
//!    added into each head (`fma(v, w, acc)`, rescaled first where the maximum grew).
//!
//! A decode step finds the cache cold: each chunk asks for its own V rows and the next
//! chunk's K rows before it starts.

// Index loops over heads, registers and positions read more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::q8::{Q8Rows, Quantized, BLOCK, MAX_HD};
use crate::engine::kernels::quant::hsum8x8;
use half::f16;
use std::arch::x86_64::*;

/// Positions per chunk.
const CHUNK: usize = 64;
/// Scales per chunk, at most.
const MAX_SCALES: usize = CHUNK * MAX_HD / BLOCK;

/// The query heads of `q` (one to four, `hd` apart) over one KV head; `level` as
/// [`super::q8::attend_with`]'s (1: the C library's `expf`, 2: the 8-lane one, 3: the
/// 16-lane one).
///
/// # Safety
/// AVX2, FMA and F16C must be available, and the `expf` of `level`; the shapes are those
/// `attend_with` checked.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn heads(
    level: u8,
    q: &[f32],
    hd: usize,
    kv: Q8Rows<'_>,
    scale: f32,
    out: &mut [f32],
) {
    // Accumulator registers per head in pass 3: as many as leave room for the weights,
    // a V register and its scale (16 in all); the head's registers are a whole number
    // of them (`hd / 8` is a multiple of 4).
    let wide = (hd / 8).is_multiple_of(8);
    unsafe {
        match q.len() / hd {
            1 if wide => run::<1, 8>(level, q, hd, kv, scale, out),
            1 => run::<1, 4>(level, q, hd, kv, scale, out),
            2 => run::<2, 4>(level, q, hd, kv, scale, out),
            3 => run::<3, 2>(level, q, hd, kv, scale, out),
            _ => run::<4, 2>(level, q, hd, kv, scale, out),
        }
    }
}

/// `G` heads, `R` accumulator registers each per column block.
#[inline(always)]
unsafe fn run<const G: usize, const R: usize>(
    level: u8,
    q: &[f32],
    hd: usize,
    kv: Q8Rows<'_>,
    scale: f32,
    out: &mut [f32],
) {
    debug_assert!(q.len() == G * hd && out.len() == G * hd && (hd / 8).is_multiple_of(R));
    let nb = hd / BLOCK;
    let len = kv.k.len() / hd;
    let qz = Quantized::new(q, hd);
    let mut acc = [[0f32; MAX_HD]; G];
    let mut m = [f32::NEG_INFINITY; G];
    let mut sum = [0f32; G];
    // Per position: the `expf` argument, then the weight it adds (`vs`), and the factor
    // that rescales the accumulators first (`ms`, 1 unless the maximum grew there).
    let mut sc = [[0f32; CHUNK]; G];
    let mut ms = [[0f32; CHUNK]; G];
    // The chunk's K and V scales as f32.
    let mut ksf = [0f32; MAX_SCALES];
    let mut vsf = [0f32; MAX_SCALES];
    unsafe {
        super::prefetch(&kv.k[..(CHUNK * hd).min(kv.k.len())]);
    }
    let mut j0 = 0;
    while j0 < len {
        let n = (len - j0).min(CHUNK);
        let (b0, b1) = (j0 * nb, (j0 + n) * nb);
        // SAFETY: the ranges lie inside the rows (`attend_with` checked the lengths).
        unsafe {
            super::prefetch(&kv.v[j0 * hd..(j0 + n) * hd]);
            let next = ((j0 + n) * hd).min(kv.k.len())..((j0 + n + CHUNK) * hd).min(kv.k.len());
            super::prefetch(&kv.k[next]);
            widen(&kv.k_scale[b0..b1], &mut ksf);
            widen(&kv.v_scale[b0..b1], &mut vsf);
        }
        // Pass 1: scores, eight positions at a time.
        unsafe { scores::<G>(kv.k, hd, j0, n, &ksf, &qz, scale, &mut sc) };
        // Pass 2: the weights.
        for h in 0..G {
            let (s, mh) = (&mut sc[h], &mut m[h]);
            let mut grew = [false; CHUNK];
            for p in 0..n {
                let x = s[p];
                if x > *mh {
                    s[p] = *mh - x;
                    *mh = x;
                    grew[p] = true;
                } else {
                    s[p] = x - *mh;
                }
            }
            let xs = &mut s[..n.div_ceil(16) * 16];
            match level {
                // SAFETY: level 3 means the AVX-512 `expf` was checked against libm.
                3 => unsafe { super::expf::exp_slice(xs) },
                // SAFETY: level 2 means the AVX2 `expf` was checked against libm (and
                // `heads` enabled its features).
                2 => unsafe { super::expf::exp_slice_avx2(xs) },
                _ => xs.iter_mut().for_each(|x| *x = x.exp()),
            }
            for p in 0..n {
                let e = s[p];
                (ms[h][p], s[p]) = if grew[p] { (e, 1.0) } else { (1.0, e) };
                sum[h] = sum[h].mul_add(ms[h][p], s[p]);
            }
        }
        // Pass 3: V, `R` registers of every head at a time.
        let vrows = &kv.v[j0 * hd..(j0 + n) * hd];
        for cb in (0..hd).step_by(8 * R) {
            unsafe { v_block::<G, R>(vrows, hd, n, cb, &vsf, &ms, &sc, &mut acc) };
        }
        j0 += n;
    }
    for h in 0..G {
        let inv = if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] };
        for (o, a) in out[h * hd..(h + 1) * hd].iter_mut().zip(&acc[h][..hd]) {
            *o = a * inv;
        }
    }
}

/// f16 scales to f32, eight at a time (the rest one by one).
#[inline(always)]
unsafe fn widen(d: &[f16], out: &mut [f32; MAX_SCALES]) {
    debug_assert!(d.len() <= MAX_SCALES);
    let whole = d.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: `i + 8 <= d.len() <= out.len()`.
        unsafe {
            let x = _mm_loadu_si128(d.as_ptr().add(i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(x));
        }
    }
    for i in whole..d.len() {
        out[i] = d[i].to_f32();
    }
}

/// The scaled scores of positions `j0..j0 + n` for each head, into `sc[h][..n]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scores<const G: usize>(
    k: &[u8],
    hd: usize,
    j0: usize,
    n: usize,
    ksf: &[f32; MAX_SCALES],
    qz: &Quantized,
    scale: f32,
    sc: &mut [[f32; CHUNK]; G],
) {
    let nb = hd / BLOCK;
    unsafe {
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        for p0 in (0..n).step_by(8) {
            let c = (n - p0).min(8);
            let mut lanes = [[_mm256_setzero_ps(); 8]; G];
            for p in 0..c {
                let row = k.as_ptr().add((j0 + p0 + p) * hd);
                let mut l = [_mm256_setzero_ps(); G];
                for b in 0..nb {
                    let kv = _mm256_xor_si256(_mm256_loadu_si256(row.add(b * BLOCK).cast()), flip);
                    let ak = _mm256_sign_epi8(kv, kv);
                    let dk = ksf[(p0 + p) * nb + b];
                    for h in 0..G {
                        let qv = _mm256_loadu_si256(qz.q[h].as_ptr().add(b * BLOCK).cast());
                        let p16 = _mm256_maddubs_epi16(ak, _mm256_sign_epi8(qv, kv));
                        let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        l[h] = _mm256_fmadd_ps(_mm256_set1_ps(dk * qz.d[h][b]), s, l[h]);
                    }
                }
                for h in 0..G {
                    lanes[h][p] = l[h];
                }
            }
            for h in 0..G {
                let r = hsum8x8(lanes[h]);
                for p in 0..c {
                    sc[h][p0 + p] = r[p] * scale;
                }
            }
        }
    }
}

/// One column block of pass 3: `R` registers of each head's accumulators from `cb`, over
/// the `n` V rows of `vrows`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn v_block<const G: usize, const R: usize>(
    vrows: &[u8],
    hd: usize,
    n: usize,
    cb: usize,
    vsf: &[f32; MAX_SCALES],
    ms: &[[f32; CHUNK]; G],
    sc: &[[f32; CHUNK]; G],
    acc: &mut [[f32; MAX_HD]; G],
) {
    let nb = hd / BLOCK;
    // Registers per scale (a column block of more than 32 values spans two).
    let per = R.min(BLOCK / 8);
    unsafe {
        let off = _mm256_set1_ps(128.0);
        let mut a = [[_mm256_setzero_ps(); R]; G];
        for h in 0..G {
            for r in 0..R {
                a[h][r] = _mm256_loadu_ps(acc[h].as_ptr().add(cb + 8 * r));
            }
        }
        for p in 0..n {
            let row = vrows.as_ptr().add(p * hd + cb);
            let mut ev = [_mm256_setzero_ps(); G];
            for h in 0..G {
                let w = ms[h][p];
                if w != 1.0 {
                    let wv = _mm256_set1_ps(w);
                    for ar in a[h].iter_mut() {
                        *ar = _mm256_mul_ps(*ar, wv);
                    }
                }
                ev[h] = _mm256_set1_ps(sc[h][p]);
            }
            let mut d = _mm256_setzero_ps();
            for r in 0..R {
                if r % per == 0 {
                    d = _mm256_set1_ps(vsf[p * nb + (cb + 8 * r) / BLOCK]);
                }
                let bytes = _mm_loadl_epi64(row.add(8 * r).cast());
                let x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                // `d * (x - 128)`: both steps exact, as the portable dequantization.
                let x = _mm256_mul_ps(d, _mm256_sub_ps(x, off));
                for h in 0..G {
                    a[h][r] = _mm256_fmadd_ps(x, ev[h], a[h][r]);
                }
            }
        }
        for h in 0..G {
            for r in 0..R {
                _mm256_storeu_ps(acc[h].as_mut_ptr().add(cb + 8 * r), a[h][r]);
            }
        }
    }
}

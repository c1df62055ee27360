//! Attention of one query head over one KV head of an f16 cache, on the CPU.
//!
//! The rounding follows ggml's flash-attention kernel as far as the tensor path does:
//! Q is rounded to f16 (K and V are stored as f16), scores are summed in f32, the
//! softmax runs in f32 and its weights are rounded to f16 before they scale V. The
//! SIMD path (AVX2 + F16C + FMA, detected at run time) and the portable path give
//! bit-identical results: both sum the score of a position in eight f32 lanes with
//! fused multiply-adds and reduce the lanes in one fixed order.

use std::cell::RefCell;

use half::f16;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Lane reduction shared by both paths.
#[inline]
fn hsum8(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// `out = softmax(q·K^T * scale) V` over the `k.len() / q.len()` cached positions.
/// `k` and `v` are `(positions, head_dim)`, `out` is `head_dim`.
pub fn attend(q: &[f32], k: &[f16], v: &[f16], scale: f32, out: &mut [f32]) {
    attend_with(has_simd(), q, k, v, scale, out)
}

fn attend_with(simd: bool, q: &[f32], k: &[f16], v: &[f16], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let len = k.len() / hd;
    debug_assert!(v.len() == k.len() && out.len() == hd);
    let mut q16 = [0f32; 256];
    let q16 = &mut q16[..hd.min(256)];
    if hd > 256 {
        // Heads wider than any model we know of take the slow road.
        let qv: Vec<f32> = q.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        return attend_rounded(simd, &qv, k, v, scale, out, len);
    }
    for (d, &x) in q16.iter_mut().zip(q) {
        *d = f16::from_f32(x).to_f32();
    }
    attend_rounded(simd, q16, k, v, scale, out, len)
}

fn attend_rounded(
    simd: bool,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    scale: f32,
    out: &mut [f32],
    len: usize,
) {
    let hd = q.len();
    SCORES.with(|cell| {
        let mut s = cell.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        let s = &mut s[..len];
        for (j, sj) in s.iter_mut().enumerate() {
            *sj = dot(simd, q, &k[j * hd..(j + 1) * hd]) * scale;
        }
        let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f32;
        for sj in s.iter_mut() {
            *sj = (*sj - max).exp();
            sum += *sj;
        }
        out.fill(0.0);
        for (j, &e) in s.iter().enumerate() {
            let w = f16::from_f32(e / sum).to_f32();
            mad(simd, w, &v[j * hd..(j + 1) * hd], out);
        }
    })
}

/// `q · k` in eight lanes (element `i` goes to lane `i % 8`), tail added after.
#[inline]
fn dot(simd: bool, q: &[f32], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2, FMA and F16C were detected; slices have equal length.
        return unsafe { dot_f16c(q, k) };
    }
    let _ = simd;
    let n8 = q.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for c in 0..n8 / 8 {
        for (l, a) in acc.iter_mut().enumerate() {
            let i = c * 8 + l;
            *a = q[i].mul_add(k[i].to_f32(), *a);
        }
    }
    let mut r = hsum8(acc);
    for i in n8..q.len() {
        r += q[i] * k[i].to_f32();
    }
    r
}

/// `out += w * v`, element by element with a fused multiply-add.
#[inline]
fn mad(simd: bool, w: f32, v: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as for `dot`.
        return unsafe { mad_f16c(w, v, out) };
    }
    let _ = simd;
    for (o, x) in out.iter_mut().zip(v) {
        *o = w.mul_add(x.to_f32(), *o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16c(q: &[f32], k: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n8 = q.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), kv, acc);
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut r = hsum8(lanes);
    for i in n8..q.len() {
        r += q[i] * k[i].to_f32();
    }
    r
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mad_f16c(w: f32, v: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = out.len() / 8 * 8;
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i < n8 {
        let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
        let o = out.as_mut_ptr().add(i);
        _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(o)));
        i += 8;
    }
    for i in n8..out.len() {
        out[i] = w.mul_add(v[i].to_f32(), out[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(rng: &mut rand::rngs::StdRng, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
    }

    /// SIMD and portable paths agree bit for bit, and both agree with a plain f64
    /// softmax-attention to f16 precision; odd head sizes and lengths included.
    #[test]
    fn simd_equals_portable_and_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (hd, len) in [(64, 1), (64, 37), (8, 5), (13, 9), (128, 300), (80, 2)] {
            let q = data(&mut rng, hd, 2.0);
            let k: Vec<f16> = data(&mut rng, hd * len, 2.0)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let v: Vec<f16> = data(&mut rng, hd * len, 3.0)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let mut a = vec![0f32; hd];
            let mut b = vec![0f32; hd];
            attend_with(false, &q, &k, &v, scale, &mut a);
            attend_with(has_simd(), &q, &k, &v, scale, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.to_bits(), y.to_bits(), "hd {hd} len {len}: {x} vs {y}");
            }
            // Reference in f64 on the same f16 inputs.
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..hd)
                        .map(|d| q[d] as f64 * k[j * hd + d].to_f64())
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..len).map(|j| e[j] / z * v[j * hd + d].to_f64()).sum();
                assert!(
                    (want - a[d] as f64).abs() < 2e-2,
                    "hd {hd} len {len} d {d}: {want} vs {}",
                    a[d]
                );
            }
        }
    }
}

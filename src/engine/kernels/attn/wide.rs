//! Attention of query heads over one KV head of a bf16 cache, on the CPU.
//!
//! A bf16 value is the upper half of the f32 of the same value, so it widens exactly
//! and cheaply, and the kernel computes in f32 as the tensor path does over a bf16 cache
//! (K and V widened, Q and the softmax weights never rounded): each score the dot
//! product of Q (as it comes) with the widened K row, summed in the f16 kernel's 64
//! lanes and reduction tree, times the scale; the f16 kernel's online softmax (`expf`,
//! `S = fma(S, ms, w)`); the weighted sum of V kept in f32 (`acc = fma(v, w, acc)`,
//! `acc = acc * ms` when the maximum grows); at the end `acc * (1 / S)`. Against the
//! tensor path (a matrix product for the scores, a two-pass softmax with the weights
//! divided by their sum, a second matrix product for V) only the order of the
//! additions and where the division falls differ: the results agree to f32 rounding.
//!
//! The same paths as over f16, bit-identical: the portable loop (the reference), AVX2 +
//! FMA (that loop eight lanes at a time), the f16 kernel's passes on AVX2 registers
//! ([`super::passes`]) and on AVX-512 ([`super::avx512`]), both written for the two
//! types; on aarch64 that loop with NEON steps (`super::neon`).

use half::bf16;

use super::{attend_one, dot_ref, heads_body, mad_ref, path, scale_ref, Path, MAX_GROUP};

/// `out = softmax(q·K^T * scale) V` for the `q.len() / hd` query heads that share one
/// KV head of a bf16 cache, side by side in `q` and `out`; `k` and `v` are `(positions,
/// hd)`. Each head gets what the single-head loop ([`attend_one`]) gives it.
pub fn attend_heads_bf16(
    q: &[f32],
    hd: usize,
    k: &[bf16],
    v: &[bf16],
    scale: f32,
    out: &mut [f32],
) {
    heads_with(path(), q, hd, k, v, scale, out)
}

fn heads_with(
    path: Path,
    q: &[f32],
    hd: usize,
    k: &[bf16],
    v: &[bf16],
    scale: f32,
    out: &mut [f32],
) {
    debug_assert!(hd > 0 && q.len().is_multiple_of(hd) && out.len() == q.len());
    debug_assert!(v.len() == k.len() && k.len().is_multiple_of(hd));
    if hd > 256 {
        // Heads wider than any model we know of take the portable, allocating road.
        for (qh, o) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            one_head(qh, k, v, scale, o);
        }
        return;
    }
    for (qg, og) in q.chunks(MAX_GROUP * hd).zip(out.chunks_mut(MAX_GROUP * hd)) {
        #[cfg(target_arch = "x86_64")]
        if matches!(path, Path::Avx512 | Path::Avx2) {
            // SAFETY: the path's features were detected; `hd <= 256`.
            unsafe { super::passes_group(path, qg, hd, k, v, scale, og) };
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if path == Path::Avx2Loop {
            // SAFETY: AVX2, FMA and F16C were detected (the f32 loop takes the C
            // library's `expf`, so it needs no vector `expf`).
            unsafe { heads_avx2(qg, hd, k, v, scale, og) };
            continue;
        }
        #[cfg(target_arch = "aarch64")]
        if path == Path::Neon {
            super::heads_neon::<f32, bf16, f32>(qg, hd, k, v, scale, og);
            continue;
        }
        let _ = path;
        heads_body(
            qg,
            hd,
            k,
            v,
            scale,
            og,
            |a: &[f32], b| dot_ref(a, b),
            |a: &mut [f32], x, w| mad_ref(a, x, w),
            |a: &mut [f32], w| scale_ref(a, w),
        );
    }
}

/// The portable loop for one head of any width (the reference of the tests).
fn one_head(q: &[f32], k: &[bf16], v: &[bf16], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let (mut qh, mut acc) = (vec![0f32; hd], vec![0f32; hd]);
    attend_one(
        q,
        k,
        v,
        scale,
        out,
        &mut qh[..],
        &mut acc[..],
        |a: &[f32], b| dot_ref(a, b),
        |a: &mut [f32], x, w| mad_ref(a, x, w),
        |a: &mut [f32], w| scale_ref(a, w),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn heads_avx2(q: &[f32], hd: usize, k: &[bf16], v: &[bf16], scale: f32, out: &mut [f32]) {
    heads_body(
        q,
        hd,
        k,
        v,
        scale,
        out,
        // SAFETY (the three): the features are enabled here; equal lengths.
        |a: &[f32], b| unsafe { super::dot_f16c(a, b) },
        |a: &mut [f32], x, w| unsafe { mad_avx2(a, x, w) },
        |a: &mut [f32], w| unsafe { scale_avx2(a, w) },
    )
}

/// `acc = fma(v, w, acc)`, eight values at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mad_avx2(acc: &mut [f32], v: &[bf16], w: f32) {
    use super::Load8;
    use std::arch::x86_64::*;
    debug_assert_eq!(acc.len(), v.len());
    let n8 = acc.len() / 8 * 8;
    let wv = _mm256_set1_ps(w);
    for i in (0..n8).step_by(8) {
        // SAFETY: `i + 8 <= n8 <= len` for both slices.
        unsafe {
            let p = acc.as_mut_ptr().add(i);
            let y = _mm256_fmadd_ps(Load8::load8(v.as_ptr().add(i)), wv, _mm256_loadu_ps(p));
            _mm256_storeu_ps(p, y);
        }
    }
    mad_ref(&mut acc[n8..], &v[n8..], w);
}

/// `acc = acc * w`, eight values at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_avx2(acc: &mut [f32], w: f32) {
    use std::arch::x86_64::*;
    let n8 = acc.len() / 8 * 8;
    let wv = _mm256_set1_ps(w);
    for i in (0..n8).step_by(8) {
        // SAFETY: `i + 8 <= n8 <= acc.len()`.
        unsafe {
            let p = acc.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), wv));
        }
    }
    scale_ref(&mut acc[n8..], w);
}

#[cfg(test)]
mod tests;

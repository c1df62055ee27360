//! Attention over a q8_0 cache (the values stored offset by 128, one f16 scale per 32),
//! with the arithmetic of ggml's CPU flash-attention kernel for a Q8_0 K and V cache (the
//! one-row path, as llama.cpp runs it with `-ctk q8_0 -ctv q8_0 -fa on`):
//!
//! - Q is quantized to Q8_0 as ggml's x86 `quantize_row_q8_0` does (scale `amax / 127`
//!   kept as f16, values `round_half_even(x * 127 / amax)`);
//! - each score is ggml's x86 `ggml_vec_dot_q8_0_q8_0`: per 32-value block, the exact
//!   integer sums of four products in each of 8 lanes, converted and added with one
//!   fused multiply-add by `d_k * d_q` per block; then `hsum8`; times the scale;
//! - an online softmax over the positions in order (`expf`; the running maximum, `ms`
//!   and `vs`, `S = fma(S, ms, vs)`);
//! - V dequantized (`d * q`, exact in f32) and accumulated in f32: `acc *= ms` when the
//!   maximum grows, `acc = fma(v, vs, acc)`; at the end `acc * (1 / S)`.
//!
//! The portable loop is the reference; the AVX2 version ([`super::q8_avx2`], the same
//! steps in passes) gives the same bits (integer sums are exact in any order), with the
//! 8- or 16-lane `expf` ([`super::expf`]) where it agrees with the C library's; so does
//! the NEON one on aarch64 (`super::neon`).

// Index loops over heads and positions read more plainly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use half::f16;

use crate::engine::kernels::quant::{hsum8, quantize_into};

/// Values per scale.
pub(super) const BLOCK: usize = 32;
/// Positions per pass (scores, then weights, then V).
pub(super) const CHUNK: usize = 64;
/// Widest head handled without allocating.
pub(super) const MAX_HD: usize = 256;

/// The K/V rows of one KV head of a q8_0 cache: `len` positions of `hd` bytes and
/// `hd / 32` scales each.
#[derive(Clone, Copy)]
pub struct Q8Rows<'a> {
    pub k: &'a [u8],
    pub k_scale: &'a [f16],
    pub v: &'a [u8],
    pub v_scale: &'a [f16],
}

/// `out = softmax(q·K^T * scale) V` for the `q.len() / hd` query heads that share one KV
/// head (side by side in `q` and `out`), over every position of `kv`.
pub fn attend_heads_q8(q: &[f32], hd: usize, kv: Q8Rows<'_>, scale: f32, out: &mut [f32]) {
    attend_with(super::simd_level(), q, hd, kv, scale, out)
}

/// ggml's `fwht` of one block (a power of two long), in place: every value times
/// `1 / sqrt(n)`, then the butterflies `(u + v, u - v)` at distances 1, 2, 4, ... — the
/// orthonormal Walsh-Hadamard rotation llama.cpp applies to Q, K and V in front of a
/// quantized cache (and to the attention output after it; the matrix is its own inverse).
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let scale = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= scale);
    let mut len = 1;
    while len < n {
        for i in (0..n).step_by(2 * len) {
            for j in i..i + len {
                let (u, v) = (x[j], x[j + len]);
                x[j] = u + v;
                x[j + len] = u - v;
            }
        }
        len <<= 1;
    }
}

/// What the CPU runs: 0 portable, 1 AVX2 + FMA, 2 that plus the 8-lane `expf`, 3 the
/// 16-lane `expf` (on aarch64: 1 NEON, 2 NEON with `sdot`).
pub(super) fn attend_with(
    level: u8,
    q: &[f32],
    hd: usize,
    kv: Q8Rows<'_>,
    scale: f32,
    out: &mut [f32],
) {
    assert!(
        hd > 0 && hd.is_multiple_of(BLOCK) && hd <= MAX_HD,
        "q8_0 attention: head_dim {hd}"
    );
    assert!(q.len().is_multiple_of(hd) && out.len() == q.len());
    let len = kv.k.len() / hd;
    assert!(kv.v.len() == len * hd && kv.k_scale.len() == len * hd / BLOCK);
    assert!(kv.v_scale.len() == kv.k_scale.len());
    for (qh, oh) in q.chunks(4 * hd).zip(out.chunks_mut(4 * hd)) {
        #[cfg(target_arch = "x86_64")]
        if level > 0 {
            // SAFETY: AVX2, FMA and F16C were detected (level > 0), and the `expf` of
            // level 2 or 3; shapes checked above.
            unsafe { super::q8_avx2::heads(level, qh, hd, kv, scale, oh) };
            continue;
        }
        #[cfg(target_arch = "aarch64")]
        if level > 0 {
            heads_neon(level > 1, qh, hd, kv, scale, oh);
            continue;
        }
        let _ = level;
        heads(qh, hd, kv, scale, oh, dots_q8, v_chunk, |xs| {
            xs.iter_mut().for_each(|x| *x = x.exp())
        });
    }
}

/// ggml's x86 `quantize_row_q8_0` of one head (the quantizer of the Q8_0 matmuls):
/// values and f16-rounded scales.
fn quantize_q(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    let mut sums = [0f32; MAX_HD / BLOCK];
    quantize_into(x, d, &mut sums[..d.len()], q);
}

/// Up to four query heads quantized to Q8_0.
pub(super) struct Quantized {
    pub(super) q: [[i8; MAX_HD]; 4],
    pub(super) d: [[f32; MAX_HD / BLOCK]; 4],
}

impl Quantized {
    /// The `q.len() / hd` (at most four) heads of `q`, each by [`quantize_q`].
    pub(super) fn new(q: &[f32], hd: usize) -> Self {
        let nb = hd / BLOCK;
        let mut z = Quantized {
            q: [[0i8; MAX_HD]; 4],
            d: [[0f32; MAX_HD / BLOCK]; 4],
        };
        for (h, x) in q.chunks_exact(hd).enumerate() {
            quantize_q(x, &mut z.q[h][..hd], &mut z.d[h][..nb]);
        }
        z
    }
}

/// [`dot_q8`] of one K row against each of the first `g` heads of `qz`.
fn dots_q8(k: &[u8], kd: &[f16], qz: &Quantized, g: usize, out: &mut [f32; 4]) {
    let (hd, nb) = (k.len(), kd.len());
    for h in 0..g {
        out[h] = dot_q8(k, kd, &qz.q[h][..hd], &qz.d[h][..nb]);
    }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` (x86 order) of one cached K row against a quantized Q.
fn dot_q8(k: &[u8], kd: &[f16], q: &[i8], qd: &[f32]) -> f32 {
    let mut l = [0f32; 8];
    for (b, (kb, qb)) in k.chunks_exact(BLOCK).zip(q.chunks_exact(BLOCK)).enumerate() {
        let d = kd[b].to_f32() * qd[b];
        for (lane, acc) in l.iter_mut().enumerate() {
            let s: i32 = (4 * lane..4 * lane + 4)
                .map(|i| (kb[i] as i32 - 128) * qb[i] as i32)
                .sum();
            *acc = d.mul_add(s as f32, *acc);
        }
    }
    hsum8(l)
}

/// `out[i] = f32(d[i / 32]) * (x[i] - 128)`.
fn dequant(x: &[u8], d: &[f16], out: &mut [f32]) {
    for ((o, xb), &db) in out
        .chunks_exact_mut(BLOCK)
        .zip(x.chunks_exact(BLOCK))
        .zip(d)
    {
        let s = db.to_f32();
        for (o, &b) in o.iter_mut().zip(xb) {
            *o = s * (b as i32 - 128) as f32;
        }
    }
}

/// One chunk of V for [`heads`]' V step: `n` rows of `hd` bytes (`v`) and their scales
/// (`d`), and per head and row the factor that rescales the accumulators first (`ms`)
/// and the weight the row adds (`vs`).
pub(super) struct VChunk<'a> {
    pub(super) v: &'a [u8],
    pub(super) d: &'a [f16],
    pub(super) hd: usize,
    pub(super) n: usize,
    pub(super) g: usize,
    pub(super) ms: &'a [[f32; CHUNK]; 4],
    pub(super) vs: &'a [[f32; CHUNK]; 4],
}

/// The portable V step: each row dequantized ([`dequant`]), then per head
/// `acc = fma(v, vs, acc * ms)` (`acc * 1` is `acc`).
fn v_chunk(c: VChunk<'_>, acc: &mut [[f32; MAX_HD]; 4]) {
    let (hd, nb) = (c.hd, c.hd / BLOCK);
    let mut row = [0f32; MAX_HD];
    for p in 0..c.n {
        dequant(
            &c.v[p * hd..(p + 1) * hd],
            &c.d[p * nb..(p + 1) * nb],
            &mut row[..hd],
        );
        for h in 0..c.g {
            let (ms, vs) = (c.ms[h][p], c.vs[h][p]);
            for (a, &x) in acc[h][..hd].iter_mut().zip(&row[..hd]) {
                *a = x.mul_add(vs, *a * ms);
            }
        }
    }
}

/// The loop, for up to four heads, with the element steps passed in (portable or SIMD;
/// each must give the portable bits).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn heads(
    q: &[f32],
    hd: usize,
    kv: Q8Rows<'_>,
    scale: f32,
    out: &mut [f32],
    dotf: impl Fn(&[u8], &[f16], &Quantized, usize, &mut [f32; 4]),
    vf: impl Fn(VChunk<'_>, &mut [[f32; MAX_HD]; 4]),
    expf: impl Fn(&mut [f32]),
) {
    let g = q.len() / hd;
    let nb = hd / BLOCK;
    let len = kv.k.len() / hd;
    let mut acc = [[0f32; MAX_HD]; 4];
    let mut m = [f32::NEG_INFINITY; 4];
    let mut sum = [0f32; 4];
    let mut sc = [[0f32; CHUNK]; 4];
    let mut ms = [[1f32; CHUNK]; 4];
    let mut grew = [[false; CHUNK]; 4];
    let qz = Quantized::new(q, hd);
    let mut j0 = 0;
    while j0 < len {
        let n = (len - j0).min(CHUNK);
        // Scores.
        for p in 0..n {
            let j = j0 + p;
            let (kr, kd) = (
                &kv.k[j * hd..(j + 1) * hd],
                &kv.k_scale[j * nb..(j + 1) * nb],
            );
            let mut s4 = [0f32; 4];
            dotf(kr, kd, &qz, g, &mut s4);
            for h in 0..g {
                sc[h][p] = s4[h] * scale;
            }
        }
        // Weights: `sc` becomes each position's `expf` argument, then its exponential.
        for h in 0..g {
            let mut mh = m[h];
            for p in 0..n {
                let x = sc[h][p];
                grew[h][p] = x > mh;
                if x > mh {
                    sc[h][p] = mh - x;
                    mh = x;
                } else {
                    sc[h][p] = x - mh;
                }
            }
            m[h] = mh;
            // Whole groups of 16 (the lanes past `n` are not read).
            expf(&mut sc[h][..n.div_ceil(16) * 16]);
        }
        // `sc` becomes each position's weight `vs`, `ms` its rescaling factor.
        for h in 0..g {
            for p in 0..n {
                let e = sc[h][p];
                (ms[h][p], sc[h][p]) = if grew[h][p] { (e, 1.0) } else { (1.0, e) };
                sum[h] = sum[h].mul_add(ms[h][p], sc[h][p]);
            }
        }
        // V.
        let chunk = VChunk {
            v: &kv.v[j0 * hd..(j0 + n) * hd],
            d: &kv.v_scale[j0 * nb..(j0 + n) * nb],
            hd,
            n,
            g,
            ms: &ms,
            vs: &sc,
        };
        vf(chunk, &mut acc);
        j0 += n;
    }
    for h in 0..g {
        let inv = if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] };
        for (o, a) in out[h * hd..(h + 1) * hd].iter_mut().zip(&acc[h][..hd]) {
            *o = a * inv;
        }
    }
}

/// The loop with the NEON steps of [`super::neon`]; `sdot` for the scores where
/// `dotprod` is asked for (the caller checked the CPU has it), else `smull`.
#[cfg(target_arch = "aarch64")]
fn heads_neon(dotprod: bool, q: &[f32], hd: usize, kv: Q8Rows<'_>, scale: f32, out: &mut [f32]) {
    use super::neon;
    heads(
        q,
        hd,
        kv,
        scale,
        out,
        // SAFETY (the closures): NEON is baseline on aarch64 and `dotprod` is only set
        // when the CPU has it; every slice is a whole number of 32-value blocks
        // (checked by `attend_with`).
        |k, kd, qz, g, o| unsafe {
            if dotprod {
                neon::dots_q8_sdot(k, kd, qz, g, o)
            } else {
                neon::dots_q8_smull(k, kd, qz, g, o)
            }
        },
        |c, acc| unsafe { neon::v_chunk_q8(c, acc) },
        |xs| xs.iter_mut().for_each(|x| *x = x.exp()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q, K bytes, K scales, V bytes, V scales.
    type Case = (Vec<f32>, Vec<u8>, Vec<f16>, Vec<u8>, Vec<f16>);

    fn case(len: usize, hd: usize, g: usize, seed: u64) -> Case {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let q: Vec<f32> = (0..g * hd)
            .map(|_| (next() % 2000) as f32 / 250.0 - 4.0)
            .collect();
        let k: Vec<u8> = (0..len * hd).map(|_| (next() % 255 + 1) as u8).collect();
        let v: Vec<u8> = (0..len * hd).map(|_| (next() % 255 + 1) as u8).collect();
        let sc = |n: u32| f16::from_f32((n % 1000) as f32 / 40000.0);
        let ks: Vec<f16> = (0..len * hd / BLOCK).map(|_| sc(next())).collect();
        let vs: Vec<f16> = (0..len * hd / BLOCK).map(|_| sc(next())).collect();
        (q, k, ks, v, vs)
    }

    /// Every level gives the portable bits, for group sizes 1 to 7 and lengths that end
    /// mid-chunk; and the result is the softmax-weighted mean of the dequantized V rows.
    /// The rotation is orthonormal: applied twice it gives the input back (to rounding).
    #[test]
    fn fwht_is_its_own_inverse() {
        for n in [64usize, 128, 256] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 / 7.0 - 7.0)
                .collect();
            let mut y = x.clone();
            fwht(&mut y);
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((norm(&y) - norm(&x)).abs() < 1e-3 * norm(&x));
            fwht(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn q8_attention_levels_agree_and_match_f64() {
        let levels: Vec<u8> = (0..=super::super::simd_level()).collect();
        for (len, hd, g) in [
            (1, 32, 1),
            (70, 64, 3),
            (129, 128, 4),
            (200, 64, 7),
            (5, 256, 2),
            (300, 64, 1),
            (65, 128, 1),
        ] {
            let (q, k, ks, v, vs) = case(len, hd, g, (len * hd + g) as u64);
            let kv = Q8Rows {
                k: &k,
                k_scale: &ks,
                v: &v,
                v_scale: &vs,
            };
            let mut want = vec![0f32; g * hd];
            attend_with(0, &q, hd, kv, 0.125, &mut want);
            for &l in &levels[1..] {
                let mut got = vec![f32::NAN; g * hd];
                attend_with(l, &q, hd, kv, 0.125, &mut got);
                assert_eq!(
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "level {l}, len {len} hd {hd} g {g}"
                );
            }
            // f64 reference (on Q as the kernel quantizes it).
            let mut qq = vec![0i8; g * hd];
            let mut qd = vec![0f32; g * hd / BLOCK];
            for h in 0..g {
                quantize_q(
                    &q[h * hd..(h + 1) * hd],
                    &mut qq[h * hd..(h + 1) * hd],
                    &mut qd[h * hd / BLOCK..(h + 1) * hd / BLOCK],
                );
            }
            let qf = |h: usize, i: usize| qd[(h * hd + i) / BLOCK] as f64 * qq[h * hd + i] as f64;
            let deq = |x: &[u8], d: &[f16], j: usize, i: usize| {
                d[(j * hd + i) / BLOCK].to_f64() * (x[j * hd + i] as f64 - 128.0)
            };
            for h in 0..g {
                let s: Vec<f64> = (0..len)
                    .map(|j| (0..hd).map(|i| qf(h, i) * deq(&k, &ks, j, i)).sum::<f64>() * 0.125)
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let tot: f64 = w.iter().sum();
                for i in 0..hd {
                    let o: f64 = (0..len).map(|j| w[j] * deq(&v, &vs, j, i)).sum::<f64>() / tot;
                    let got = want[h * hd + i] as f64;
                    assert!(
                        (got - o).abs() <= 1e-4 * (1.0 + o.abs()),
                        "len {len} hd {hd} g {g} h {h} i {i}: {got} vs {o}"
                    );
                }
            }
        }
    }
}

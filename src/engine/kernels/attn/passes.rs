//! The AVX2 path of [`super::attend_heads`] ([`super::avx2`] supplies the registers):
//! the same arithmetic as the portable loop, reordered so that independent work
//! overlaps. The passes are those of the AVX-512 kernel ([`super::avx512`]), written
//! once over a register type ([`Lanes`]: its width and the operations on it). The
//! AVX-512 kernel keeps its own hand-written copy: run through this generic body it
//! measured about 25 % slower (the cause not found).
//!
//! Positions are taken in blocks. Per block, three passes:
//! 1. scores: every `q · k` of the block (they do not depend on the softmax state). K rows
//!    are converted from f16 once for all heads of the group; each dot product keeps
//!    ggml's 64 lanes (fused multiply-adds into `64 / W` registers), and `W` positions'
//!    lane sums are reduced together by a transpose that adds the same pairs as ggml's
//!    reduction tree, so each score is bit for bit the scalar one;
//! 2. softmax weights: the running maximum in order, each position's `expf` argument
//!    (`old - new` when the maximum grows, `s - m` otherwise), then `expf` a register at
//!    a time ([`super::expf`], glibc's own rounding);
//! 3. V: a column block of the f16 accumulators of all heads stays in registers while
//!    the block's V rows stream by; each step rescales (when the maximum grew) and adds
//!    exactly as before, and the sum of weights `S = fma(S, ms, vs)` runs alongside.
//!
//! A decode step finds the KV cache cold, so pass 1 prefetches the V rows of its
//! positions and the K rows ahead of it.

use super::{prefetch, tail, Load8, LANES, MAX_GROUP};
use half::{bf16, f16};
use std::mem::MaybeUninit;

/// Positions per block.
const BLOCK: usize = 128;
/// Widest head handled here (the caller checks).
pub(super) const MAX_HD: usize = 256;
/// Widest register, in f32 lanes.
const MAX_W: usize = 16;

/// One register of `W` f32 lanes and what the passes do with it.
///
/// # Safety
/// Each method needs the CPU features of its implementation; the callers of
/// [`heads`] check them.
pub(super) trait Lanes {
    /// f32 lanes per register (8 or 16; divides [`LANES`]).
    const W: usize;
    /// Registers per head in the accumulators' column block of pass 3 for `g` heads (a
    /// power of two, at most 8): each is a chain of dependent steps (fused multiply-add,
    /// rounding to f16 and back) per position, so the more the better, as long as the
    /// `g` heads' registers, their weights and a V register fit the register file.
    fn regs(g: usize) -> usize;
    type F: Copy;
    unsafe fn zero() -> Self::F;
    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    unsafe fn store(p: *mut f32, x: Self::F);
    /// The first `n <= W` values at `p` widened to f32, the other lanes 0 (nothing
    /// past `p + n` is read).
    unsafe fn load_e<E: Cache>(p: *const E, n: usize) -> Self::F;
    /// `a * b + c`, rounded once.
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// `f32(f16(x))`, rounding to nearest even (as `f16::from_f32`).
    unsafe fn round_f16(x: Self::F) -> Self::F;
    /// Lane `i` from `b` where bit `i` of `bits` is set, else from `a`.
    unsafe fn select(bits: u32, a: Self::F, b: Self::F) -> Self::F;
    /// glibc's `expf` of each value, in place; `xs.len()` is a multiple of `W`.
    unsafe fn exp(xs: &mut [f32]);
    /// ggml's f16 dot product over the first `64 * NC` values at `k` and `q` (f32 values
    /// of f16s), added lane by lane the way ggml adds its four 16-lane registers, down to
    /// one register.
    unsafe fn dot<const NC: usize>(k: *const f32, q: *const f32) -> Self::F;
    /// `r[p]` from [`Lanes::dot`] for `W` positions, each reduced the rest of ggml's way;
    /// lane `p` of the result is position `p`.
    unsafe fn reduce(r: &[Self::F]) -> Self::F;
}

/// A cache element type as the passes read it.
pub(super) trait Cache: Load8 {
    /// Q and the V accumulators rounded to f16 (ggml's f16 flash attention) rather than
    /// kept in f32 (over bf16, as the tensor path).
    const HALF: bool;
}

impl Cache for f16 {
    const HALF: bool = true;
}

impl Cache for bf16 {
    const HALF: bool = false;
}

/// An accumulator as the cache type keeps it: `f32(f16(x))` over f16, `x` over bf16.
#[inline(always)]
unsafe fn round<S: Lanes, E: Cache>(x: S::F) -> S::F {
    if E::HALF {
        // SAFETY: the caller's.
        unsafe { S::round_f16(x) }
    } else {
        x
    }
}

/// One group of `G` query heads over one KV head; `hd <= MAX_HD`. Inlined into an entry
/// point that enables `S`'s CPU features.
///
/// # Safety
/// `S`'s CPU features must be available.
#[inline(always)]
pub(super) unsafe fn heads<S: Lanes, E: Cache, const G: usize>(
    q: &[f32],
    hd: usize,
    k: &[E],
    v: &[E],
    scale: f32,
    out: &mut [f32],
) {
    unsafe {
        debug_assert!(G <= MAX_GROUP && hd <= MAX_HD && q.len() == G * hd && out.len() == G * hd);
        let rr = S::regs(G);
        debug_assert!(S::W <= MAX_W && rr <= 8 && BLOCK.is_multiple_of(S::W));
        let w = S::W;
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
        let mut kf = [const { MaybeUninit::<f32>::uninit() }; MAX_W * MAX_HD];
        let mut j0 = 0;
        while j0 < len {
            let bl = (len - j0).min(BLOCK);
            let kb = &k[j0 * hd..(j0 + bl) * hd];
            // Pass 1: scores, `w` positions at a time.
            for p0 in (0..bl).step_by(w) {
                let n = (bl - p0).min(w);
                let rows = &kb[p0 * hd..(p0 + n) * hd];
                // In a decode step the cache is cold: ask now for these positions' V rows
                // (pass 3) and for K rows 32 positions ahead (at the start, all up to
                // there), so that their loads find them.
                let at = (j0 + p0) * hd;
                prefetch(&v[at..at + n * hd]);
                let from = if at == 0 { w * hd } else { at + 32 * hd };
                prefetch(&k[from.min(k.len())..(at + (32 + w) * hd).min(k.len())]);
                match np / LANES {
                    0 => sc.iter_mut().for_each(|s| s[p0..p0 + w].fill(0.0)),
                    1 => scores::<S, E, G, 1>(rows, hd, &mut kf, &qf, &mut sc, p0),
                    2 => scores::<S, E, G, 2>(rows, hd, &mut kf, &qf, &mut sc, p0),
                    3 => scores::<S, E, G, 3>(rows, hd, &mut kf, &qf, &mut sc, p0),
                    _ => scores::<S, E, G, 4>(rows, hd, &mut kf, &qf, &mut sc, p0),
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
            let sv = S::splat(scale);
            let one = S::splat(1.0);
            let nc = bl.div_ceil(w) * w;
            for h in 0..G {
                let s = &mut sc[h];
                for c in (0..nc).step_by(w) {
                    let p = s[c..].as_mut_ptr();
                    S::store(p, S::mul(S::load(p), sv));
                }
                // Bit `j % w` of word `j / w`: the maximum grew at position `j`.
                let mut grew = [0u32; BLOCK / 8];
                let mut mh = m[h];
                for j in 0..bl {
                    let x = s[j];
                    if x > mh {
                        s[j] = mh - x;
                        mh = x;
                        grew[j / w] |= 1 << (j % w);
                    } else {
                        s[j] = x - mh;
                    }
                }
                m[h] = mh;
                S::exp(&mut s[..nc]);
                for c in (0..nc).step_by(w) {
                    let g = grew[c / w];
                    let e = S::load(s[c..].as_ptr());
                    S::store(ms[h][c..].as_mut_ptr(), S::select(g, one, e));
                    S::store(s[c..].as_mut_ptr(), S::select(g, e, one));
                }
            }
            // Pass 3: V, `rr` registers of dimensions at a time; only a block that runs
            // past the head's end reads partial registers.
            let vb = &v[j0 * hd..(j0 + bl) * hd];
            for cb in (0..hd).step_by(rr * w) {
                let args = (vb, hd, bl, cb, &ms, &sc);
                if cb + rr * w <= hd {
                    v_block::<S, E, G, true>(args, &mut acc, &mut sum);
                } else {
                    v_block::<S, E, G, false>(args, &mut acc, &mut sum);
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

/// One column block of pass 3: `rr` registers of each head's accumulators from `cb`,
/// over the `bl` V rows of `vb` with the weights `ms` (rescale) and `sc` (add), and the
/// sums of weights in the first block. `FULL`: every register lies inside the head.
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn v_block<S: Lanes, E: Cache, const G: usize, const FULL: bool>(
    (vb, hd, bl, cb, ms, sc): (
        &[E],
        usize,
        usize,
        usize,
        &[[f32; BLOCK]; G],
        &[[f32; BLOCK]; G],
    ),
    acc: &mut [[f32; MAX_HD]; G],
    sum: &mut [f32; G],
) {
    unsafe {
        let (w, rr) = (S::W, S::regs(G));
        let mut cnt = [w; 8];
        if !FULL {
            for (r, c) in cnt.iter_mut().enumerate().take(rr) {
                *c = hd.saturating_sub(cb + w * r).min(w);
            }
        }
        let mut a = [[S::zero(); 8]; G];
        for h in 0..G {
            for r in 0..rr {
                a[h][r] = S::load(acc[h][cb + w * r..].as_ptr());
            }
        }
        let with_sum = cb == 0;
        for j in 0..bl {
            let row = vb.as_ptr().wrapping_add(j * hd + cb);
            let mut ev = [S::zero(); MAX_GROUP];
            for h in 0..G {
                let wt = ms[h][j];
                let e = sc[h][j];
                if wt != 1.0 {
                    let wv = S::splat(wt);
                    for ar in a[h].iter_mut().take(rr) {
                        *ar = round::<S, E>(S::mul(*ar, wv));
                    }
                }
                ev[h] = S::splat(e);
                if with_sum {
                    sum[h] = sum[h].mul_add(wt, e);
                }
            }
            // One V register at a time, into every head.
            for r in 0..rr {
                let x = S::load_e(row.wrapping_add(w * r), if FULL { w } else { cnt[r] });
                for h in 0..G {
                    a[h][r] = round::<S, E>(S::fmadd(x, ev[h], a[h][r]));
                }
            }
        }
        for h in 0..G {
            for r in 0..rr {
                S::store(acc[h][cb + w * r..].as_mut_ptr(), a[h][r]);
            }
        }
    }
}

/// The scores of up to `W` positions (`rows`, `hd` apart; their first `64 * NC` values
/// converted into `kf`, the rest added by the caller), for each head, into
/// `sc[h][p0..p0 + W]`.
#[inline(always)]
unsafe fn scores<S: Lanes, E: Cache, const G: usize, const NC: usize>(
    rows: &[E],
    hd: usize,
    kf: &mut [MaybeUninit<f32>; MAX_W * MAX_HD],
    qf: &[[f32; MAX_HD]; G],
    sc: &mut [[f32; BLOCK]; G],
    p0: usize,
) {
    const { assert!(NC * LANES <= MAX_HD) };
    let w = NC * LANES;
    assert!(w <= hd && rows.len() <= S::W * hd && p0 + S::W <= BLOCK);
    for (p, row) in rows.chunks_exact(hd).enumerate() {
        for c in 0..w / S::W {
            // SAFETY: `S::W * c + S::W <= w <= hd`; `p < S::W <= MAX_W`, so
            // `p * w + S::W * (c + 1) <= kf.len()`.
            unsafe {
                let x = S::load_e(row.as_ptr().add(S::W * c), S::W);
                S::store(kf.as_mut_ptr().add(p * w + S::W * c).cast(), x);
            }
        }
    }
    let n = rows.len() / hd;
    for h in 0..G {
        let mut r = [unsafe { S::zero() }; MAX_W];
        // A loop of constant length (unrolled, `r` stays in registers).
        for (p, rp) in r.iter_mut().enumerate().take(S::W) {
            if p >= n {
                break;
            }
            // SAFETY: `p * w + w <= kf.len()`, written above; `w <= MAX_HD`.
            *rp = unsafe { S::dot::<NC>(kf.as_ptr().add(p * w).cast(), qf[h].as_ptr()) };
        }
        // SAFETY: `p0 + W <= BLOCK`.
        unsafe { S::store(sc[h].as_mut_ptr().add(p0), S::reduce(&r[..S::W])) };
    }
}

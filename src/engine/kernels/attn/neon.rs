//! NEON (aarch64) element steps of the f16 and bf16 attention loop and the q8_0-cache
//! kernel, each equal bit for bit to the portable one it replaces (tested under qemu,
//! see `scripts/arm/test.sh`; not timed on ARM hardware here):
//!
//! - the score `q · k` in the 64 lanes of ggml's AVX-512 `ggml_vec_dot_f16` (sixteen
//!   `float32x4_t`, lane `i % 64` by fused multiply-add), reduced in its fixed tree,
//!   the leftovers in f64 as the portable `tail` (f16 or bf16 K, [`Widen8`]);
//! - `acc = A(fma(v, w, acc))` and `acc = A(acc * w)` eight values at a time, `A` f16
//!   over an f16 cache and f32 over bf16 ([`Narrow8`]);
//! - the q8_0 score in eight i32 lanes of four products per block (`sdot` or `smull`,
//!   as the Q8_0 matmul's NEON kernels), one fused multiply-add per lane and block, then
//!   `hsum8`; the V step a chunk at a time, every head's accumulators in registers.
//!
//! f16 <-> f32 conversions are `fcvtl`/`fcvtn` (base ARMv8; inline assembly, as the
//! f16 vector types are not stable in Rust): exact widening, and narrowing rounded to
//! nearest-even like `half::f16::from_f32` (Linux and macOS run with the default
//! FPCR: IEEE half precision, no flush to zero). `expf` stays the C library's, called
//! per position as the portable loop does.
//!
//! Must not depend on anything outside `kernels`.

use std::arch::aarch64::*;

use half::{bf16, f16};

use super::q8::{Quantized, VChunk, BLOCK, MAX_HD};
use super::{tail, LANES};
use crate::engine::kernels::quant::{hsum8, lanes_sdot, lanes_smull};

/// Eight f16 values from `p`, widened to two f32 vectors (values 0-3, 4-7).
///
/// # Safety
/// `p` is valid for reading eight f16 values.
#[inline(always)]
unsafe fn load8(p: *const f16) -> (float32x4_t, float32x4_t) {
    unsafe {
        let raw = vld1q_u16(p as *const u16);
        let (lo, hi): (float32x4_t, float32x4_t);
        // SAFETY: register-only base ARMv8 instructions.
        std::arch::asm!(
            "fcvtl {lo:v}.4s, {x:v}.4h",
            "fcvtl2 {hi:v}.4s, {x:v}.8h",
            x = in(vreg) raw,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
        (lo, hi)
    }
}

/// A type the NEON steps read eight values of at a time, widened to f32 exactly.
pub(super) trait Widen8: super::Elem {
    /// # Safety
    /// `p` is valid for reading eight values.
    unsafe fn widen8(p: *const Self) -> (float32x4_t, float32x4_t);
}

impl Widen8 for f16 {
    #[inline(always)]
    unsafe fn widen8(p: *const Self) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller's.
        unsafe { load8(p) }
    }
}

impl Widen8 for bf16 {
    #[inline(always)]
    unsafe fn widen8(p: *const Self) -> (float32x4_t, float32x4_t) {
        // A bf16 is the upper half of the f32 of the same value.
        // SAFETY: the caller's.
        unsafe {
            let raw = vld1q_u16(p as *const u16);
            (
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(raw))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(raw)),
            )
        }
    }
}

impl Widen8 for f32 {
    #[inline(always)]
    unsafe fn widen8(p: *const Self) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller's.
        unsafe { (vld1q_f32(p), vld1q_f32(p.add(4))) }
    }
}

/// Two f32 vectors rounded to eight f16 values at `p`.
///
/// # Safety
/// `p` is valid for writing eight f16 values.
#[inline(always)]
unsafe fn store8(p: *mut f16, lo: float32x4_t, hi: float32x4_t) {
    unsafe {
        let h: uint16x8_t;
        // SAFETY: register-only base ARMv8 instructions; `h` is a fresh output register.
        std::arch::asm!(
            "fcvtn {h:v}.4h, {lo:v}.4s",
            "fcvtn2 {h:v}.8h, {hi:v}.4s",
            lo = in(vreg) lo,
            hi = in(vreg) hi,
            h = out(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
        vst1q_u16(p as *mut u16, h);
    }
}

/// The portable `dot` (ggml's AVX-512 f16 dot product) with NEON, for an f16 or bf16
/// cache row against Q rounded to f16 (over f16) or as it is (over bf16).
///
/// # Safety
/// `q` and `k` have equal lengths.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot<Q: Widen8, E: Widen8>(q: &[Q], k: &[E]) -> f32 {
    unsafe {
        debug_assert_eq!(q.len(), k.len());
        let n = q.len();
        let np = n / LANES * LANES;
        // acc[a] holds lanes 4a..4a+4.
        let mut acc = [vdupq_n_f32(0.0); LANES / 4];
        let mut i = 0;
        while i < np {
            for h in 0..LANES / 8 {
                let (k0, k1) = E::widen8(k.as_ptr().add(i + 8 * h));
                let (q0, q1) = Q::widen8(q.as_ptr().add(i + 8 * h));
                acc[2 * h] = vfmaq_f32(acc[2 * h], k0, q0);
                acc[2 * h + 1] = vfmaq_f32(acc[2 * h + 1], k1, q1);
            }
            i += LANES;
        }
        // Lanes 4v..4v+4 of the 16-lane register r = (r0 + r2) + (r1 + r3).
        let r: [float32x4_t; 4] = std::array::from_fn(|v| {
            vaddq_f32(
                vaddq_f32(acc[v], acc[8 + v]),
                vaddq_f32(acc[4 + v], acc[12 + v]),
            )
        });
        // `reduce16`: t = hi + lo (lanes 0-3: r[2] + r[0], 4-7: r[3] + r[1]);
        // u = t[4..8] + t[0..4]; (u0 + u2) + (u1 + u3).
        let (t0, t1) = (vaddq_f32(r[2], r[0]), vaddq_f32(r[3], r[1]));
        let u = vaddq_f32(t1, t0);
        let w = vadd_f32(vget_low_f32(u), vget_high_f32(u));
        let s = vget_lane_f32::<0>(w) + vget_lane_f32::<1>(w);
        if np == n {
            return s;
        }
        tail(s, q, k, np)
    }
}

/// An accumulator type the NEON steps write eight values of at a time (f16 rounded to
/// nearest-even, f32 as it is).
pub(super) trait Narrow8: Widen8 {
    /// # Safety
    /// `p` is valid for writing eight values.
    unsafe fn narrow8(p: *mut Self, lo: float32x4_t, hi: float32x4_t);
}

impl Narrow8 for f16 {
    #[inline(always)]
    unsafe fn narrow8(p: *mut Self, lo: float32x4_t, hi: float32x4_t) {
        // SAFETY: the caller's.
        unsafe { store8(p, lo, hi) }
    }
}

impl Narrow8 for f32 {
    #[inline(always)]
    unsafe fn narrow8(p: *mut Self, lo: float32x4_t, hi: float32x4_t) {
        // SAFETY: the caller's.
        unsafe {
            vst1q_f32(p, lo);
            vst1q_f32(p.add(4), hi);
        }
    }
}

/// The portable `mad_h` / `mad_ref`: `acc = A(fma(v, w, f32(acc)))` (f16 accumulators
/// over an f16 cache, f32 over bf16).
///
/// # Safety
/// `acc` and `v` have equal lengths.
#[target_feature(enable = "neon")]
pub(super) unsafe fn mad<A: Narrow8, E: Widen8>(acc: &mut [A], v: &[E], w: f32) {
    unsafe {
        debug_assert_eq!(acc.len(), v.len());
        let n8 = acc.len() / 8 * 8;
        let wv = vdupq_n_f32(w);
        let mut i = 0;
        while i < n8 {
            let (x0, x1) = E::widen8(v.as_ptr().add(i));
            let p = acc.as_mut_ptr().add(i);
            let (a0, a1) = A::widen8(p);
            A::narrow8(p, vfmaq_f32(a0, x0, wv), vfmaq_f32(a1, x1, wv));
            i += 8;
        }
        for i in n8..acc.len() {
            acc[i] = A::from_f32(v[i].to_f32().mul_add(w, acc[i].to_f32()));
        }
    }
}

/// The portable `scale_h` / `scale_ref`: `acc = A(f32(acc) * w)`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn scale<A: Narrow8>(acc: &mut [A], w: f32) {
    unsafe {
        let n8 = acc.len() / 8 * 8;
        let wv = vdupq_n_f32(w);
        let mut i = 0;
        while i < n8 {
            let p = acc.as_mut_ptr().add(i);
            let (a0, a1) = A::widen8(p);
            A::narrow8(p, vmulq_f32(a0, wv), vmulq_f32(a1, wv));
            i += 8;
        }
        for a in &mut acc[n8..] {
            *a = A::from_f32(a.to_f32() * w);
        }
    }
}

macro_rules! q8_dots {
    ($name:ident, $feat:literal, $lanes:ident) => {
        /// The q8_0 kernel's `dots_q8`: one cached K row (`k` bytes offset by 128,
        /// `kd` its block scales) against the first `g` heads of `qz`.
        ///
        /// # Safety
        /// The CPU has the enabled features; `k.len() == 32 * kd.len()` and every head
        /// of `qz` holds that many values and scales.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn $name(
            k: &[u8],
            kd: &[f16],
            qz: &Quantized,
            g: usize,
            out: &mut [f32; 4],
        ) {
            unsafe {
                let zero = vdupq_n_f32(0.0);
                let mut l = [(zero, zero); 4];
                let flip = vdupq_n_u8(0x80);
                for (b, &kdb) in kd.iter().enumerate() {
                    // `byte - 128` as a signed byte is `byte ^ 0x80`.
                    let kp = k.as_ptr().add(b * BLOCK);
                    let k0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(kp), flip));
                    let k1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(kp.add(16)), flip));
                    let dk = kdb.to_f32();
                    for h in 0..g {
                        let qp = qz.q[h].as_ptr().add(b * BLOCK);
                        let s0 = $lanes(k0, vld1q_s8(qp));
                        let s1 = $lanes(k1, vld1q_s8(qp.add(16)));
                        let d = vdupq_n_f32(dk * qz.d[h][b]);
                        // acc + s * d with one rounding, as `d.mul_add(s, acc)`.
                        l[h].0 = vfmaq_f32(l[h].0, vcvtq_f32_s32(s0), d);
                        l[h].1 = vfmaq_f32(l[h].1, vcvtq_f32_s32(s1), d);
                    }
                }
                for h in 0..g {
                    let mut v = [0f32; 8];
                    vst1q_f32(v.as_mut_ptr(), l[h].0);
                    vst1q_f32(v.as_mut_ptr().add(4), l[h].1);
                    out[h] = hsum8(v);
                }
            }
        }
    };
}

q8_dots!(dots_q8_sdot, "neon,dotprod", lanes_sdot);
q8_dots!(dots_q8_smull, "neon", lanes_smull);

/// The q8_0 kernel's V step ([`super::q8::VChunk`]) with every head's accumulators of a
/// column block held in registers while the chunk's rows stream by, each row's bytes
/// dequantized once (`f32(d) * (x - 128)`, exact) and added into each head
/// (`acc = fma(v, vs, acc * ms)`, the multiply skipped where `ms` is 1): per accumulator
/// the portable steps in the portable order.
///
/// # Safety
/// The chunk's shapes are those `attend_with` checked (`hd` a multiple of 32, at most
/// 256; `g` at most 4).
#[target_feature(enable = "neon")]
pub(super) unsafe fn v_chunk_q8(c: VChunk<'_>, acc: &mut [[f32; MAX_HD]; 4]) {
    // SAFETY: the caller's.
    unsafe {
        match c.g {
            1 => v_blocks::<1, 8>(&c, acc),
            2 => v_blocks::<2, 8>(&c, acc),
            3 => v_blocks::<3, 8>(&c, acc),
            _ => v_blocks::<4, 4>(&c, acc),
        }
    }
}

/// [`v_chunk_q8`] for `G` heads, `R` registers of four (a whole block of 32 values or
/// half of one) per column block.
// Index loops over heads and registers read more plainly than zipped iterators here.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn v_blocks<const G: usize, const R: usize>(c: &VChunk<'_>, acc: &mut [[f32; MAX_HD]; 4]) {
    unsafe {
        let (hd, nb) = (c.hd, c.hd / BLOCK);
        let flip = vdupq_n_u8(0x80);
        for cb in (0..hd).step_by(4 * R) {
            let mut a = [[vdupq_n_f32(0.0); R]; G];
            for h in 0..G {
                for r in 0..R {
                    a[h][r] = vld1q_f32(acc[h].as_ptr().add(cb + 4 * r));
                }
            }
            for p in 0..c.n {
                for h in 0..G {
                    let ms = c.ms[h][p];
                    if ms != 1.0 {
                        for ar in a[h].iter_mut() {
                            *ar = vmulq_n_f32(*ar, ms);
                        }
                    }
                }
                let d = vdupq_n_f32(c.d[p * nb + cb / BLOCK].to_f32());
                let row = c.v.as_ptr().add(p * hd + cb);
                // Sixteen bytes at a time: `byte - 128` as a signed byte is `byte ^ 0x80`.
                for r16 in 0..R / 4 {
                    let v = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(row.add(16 * r16)), flip));
                    let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
                    let parts = [
                        vmovl_s16(vget_low_s16(lo)),
                        vmovl_high_s16(lo),
                        vmovl_s16(vget_low_s16(hi)),
                        vmovl_high_s16(hi),
                    ];
                    for (i, part) in parts.into_iter().enumerate() {
                        let x = vmulq_f32(d, vcvtq_f32_s32(part));
                        let r = 4 * r16 + i;
                        for h in 0..G {
                            a[h][r] = vfmaq_n_f32(a[h][r], x, c.vs[h][p]);
                        }
                    }
                }
            }
            for h in 0..G {
                for r in 0..R {
                    vst1q_f32(acc[h].as_mut_ptr().add(cb + 4 * r), a[h][r]);
                }
            }
        }
    }
}

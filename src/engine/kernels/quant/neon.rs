//! NEON kernels (aarch64) for the Q4_0/Q4_1/Q8_0 dot products against [`QActs`]
//! rows, and the Q8_0/Q8_1 activation quantizer. They form every sum in exactly the order of the portable reference
//! [`QWeight::dot_lanes`]: eight f32 lanes held as two `float32x4_t` (lane i takes
//! block elements 4i..4i+3, so lanes 0-3 are the block's first 16 bytes and lanes 4-7
//! its last 16), one fused multiply-add per block per lane, Q4_1's `m * s` in a
//! separate scalar, then the same horizontal sum. The kernels are tiles of `C` weight
//! columns by `R` activation rows (a block unpacked once for all rows), which the
//! driver in `qweight.rs` runs four rows by two columns, or one row by eight. Integer block sums are exact in any
//! order, so the results are bit-identical to the portable path (tested under qemu;
//! see `scripts/arm/test.sh`).
//!
//! Two levels, picked at run time by [`super::isa`]: [`Isa::NeonDot`] uses `sdot`
//! (the `dotprod` extension of Apple M1 and later and most ARMv8.2+
//! cores); [`Isa::Neon`] widens with `smull` and pairwise-adds, for any ARMv8 core.
//!
//! [`QActs`]: super::QActs

use super::{hsum8, Isa, Kind, QWeight, Row, QK};
use half::f16;
use std::arch::aarch64::*;

/// Per-lane sums of four consecutive products of two 16-byte halves with `sdot`
/// (inline assembly: `vdotq_s32` is still unstable in std, issue 117224).
///
/// # Safety
/// The CPU has `dotprod`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(in crate::engine::kernels) unsafe fn lanes_sdot(w: int8x16_t, y: int8x16_t) -> int32x4_t {
    unsafe {
        let mut acc = vdupq_n_s32(0);
        // SAFETY: register-only instruction, available per this function's contract.
        std::arch::asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {y:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            y = in(vreg) y,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }
}

/// The same sums without `dotprod`: 16-bit products (|w·y| <= 128·127 fits), pairs
/// widened to 32 bits, then neighbouring pairs added.
#[inline]
#[target_feature(enable = "neon")]
pub(in crate::engine::kernels) fn lanes_smull(w: int8x16_t, y: int8x16_t) -> int32x4_t {
    let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(y)));
    let hi = vpaddlq_s16(vmull_high_s8(w, y));
    vpaddq_s32(lo, hi)
}

macro_rules! neon_tile {
    ($name:ident, $feat:literal, $lanes:ident) => {
        impl QWeight {
            /// Weight rows `c..c + C` against `R` activation rows; `KIND` 0 = Q4_0,
            /// 1 = Q4_1, 2 = Q8_0 (must match `self.kind`). A weight block is unpacked
            /// once for the `R` rows; the `C * R` sums are independent chains, each
            /// formed in the order of [`QWeight::dot_lanes`].
            ///
            /// # Safety
            /// The CPU has the enabled features; `c + C <= n`; every row has `k` values.
            #[target_feature(enable = $feat)]
            unsafe fn $name<const KIND: u8, const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [Row<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    let nbk = self.k / QK;
                    let zero = vdupq_n_f32(0.0);
                    // Lanes 0-3 and 4-7 of each column and row, and Q4_1's `m * s` sums.
                    let mut acc = [[(zero, zero); R]; C];
                    let mut summs = [[0f32; R]; C];
                    let low4 = vdupq_n_u8(0x0F);
                    let eight = vdupq_n_s8(8);
                    for b in 0..nbk {
                        for j in 0..C {
                            let wb = (c + j) * nbk + b;
                            let (w0, w1) = if KIND == 2 {
                                let p = self.qs.as_ptr().add(wb * QK) as *const i8;
                                (vld1q_s8(p), vld1q_s8(p.add(16)))
                            } else {
                                let q = vld1q_u8(self.qs.as_ptr().add(wb * 16));
                                let lo = vreinterpretq_s8_u8(vandq_u8(q, low4));
                                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
                                if KIND == 0 {
                                    (vsubq_s8(lo, eight), vsubq_s8(hi, eight))
                                } else {
                                    (lo, hi)
                                }
                            };
                            let at = self.sc(c + j, b);
                            let dw = *self.d.get_unchecked(at);
                            for r in 0..R {
                                let row = rows.get_unchecked(r);
                                let yp = row.qs.as_ptr().add(b * QK);
                                let s0 = $lanes(w0, vld1q_s8(yp));
                                let s1 = $lanes(w1, vld1q_s8(yp.add(16)));
                                let dd = vdupq_n_f32(dw * *row.d.get_unchecked(b));
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                // acc + s * dd with one rounding, as `dd.mul_add(s, acc)`.
                                a.0 = vfmaq_f32(a.0, vcvtq_f32_s32(s0), dd);
                                a.1 = vfmaq_f32(a.1, vcvtq_f32_s32(s1), dd);
                                if KIND == 1 {
                                    let sm = summs.get_unchecked_mut(j).get_unchecked_mut(r);
                                    *sm = self
                                        .m
                                        .get_unchecked(at)
                                        .mul_add(*row.s.get_unchecked(b), *sm);
                                }
                            }
                        }
                    }
                    let mut out = [[0f32; R]; C];
                    for j in 0..C {
                        for r in 0..R {
                            let mut l = [0f32; 8];
                            vst1q_f32(l.as_mut_ptr(), acc[j][r].0);
                            vst1q_f32(l.as_mut_ptr().add(4), acc[j][r].1);
                            out[j][r] = hsum8(l) + summs[j][r];
                        }
                    }
                    out
                }
            }
        }
    };
}

neon_tile!(tile_sdot, "neon,dotprod", lanes_sdot);
neon_tile!(tile_smull, "neon", lanes_smull);

impl QWeight {
    /// Weight rows `c..c + C` against `R` rows at a NEON level; other levels take the
    /// portable path.
    #[inline]
    pub(super) fn tile_neon<const R: usize, const C: usize>(
        &self,
        isa: Isa,
        c: usize,
        rows: [Row<'_>; R],
    ) -> [[f32; R]; C] {
        assert!(c + C <= self.n);
        for r in &rows {
            assert!(r.qs.len() == self.k && r.d.len() == self.k / QK && r.s.len() == r.d.len());
        }
        // SAFETY: `isa` is at most `isa()` (checked in `matmul_into_isa`), so NeonDot
        // means the CPU has dotprod; NEON itself is baseline on aarch64; shapes above.
        unsafe {
            match (isa, self.kind) {
                (Isa::NeonDot, Kind::Q4_0) => self.tile_sdot::<0, R, C>(c, rows),
                (Isa::NeonDot, Kind::Q4_1) => self.tile_sdot::<1, R, C>(c, rows),
                (Isa::NeonDot, Kind::Q8_0) => self.tile_sdot::<2, R, C>(c, rows),
                (Isa::Neon, Kind::Q4_0) => self.tile_smull::<0, R, C>(c, rows),
                (Isa::Neon, Kind::Q4_1) => self.tile_smull::<1, R, C>(c, rows),
                (Isa::Neon, Kind::Q8_0) => self.tile_smull::<2, R, C>(c, rows),
                _ => std::array::from_fn(|j| rows.map(|r| self.dot_lanes(c + j, r))),
            }
        }
    }
}

/// `quantize_scalar` with NEON: the largest magnitude (NaN ignored, as `f32::max`
/// does), products by one factor, round half to even, truncation to i8, exact integer
/// sums and the same two f16 roundings — so equal to it bit for bit.
///
/// # Safety
/// `x` is whole blocks; `d`, `s` hold a value and `qs` 32 per block.
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_neon(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [i8]) {
    unsafe {
        let nb = x.len() / QK;
        assert!(d.len() >= nb && s.len() >= nb && qs.len() >= nb * QK);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK);
            let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
            let mut m = vdupq_n_f32(0.0);
            for vi in v {
                m = vmaxnmq_f32(m, vabsq_f32(vi));
            }
            let amax = vmaxnmvq_f32(m);
            let dv = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let idv = vdupq_n_f32(id);
            let q: [int32x4_t; 8] = v.map(|vi| vcvtnq_s32_f32(vmulq_f32(vi, idv)));
            let mut sum = vdupq_n_s32(0);
            for qi in q {
                sum = vaddq_s32(sum, qi);
            }
            let total = vaddvq_s32(sum);
            let out = qs.as_mut_ptr().add(b * QK);
            for h in 0..2 {
                let q = &q[4 * h..4 * h + 4];
                let lo = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
                let hi = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
                vst1q_s8(out.add(16 * h), vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
            }
            d[b] = f16::from_f32(dv).to_f32();
            s[b] = f16::from_f32(dv * total as f32).to_f32();
        }
    }
}

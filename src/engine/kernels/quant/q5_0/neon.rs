//! NEON (aarch64) tiles for Q5_0 against Q8_0 activations, bit-identical to
//! [`Q5Weight::dot_lanes`] (tested under qemu, see `scripts/arm/test.sh`; not timed,
//! not run on Apple hardware): eight f32 lanes as two `float32x4_t` (lane `i` takes
//! block elements `4i..4i+3`), one fused multiply-add per lane and block, then
//! `hsum_float_8`. A block is unpacked once for the `R` rows: nibbles, the fifth bit
//! spread to bytes by a bit test against `1, 2, 4, .., 128`, then `- 16`. Two levels as
//! in `quant/neon.rs`, whose four-lane dots these reuse (`|w| <= 16`, so `smull` fits).
//!
//! Must not depend on anything outside `quant`.

use std::arch::aarch64::*;

use super::super::neon::{lanes_sdot, lanes_smull};
use super::super::{hsum8, Row, QK};
use super::Q5Weight;

macro_rules! q5_neon {
    ($name:ident, $feat:literal, $lanes:ident) => {
        impl Q5Weight {
            /// Columns `c..c + C` against `R` rows.
            ///
            /// # Safety
            /// The CPU has the enabled features; `c + C <= n`; every row has `k` values.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [Row<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    let nbk = self.k / QK;
                    let zero = vdupq_n_f32(0.0);
                    let mut acc = [[(zero, zero); R]; C];
                    let low = vdupq_n_u8(0x0F);
                    let fifth = vdupq_n_u8(0x10);
                    let sixteen = vdupq_n_s8(16);
                    // Byte i of each half tests bit i % 8 of its byte of `qh`.
                    let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
                    for b in 0..nbk {
                        for j in 0..C {
                            let wb = (c + j) * nbk + b;
                            let q = vld1q_u8(self.qs.as_ptr().add(wb * 16));
                            let h = *self.qh.get_unchecked(wb);
                            let spread = |lo: u32| {
                                let bytes =
                                    vcombine_u8(vdup_n_u8(lo as u8), vdup_n_u8((lo >> 8) as u8));
                                vandq_u8(vtstq_u8(bytes, bit), fifth)
                            };
                            let w0 = vorrq_u8(vandq_u8(q, low), spread(h));
                            let w1 = vorrq_u8(vshrq_n_u8::<4>(q), spread(h >> 16));
                            let w0 = vsubq_s8(vreinterpretq_s8_u8(w0), sixteen);
                            let w1 = vsubq_s8(vreinterpretq_s8_u8(w1), sixteen);
                            let dw = *self.d.get_unchecked(wb);
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
                            }
                        }
                    }
                    let mut out = [[0f32; R]; C];
                    for j in 0..C {
                        for r in 0..R {
                            let mut l = [0f32; 8];
                            vst1q_f32(l.as_mut_ptr(), acc[j][r].0);
                            vst1q_f32(l.as_mut_ptr().add(4), acc[j][r].1);
                            out[j][r] = hsum8(l);
                        }
                    }
                    out
                }
            }
        }
    };
}

q5_neon!(tile_sdot, "neon,dotprod", lanes_sdot);
q5_neon!(tile_smull, "neon", lanes_smull);

//! NEON (aarch64) tiles for the K-quants and the Q8_K activation quantizer, each
//! bit-identical to the portable reference in `kquant.rs` (tested under qemu, see
//! `scripts/arm/test.sh`; not timed, not run on Apple hardware).
//!
//! Integer sums are exact in any order, so they are grouped as suits the registers;
//! the float steps are the reference's, one for one:
//!
//! - Both types: eight i32 lanes held as two `int32x4_t` (lane `u` takes elements
//!   `4u..4u+3` of every 32), so one four-lane dot per 16 weights gives exactly the
//!   reference's lanes; one FMA per lane and super-block; `hsum_float_8`.
//! - Q4_K: the mins as one `float32x4_t` (lane `u`: sub-blocks `2u`, `2u + 1`), one FMA
//!   per super-block, added as `(m0 + m2) + (m1 + m3)`.
//! - Q6_K: the `-32` offset per lane through the activation sums.
//!
//! Two levels, as the Q4_0/Q4_1/Q8_0 kernels in `quant/neon.rs` (whose four-lane dots
//! these reuse): `sdot` ([`Isa::NeonDot`]) or `smull` + pairwise adds ([`Isa::Neon`]).
//! The codes fit signed bytes (Q4_K 0..15, Q6_K 0..63), so both are plain i8 · i8 dots.
//!
//! Must not depend on anything outside `quant`.

use std::arch::aarch64::*;

use super::super::hsum8;
use super::super::neon::{lanes_sdot, lanes_smull};
use super::{signed_max, KRow, KWeight, QK_K};

macro_rules! k_neon {
    ($q4:ident, $q6:ident, $feat:literal, $lanes:ident) => {
        impl KWeight {
            /// Q4_K columns `c..c + C` against `R` rows.
            ///
            /// # Safety
            /// The CPU has the enabled features; `c + C <= n`; every row has `k` values.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q4<const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [KRow<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    let nb = self.k / QK_K;
                    let m4 = vdupq_n_u8(0x0F);
                    let zero = vdupq_n_f32(0.0);
                    // Lanes 0-3 and 4-7 of each column and row, and the four mins lanes.
                    let mut acc = [[(zero, zero); R]; C];
                    let mut accm = [[zero; R]; C];
                    for b in 0..nb {
                        for j in 0..C {
                            let wb = (c + j) * nb + b;
                            let q = self.q.as_ptr().add(wb * 128);
                            let sc = self.sc.as_ptr().add(wb * 16);
                            let mut s0 = [vdupq_n_s32(0); R];
                            let mut s1 = [vdupq_n_s32(0); R];
                            for ch in 0..4 {
                                let b0 = vld1q_u8(q.add(32 * ch));
                                let b1 = vld1q_u8(q.add(32 * ch + 16));
                                // Sub-block 2ch: low nibbles; 2ch + 1: high nibbles.
                                let halves = [
                                    (vandq_u8(b0, m4), vandq_u8(b1, m4)),
                                    (vshrq_n_u8::<4>(b0), vshrq_n_u8::<4>(b1)),
                                ];
                                for (hi, (w0, w1)) in halves.into_iter().enumerate() {
                                    let (w0, w1) =
                                        (vreinterpretq_s8_u8(w0), vreinterpretq_s8_u8(w1));
                                    let s = *sc.add(2 * ch + hi) as i32;
                                    for r in 0..R {
                                        let yp = rows
                                            .get_unchecked(r)
                                            .qs
                                            .as_ptr()
                                            .add(b * QK_K + 64 * ch + 32 * hi);
                                        s0[r] = vmlaq_n_s32(s0[r], $lanes(w0, vld1q_s8(yp)), s);
                                        s1[r] =
                                            vmlaq_n_s32(s1[r], $lanes(w1, vld1q_s8(yp.add(16))), s);
                                    }
                                }
                            }
                            let mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(sc.add(8))));
                            let (dw, dmin) =
                                (*self.d.get_unchecked(wb), *self.dmin.get_unchecked(wb));
                            for r in 0..R {
                                let row = rows.get_unchecked(r);
                                let bs = row.bsums.as_ptr().add(b * 16);
                                // Sums of the two 16-value halves of each sub-block (|.| <= 4096),
                                // then lane u: min[2u] * q8s[2u] + min[2u + 1] * q8s[2u + 1].
                                let q8s = vpaddq_s16(vld1q_s16(bs), vld1q_s16(bs.add(8)));
                                let prod = vpaddq_s32(
                                    vmull_s16(vget_low_s16(q8s), vget_low_s16(mins)),
                                    vmull_high_s16(q8s, mins),
                                );
                                let dy = *row.d.get_unchecked(b);
                                let am = accm.get_unchecked_mut(j).get_unchecked_mut(r);
                                *am = vfmaq_f32(*am, vcvtq_f32_s32(prod), vdupq_n_f32(-dy * dmin));
                                let dd = vdupq_n_f32(dy * dw);
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                // acc + s * dd with one rounding, as `dd.mul_add(s, acc)`.
                                a.0 = vfmaq_f32(a.0, vcvtq_f32_s32(s0[r]), dd);
                                a.1 = vfmaq_f32(a.1, vcvtq_f32_s32(s1[r]), dd);
                            }
                        }
                    }
                    let mut out = [[0f32; R]; C];
                    for j in 0..C {
                        for r in 0..R {
                            let mut l = [0f32; 8];
                            vst1q_f32(l.as_mut_ptr(), acc[j][r].0);
                            vst1q_f32(l.as_mut_ptr().add(4), acc[j][r].1);
                            let mut m = [0f32; 4];
                            vst1q_f32(m.as_mut_ptr(), accm[j][r]);
                            out[j][r] = hsum8(l) + ((m[0] + m[2]) + (m[1] + m[3]));
                        }
                    }
                    out
                }
            }

            /// Q6_K columns `c..c + C` against `R` rows.
            ///
            /// # Safety
            /// As for the Q4_K tile.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $q6<const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [KRow<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    let nb = self.k / QK_K;
                    let m15 = vdupq_n_u8(15);
                    let zero = vdupq_n_f32(0.0);
                    // Lanes 0-3 and 4-7 of each column and row.
                    let mut acc = [[(zero, zero); R]; C];
                    for b in 0..nb {
                        for j in 0..C {
                            let wb = (c + j) * nb + b;
                            let blk = self.q.as_ptr().add(wb * 192);
                            let scp = self.sc.as_ptr().add(wb * 16) as *const i8;
                            let sc = vld1q_s8(scp);
                            let (sc_lo, sc_hi) = (vmovl_s8(vget_low_s8(sc)), vmovl_high_s8(sc));
                            let mut s0 = [vdupq_n_s32(0); R];
                            let mut s1 = [vdupq_n_s32(0); R];
                            for r in 0..R {
                                // Lane u: -32 * (bsum[2u] * sc[2u] + bsum[2u + 1] * sc[2u + 1]).
                                let bs = rows.get_unchecked(r).bsums.as_ptr().add(b * 16);
                                let (b0, b1) = (vld1q_s16(bs), vld1q_s16(bs.add(8)));
                                let o0 = vpaddq_s32(
                                    vmull_s16(vget_low_s16(b0), vget_low_s16(sc_lo)),
                                    vmull_high_s16(b0, sc_lo),
                                );
                                let o1 = vpaddq_s32(
                                    vmull_s16(vget_low_s16(b1), vget_low_s16(sc_hi)),
                                    vmull_high_s16(b1, sc_hi),
                                );
                                s0[r] = vnegq_s32(vshlq_n_s32::<5>(o0));
                                s1[r] = vnegq_s32(vshlq_n_s32::<5>(o1));
                            }
                            for h in 0..2 {
                                let ql = blk.add(64 * h);
                                let ql: [uint8x16_t; 4] =
                                    std::array::from_fn(|i| vld1q_u8(ql.add(16 * i)));
                                let qh0 = vld1q_u8(blk.add(128 + 32 * h));
                                let qh1 = vld1q_u8(blk.add(128 + 32 * h + 16));
                                for t in 0..4 {
                                    // Group g = 4h + t: low four bits from `ql` (bytes 0..31 for
                                    // t = 0, 2, bytes 32..63 for t = 1, 3; low nibble for t < 2),
                                    // bits 2t..2t+1 of `qh` as bits 4..5.
                                    let (la, lb) = if t & 1 == 0 {
                                        (ql[0], ql[1])
                                    } else {
                                        (ql[2], ql[3])
                                    };
                                    let low = |v: uint8x16_t| {
                                        if t < 2 {
                                            vandq_u8(v, m15)
                                        } else {
                                            vshrq_n_u8::<4>(v)
                                        }
                                    };
                                    let high = |v: uint8x16_t| match t {
                                        0 => vshlq_n_u8::<4>(vandq_u8(v, vdupq_n_u8(0x03))),
                                        1 => vshlq_n_u8::<2>(vandq_u8(v, vdupq_n_u8(0x0C))),
                                        2 => vandq_u8(v, vdupq_n_u8(0x30)),
                                        _ => vshrq_n_u8::<2>(vandq_u8(v, vdupq_n_u8(0xC0))),
                                    };
                                    let w0 = vreinterpretq_s8_u8(vorrq_u8(low(la), high(qh0)));
                                    let w1 = vreinterpretq_s8_u8(vorrq_u8(low(lb), high(qh1)));
                                    let g = 4 * h + t;
                                    let (sa, sb) =
                                        (*scp.add(2 * g) as i32, *scp.add(2 * g + 1) as i32);
                                    for r in 0..R {
                                        let yp = rows
                                            .get_unchecked(r)
                                            .qs
                                            .as_ptr()
                                            .add(b * QK_K + 32 * g);
                                        s0[r] = vmlaq_n_s32(s0[r], $lanes(w0, vld1q_s8(yp)), sa);
                                        s1[r] = vmlaq_n_s32(
                                            s1[r],
                                            $lanes(w1, vld1q_s8(yp.add(16))),
                                            sb,
                                        );
                                    }
                                }
                            }
                            let dx = *self.d.get_unchecked(wb);
                            for r in 0..R {
                                let dd =
                                    vdupq_n_f32(dx * *rows.get_unchecked(r).d.get_unchecked(b));
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                // acc + s * dd with one rounding, as `dd.mul_add(s, acc)`.
                                a.0 = vfmaq_f32(a.0, vcvtq_f32_s32(s0[r]), dd);
                                a.1 = vfmaq_f32(a.1, vcvtq_f32_s32(s1[r]), dd);
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

k_neon!(q4k_sdot, q6k_sdot, "neon,dotprod", lanes_sdot);
k_neon!(q4k_smull, q6k_smull, "neon", lanes_smull);

/// `quantize_k` with NEON: the largest magnitude (NaN ignored, as the reference's
/// strict `>` does), the first value of that magnitude for the sign, products by one
/// factor, round half to even, clamp at 127 — every step exact or singly rounded as in
/// the reference, so equal to it bit for bit.
///
/// # Safety
/// `x` is whole super-blocks; `d`, `qs`, `bsums` are sized for them.
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_k_neon(x: &[f32], d: &mut [f32], qs: &mut [i8], bsums: &mut [i16]) {
    unsafe {
        let nb = x.len() / QK_K;
        assert!(d.len() >= nb && qs.len() >= nb * QK_K && bsums.len() >= nb * 16);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK_K);
            let mut m = vdupq_n_f32(0.0);
            for i in 0..QK_K / 4 {
                m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(p.add(4 * i))));
            }
            let amax = vmaxnmvq_f32(m);
            let q = qs.as_mut_ptr().add(b * QK_K);
            let bs = bsums.as_mut_ptr().add(b * 16);
            if amax == 0.0 {
                std::ptr::write_bytes(q, 0, QK_K);
                std::ptr::write_bytes(bs, 0, 16);
                d[b] = 0.0;
                continue;
            }
            let iscale = -127.0 / signed_max(&x[b * QK_K..(b + 1) * QK_K], amax);
            let is = vdupq_n_f32(iscale);
            let top = vdupq_n_s32(127);
            for g in 0..16 {
                let v: [int32x4_t; 4] = std::array::from_fn(|i| {
                    let y = vmulq_f32(vld1q_f32(p.add(16 * g + 4 * i)), is);
                    vminq_s32(vcvtnq_s32_f32(y), top)
                });
                let h0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
                let h1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
                let q8 = vcombine_s8(vmovn_s16(h0), vmovn_s16(h1));
                vst1q_s8(q.add(16 * g), q8);
                *bs.add(g) = vaddlvq_s8(q8);
            }
            d[b] = 1.0 / iscale;
        }
    }
}

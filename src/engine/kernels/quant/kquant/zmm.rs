//! 512-bit VNNI kernels for Q4_K and Q6_K against several activation rows at once
//! (decode steps of a batch, prefill), in the manner of `zmm.rs`: a 512-bit register
//! holds one column's eight lanes for *two* activation rows (lanes 0..8 row `2p`,
//! lanes 8..16 row `2p + 1`), the weights are unpacked once per column and block (the
//! same bytes in both halves) and used by up to four row pairs. Q4_K takes this path
//! for two or three rows only (`KWeight::matmul_into_isa`): from four rows on, its AVX2
//! tiles measured faster.
//!
//! Per 32 values: `vpmaddubsw` (weights against the two rows' activations, exact i16
//! pairs) then `vpdpwssd` (times the sub-block scale, added to the i32 lanes). Integer
//! sums are exact in any grouping, so only the float steps must follow the reference
//! ([`KWeight::dot_ref`]), and they do, lane for lane:
//!
//! - Both types: the lanes are those of the reference (four values each per 32-value
//!   group), and each lane gets one fused multiply-add of `d_w * d_y` per super-block;
//!   [`hsum8_pair`] ends as `hsum8`. Q6_K's `-32` offset enters the lanes through the
//!   activation sums.
//! - Q4_K's mins: `vpmaddwd` of the activation sums with the mins (each twice) gives
//!   `min[k] * q8s[k]` per i32 lane; adding the neighbour lane puts the reference's mins
//!   lane `u` in lanes `2u` and `2u + 1` of each half; column `j` (of two) keeps lanes
//!   `2u + j`, so one accumulator per row pair holds both columns' mins, fused with
//!   `-dmin * d_y`; the outputs add `(m0 + m2) + (m1 + m3)` to the lanes' sum.
//!
//! So the results are bit-identical to the portable reference and the AVX2 tiles.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::thread::LocalKey;

use super::super::drive;
use super::super::pairs::Pairs;
use super::super::zmm::hsum8_pair;
use super::super::{Isa, OutPtr};
use super::{KActs, KKind, KWeight, QK_K};

/// The rows of one pass rearranged for the kernel, per super-block `b` and row pair
/// `p` (index `b * P + p`), reused between calls.
#[derive(Default)]
pub(in crate::engine::kernels::quant) struct PairScratch {
    /// The two rows' activations, 32 values of row `2p` then the same 32 of row
    /// `2p + 1`, eight times (512 bytes).
    y: Vec<i8>,
    /// The two rows' scales, each repeated eight times.
    dy: Vec<f32>,
    /// The two rows' sixteen sums of sixteen values (32 i16).
    bs: Vec<i16>,
}

thread_local! {
    static SCRATCH: RefCell<PairScratch> = RefCell::new(PairScratch::default());
}

/// How far ahead of the tile being computed its weights are prefetched, in bytes.
const PREFETCH: usize = 2048;

impl Pairs for KWeight {
    type Acts = KActs;
    type Scratch = PairScratch;

    fn rows(x: &KActs) -> usize {
        x.m
    }

    const SCRATCH: &'static LocalKey<RefCell<PairScratch>> = &SCRATCH;

    unsafe fn last_row(&self, x: &KActs, r: usize, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        // SAFETY: as for this function.
        unsafe { drive::one_row(self, Isa::Avx512Vnni, x.row(r), r, c0, c1, out, ldo) }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass<const P: usize>(
        &self,
        x: &KActs,
        rows: std::ops::Range<usize>,
        c0: usize,
        c1: usize,
        s: &mut PairScratch,
        out: OutPtr,
        ldo: usize,
    ) {
        unsafe {
            let nb = self.k / QK_K;
            let (r0, nr) = (rows.start, rows.len());
            debug_assert!(nr == 2 * P || nr == 2 * P - 1);
            if s.y.len() < nb * P * 512 {
                s.y.resize(nb * P * 512, 0);
                s.dy.resize(nb * P * 16, 0.0);
                s.bs.resize(nb * P * 32, 0);
            }
            for b in 0..nb {
                for p in 0..P {
                    let (ra, rb) = (x.row(r0 + 2 * p), x.row(r0 + (2 * p + 1).min(nr - 1)));
                    let at = b * P + p;
                    for g in 0..8 {
                        let src = b * QK_K + 32 * g;
                        let ya = _mm256_loadu_si256(ra.qs.as_ptr().add(src) as *const __m256i);
                        let yb = _mm256_loadu_si256(rb.qs.as_ptr().add(src) as *const __m256i);
                        let y = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ya), yb);
                        _mm512_storeu_si512(
                            s.y.as_mut_ptr().add(at * 512 + 64 * g) as *mut __m512i,
                            y,
                        );
                    }
                    let dy = _mm512_mask_blend_ps(
                        0xFF00,
                        _mm512_set1_ps(*ra.d.get_unchecked(b)),
                        _mm512_set1_ps(*rb.d.get_unchecked(b)),
                    );
                    _mm512_storeu_ps(s.dy.as_mut_ptr().add(at * 16), dy);
                    let ba = _mm256_loadu_si256(ra.bsums.as_ptr().add(b * 16) as *const __m256i);
                    let bb = _mm256_loadu_si256(rb.bsums.as_ptr().add(b * 16) as *const __m256i);
                    let bs = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ba), bb);
                    _mm512_storeu_si512(s.bs.as_mut_ptr().add(at * 32) as *mut __m512i, bs);
                }
            }
            let mut c = c0;
            while c < c1 {
                let cols = (c1 - c).min(2);
                match (self.kind, cols) {
                    (KKind::Q4K, 2) => self.q4k_tile::<P, 2>(c, s, out, (r0, nr), ldo),
                    (KKind::Q4K, _) => self.q4k_tile::<P, 1>(c, s, out, (r0, nr), ldo),
                    (KKind::Q6K, 2) => self.q6k_tile::<P, 2>(c, s, out, (r0, nr), ldo),
                    (KKind::Q6K, _) => self.q6k_tile::<P, 1>(c, s, out, (r0, nr), ldo),
                }
                c += cols;
            }
        }
    }
}

impl KWeight {
    /// Q6_K columns `c..c + C` for the `P` row pairs prepared in `s`.
    // Column `j` indexes several arrays (weights, sums, accumulators) at once.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q6k_tile<const P: usize, const C: usize>(
        &self,
        c: usize,
        s: &PairScratch,
        out: OutPtr,
        (r0, nr): (usize, usize),
        ldo: usize,
    ) {
        unsafe {
            let nb = self.k / QK_K;
            let m15 = _mm512_set1_epi8(15);
            let mut acc = [[_mm512_setzero_ps(); C]; P];
            for b in 0..nb {
                let mut sumi = [[_mm512_setzero_si512(); C]; P];
                // The sixteen scales as i16 in both halves, and each group's pair of them
                // (the first for lanes 0..4 of a half, the second for lanes 4..8).
                let mut sc16 = [_mm512_setzero_si512(); C];
                for j in 0..C {
                    let wb = (c + j) * nb + b;
                    let blk = self.q.as_ptr().add(wb * 192);
                    for line in 0..3 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            blk.wrapping_add(PREFETCH + 64 * line) as *const i8
                        );
                    }
                    let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                        self.sc.as_ptr().add(wb * 16) as *const __m128i
                    ));
                    sc16[j] = _mm512_broadcast_i64x4(sc);
                    // -32 * (bs[2u] * sc[2u] + bs[2u + 1] * sc[2u + 1]) per lane u.
                    let neg32 = _mm512_mullo_epi16(sc16[j], _mm512_set1_epi16(-32));
                    for (p, sp) in sumi.iter_mut().enumerate() {
                        let bs =
                            _mm512_loadu_si512(s.bs.as_ptr().add((b * P + p) * 32) as *const _);
                        sp[j] = _mm512_madd_epi16(bs, neg32);
                    }
                }
                for h in 0..2 {
                    for t in 0..4 {
                        let g = 4 * h + t;
                        // i16 lanes 0..8 of each half take scale 2g, lanes 8..16 scale 2g + 1.
                        let idx = _mm512_set_epi16(
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 17) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 16) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g + 1) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                            (2 * g) as i16,
                        );
                        for j in 0..C {
                            let wb = (c + j) * nb + b;
                            let blk = self.q.as_ptr().add(wb * 192);
                            let ql = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                                blk.add(64 * h + 32 * (t & 1)) as *const __m256i,
                            ));
                            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                                blk.add(128 + 32 * h) as *const __m256i,
                            ));
                            let lo = if t < 2 {
                                _mm512_and_si512(ql, m15)
                            } else {
                                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m15)
                            };
                            // Bits 2t..2t+1 of qh to bits 4..5.
                            let hb = match t {
                                0 => _mm512_slli_epi16::<4>(_mm512_and_si512(
                                    qh,
                                    _mm512_set1_epi8(3),
                                )),
                                1 => _mm512_slli_epi16::<2>(_mm512_and_si512(
                                    qh,
                                    _mm512_set1_epi8(12),
                                )),
                                2 => _mm512_and_si512(qh, _mm512_set1_epi8(48)),
                                _ => _mm512_srli_epi16::<2>(_mm512_and_si512(
                                    qh,
                                    _mm512_set1_epi8(-64),
                                )),
                            };
                            let qv = _mm512_or_si512(lo, hb);
                            // With the sixteen scales in i16 lanes 0..16 (and 16..32).
                            let scale = _mm512_permutexvar_epi16(idx, sc16[j]);
                            for (p, sp) in sumi.iter_mut().enumerate() {
                                let y = _mm512_loadu_si512(
                                    s.y.as_ptr().add((b * P + p) * 512 + 64 * g) as *const _,
                                );
                                let pr = _mm512_maddubs_epi16(qv, y);
                                let a = sp.get_unchecked_mut(j);
                                *a = _mm512_dpwssd_epi32(*a, pr, scale);
                            }
                        }
                    }
                }
                for j in 0..C {
                    let dx = _mm512_set1_ps(*self.d.get_unchecked((c + j) * nb + b));
                    for (p, ap) in acc.iter_mut().enumerate() {
                        let dy = _mm512_loadu_ps(s.dy.as_ptr().add((b * P + p) * 16));
                        let dd = _mm512_mul_ps(dx, dy);
                        let a = ap.get_unchecked_mut(j);
                        *a = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi[p][j]), *a);
                    }
                }
            }
            for (p, ap) in acc.iter().enumerate() {
                for (j, a) in ap.iter().enumerate() {
                    for (h, v) in hsum8_pair(*a).into_iter().enumerate() {
                        let i = 2 * p + h;
                        if i == nr {
                            break; // the duplicate of an odd pass's last row
                        }
                        out.write((r0 + i) * ldo + c + j, v);
                    }
                }
            }
        }
    }

    /// Q4_K columns `c..c + C` for the `P` row pairs prepared in `s`.
    // Column `j` indexes several arrays (weights, sums, accumulators) at once.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4k_tile<const P: usize, const C: usize>(
        &self,
        c: usize,
        s: &PairScratch,
        out: OutPtr,
        (r0, nr): (usize, usize),
        ldo: usize,
    ) {
        unsafe {
            let nb = self.k / QK_K;
            let m4 = _mm512_set1_epi8(0x0F);
            // Lanes 0..8 (row 2p) and 8..16 (row 2p + 1): the reference's eight lanes
            // of `d * Σ scale·dot`.
            let mut acc = [[_mm512_setzero_ps(); C]; P];
            // Lane 2u + j (and 8 + 2u + j): column j's lane u of the reference's mins.
            let mut accm = [_mm512_setzero_ps(); P];
            for b in 0..nb {
                let mut isum = [[_mm512_setzero_si512(); C]; P];
                for j in 0..C {
                    let wb = (c + j) * nb + b;
                    let q = self.q.as_ptr().add(wb * 128);
                    for line in 0..2 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            q.wrapping_add(PREFETCH + 64 * line) as *const i8
                        );
                    }
                    let sc = self.sc.as_ptr().add(wb * 16);
                    for ch in 0..4 {
                        let bits = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                            q.add(32 * ch) as *const __m256i
                        ));
                        let halves = [
                            (_mm512_and_si512(bits, m4), *sc.add(2 * ch)),
                            (
                                _mm512_and_si512(_mm512_srli_epi16::<4>(bits), m4),
                                *sc.add(2 * ch + 1),
                            ),
                        ];
                        for (hi, (qv, scale)) in halves.into_iter().enumerate() {
                            let scale = _mm512_set1_epi16(scale as i16);
                            let g = 2 * ch + hi;
                            for (p, sp) in isum.iter_mut().enumerate() {
                                let y = _mm512_loadu_si512(
                                    s.y.as_ptr().add((b * P + p) * 512 + 64 * g) as *const _,
                                );
                                let pr = _mm512_maddubs_epi16(qv, y);
                                let a = sp.get_unchecked_mut(j);
                                *a = _mm512_dpwssd_epi32(*a, pr, scale);
                            }
                        }
                    }
                }
                // Per column: the eight mins, each twice, as i16 (lane k of `madd` is
                // `min[k] * q8s[k]`), `d` and `-dmin`.
                let mut mins = [_mm512_setzero_si512(); C];
                let mut dw = [_mm512_setzero_ps(); C];
                let mut dmin = _mm512_setzero_ps();
                for j in 0..C {
                    let wb = (c + j) * nb + b;
                    let m = _mm_loadl_epi64(self.sc.as_ptr().add(wb * 16 + 8) as *const __m128i);
                    mins[j] = _mm512_broadcast_i64x4(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m)));
                    dw[j] = _mm512_set1_ps(*self.d.get_unchecked(wb));
                    // Column j's in lanes 2u + j (-dmin: signs are exact, so `-dmin * d_y`
                    // equals the reference's `-d_y * dmin`).
                    dmin = _mm512_mask_blend_ps(
                        0x5555 << j,
                        dmin,
                        _mm512_set1_ps(-*self.dmin.get_unchecked(wb)),
                    );
                }
                for p in 0..P {
                    let at = b * P + p;
                    let bs = _mm512_loadu_si512(s.bs.as_ptr().add(at * 32) as *const _);
                    let dy = _mm512_loadu_ps(s.dy.as_ptr().add(at * 16));
                    let mut prod = _mm512_setzero_si512();
                    for j in 0..C {
                        // Lanes 2u, 2u + 1 both min[2u] * q8s[2u] + min[2u + 1] * q8s[2u + 1]
                        // (exact); column j keeps lanes 2u + j.
                        let imin = _mm512_madd_epi16(bs, mins[j]);
                        let pj = _mm512_add_epi32(imin, _mm512_shuffle_epi32::<0xB1>(imin));
                        prod = _mm512_mask_blend_epi32(0x5555 << j, prod, pj);
                        let a = acc.get_unchecked_mut(p).get_unchecked_mut(j);
                        *a = _mm512_fmadd_ps(
                            _mm512_mul_ps(dw[j], dy),
                            _mm512_cvtepi32_ps(isum[p][j]),
                            *a,
                        );
                    }
                    let am = accm.get_unchecked_mut(p);
                    *am = _mm512_fmadd_ps(_mm512_mul_ps(dmin, dy), _mm512_cvtepi32_ps(prod), *am);
                }
            }
            for (p, ap) in acc.iter().enumerate() {
                for (j, a) in ap.iter().enumerate() {
                    let mut l = [0f32; 16];
                    _mm512_storeu_ps(l.as_mut_ptr(), accm[p]);
                    for (h, v) in hsum8_pair(*a).into_iter().enumerate() {
                        let i = 2 * p + h;
                        if i == nr {
                            break; // the duplicate of an odd pass's last row
                        }
                        let m = &l[8 * h + j..8 * h + 8];
                        out.write((r0 + i) * ldo + c + j, v + ((m[0] + m[4]) + (m[2] + m[6])));
                    }
                }
            }
        }
    }
}

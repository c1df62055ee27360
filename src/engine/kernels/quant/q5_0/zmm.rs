//! 512-bit VNNI kernels for Q5_0 against several activation rows at once, the Q4_0
//! kernel of `zmm.rs` with a fifth bit: a 512-bit register holds one column's eight
//! lanes for two activation rows (lanes 0..8 row `2p`, 8..16 row `2p + 1`); per (row
//! pair, column, block) one `vpdpbusd` of the unsigned 5-bit codes against the rows'
//! activations, started at `MAGIC_BITS - 16 * (sum of four activations)` (the `-16`
//! offset, exact), one subtraction to get exact floats, one multiply for `d_w * d_y`,
//! one fused multiply-add per lane. Every lane sees the FMAs of
//! [`Q5Weight::dot_lanes`] in its order and [`hsum8_pair`] ends as `hsum8`, so results
//! are bit-identical to the reference.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::thread::LocalKey;

use super::super::drive;
use super::super::pairs::Pairs;
use super::super::zmm::hsum8_pair;
use super::super::{Isa, OutPtr, QActs, MAGIC_BITS, QK};
use super::Q5Weight;

/// The rows of one pass rearranged for the kernel, per block `b` and row pair `p`
/// (index `b * P + p`), reused between calls.
#[derive(Default)]
pub(in crate::engine::kernels::quant) struct PairScratch {
    /// The two rows' 32 activation bytes, side by side (64 bytes).
    y: Vec<i8>,
    /// The two rows' activation scales, each repeated eight times.
    dy: Vec<f32>,
    /// `MAGIC_BITS - 16 * (sum of four activations)` per lane.
    corr: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<PairScratch> = RefCell::new(PairScratch::default());
}

/// How far ahead of the tile being computed its weights are prefetched, in bytes.
const PREFETCH: usize = 2048;

impl Pairs for Q5Weight {
    type Acts = QActs;
    type Scratch = PairScratch;

    fn rows(x: &QActs) -> usize {
        x.m
    }

    const SCRATCH: &'static LocalKey<RefCell<PairScratch>> = &SCRATCH;

    unsafe fn last_row(&self, x: &QActs, r: usize, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        // SAFETY: as for this function.
        unsafe { drive::one_row(self, Isa::Avx512Vnni, x.row(r), r, c0, c1, out, ldo) }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass<const P: usize>(
        &self,
        x: &QActs,
        rows: std::ops::Range<usize>,
        c0: usize,
        c1: usize,
        s: &mut PairScratch,
        out: OutPtr,
        ldo: usize,
    ) {
        unsafe {
            let nbk = self.k / QK;
            let (r0, nr) = (rows.start, rows.len());
            debug_assert!(nr == 2 * P || nr == 2 * P - 1);
            if s.y.len() < nbk * P * 64 {
                s.y.resize(nbk * P * 64, 0);
                s.dy.resize(nbk * P * 16, 0.0);
                s.corr.resize(nbk * P * 16, 0);
            }
            let magic = _mm512_set1_epi32(MAGIC_BITS);
            let off = _mm512_set1_epi8(16);
            for b in 0..nbk {
                for p in 0..P {
                    let (ra, rb) = (x.row(r0 + 2 * p), x.row(r0 + (2 * p + 1).min(nr - 1)));
                    let at = b * P + p;
                    let ya = _mm256_loadu_si256(ra.qs.as_ptr().add(b * QK) as *const __m256i);
                    let yb = _mm256_loadu_si256(rb.qs.as_ptr().add(b * QK) as *const __m256i);
                    let y = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ya), yb);
                    _mm512_storeu_si512(s.y.as_mut_ptr().add(at * 64) as *mut __m512i, y);
                    let dy = _mm512_mask_blend_ps(
                        0xFF00,
                        _mm512_set1_ps(*ra.d.get_unchecked(b)),
                        _mm512_set1_ps(*rb.d.get_unchecked(b)),
                    );
                    _mm512_storeu_ps(s.dy.as_mut_ptr().add(at * 16), dy);
                    let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, y);
                    let corr = _mm512_sub_epi32(magic, sum);
                    _mm512_storeu_si512(s.corr.as_mut_ptr().add(at * 16) as *mut __m512i, corr);
                }
            }
            let mut c = c0;
            while c < c1 {
                if c + 2 <= c1 {
                    self.tile_zmm::<P, 2>(c, s, out, (r0, nr), ldo);
                    c += 2;
                } else {
                    self.tile_zmm::<P, 1>(c, s, out, (r0, nr), ldo);
                    c += 1;
                }
            }
        }
    }
}

impl Q5Weight {
    /// Columns `c..c + C` for the `P` row pairs prepared in `s`.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_zmm<const P: usize, const C: usize>(
        &self,
        c: usize,
        s: &PairScratch,
        out: OutPtr,
        (r0, nr): (usize, usize),
        ldo: usize,
    ) {
        unsafe {
            let nbk = self.k / QK;
            let qs = self.qs.as_ptr();
            let low = _mm512_set1_epi8(0x0F);
            let sixteen = _mm512_set1_epi8(16);
            // Nibble shifts per 128-bit quarter: low nibbles, high nibbles, twice.
            let shifts = _mm512_set_epi32(
                0x0004_0004,
                0x0004_0004,
                0x0004_0004,
                0x0004_0004,
                0,
                0,
                0,
                0,
                0x0004_0004,
                0x0004_0004,
                0x0004_0004,
                0x0004_0004,
                0,
                0,
                0,
                0,
            );
            let magic = _mm512_castsi512_ps(_mm512_set1_epi32(MAGIC_BITS));
            let mut acc = [[_mm512_setzero_ps(); C]; P];
            for b in 0..nbk {
                let mut ws = [_mm512_setzero_si512(); C];
                for (j, w) in ws.iter_mut().enumerate() {
                    let wb = (c + j) * nbk + b;
                    if wb.is_multiple_of(4) {
                        // One line per four blocks.
                        _mm_prefetch::<_MM_HINT_T0>(
                            qs.wrapping_add(wb * 16 + PREFETCH) as *const i8
                        );
                    }
                    let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                    let nib =
                        _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(t), shifts), low);
                    // Bit e of qh is element e's fifth bit, in both halves.
                    let h = *self.qh.get_unchecked(wb) as u64;
                    *w = _mm512_mask_add_epi8(nib, _cvtu64_mask64(h | h << 32), nib, sixteen);
                }
                for (p, accp) in acc.iter_mut().enumerate() {
                    let at = b * P + p;
                    let y = _mm512_loadu_si512(s.y.as_ptr().add(at * 64) as *const __m512i);
                    let dy = _mm512_loadu_ps(s.dy.as_ptr().add(at * 16));
                    let start = _mm512_loadu_si512(s.corr.as_ptr().add(at * 16) as *const __m512i);
                    for (j, w) in ws.iter().enumerate() {
                        let sum = _mm512_dpbusd_epi32(start, *w, y);
                        let f = _mm512_sub_ps(_mm512_castsi512_ps(sum), magic);
                        let d = _mm512_mul_ps(
                            dy,
                            _mm512_set1_ps(*self.d.get_unchecked((c + j) * nbk + b)),
                        );
                        let a = accp.get_unchecked_mut(j);
                        *a = _mm512_fmadd_ps(d, f, *a);
                    }
                }
            }
            for (p, accp) in acc.iter().enumerate() {
                for (j, a) in accp.iter().enumerate() {
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
}

//! 512-bit VNNI kernels for several activation rows at once (decode steps of a batch,
//! prefill), for Q4_0, Q4_1 and Q8_0 weights.
//!
//! A 512-bit register holds the eight lanes of one column for *two* activation rows
//! (lanes 0..8 row `2p`, lanes 8..16 row `2p + 1`), so each instruction does the work
//! of two 256-bit ones. On CPUs with full-width AVX-512 units (AMD Zen 5, Intel server
//! cores) that halves the instructions per output; where 512-bit operations are split
//! in two (Zen 4) it still halves the front-end work. Per (row pair, column, block):
//!
//! * `vpdpbusd`: the weight block (unpacked once per column and block, the same bytes
//!   in both halves) against the two rows' activation block. The accumulator starts at
//!   `MAGIC_BITS` (plus the Q4_0/Q8_0 offset correction `-off * four-sums of y`, per
//!   row and block), so the lane sums come out as the bits of `1.5 * 2^23 + sum`;
//! * one subtraction turns them into exact floats (no conversion instruction);
//! * one multiply forms the scale products `d_w * d_y` of both rows (the same f32
//!   products as the portable code);
//! * one fused multiply-add into the lane accumulators, block after block.
//!
//! So every lane sees exactly the FMAs of [`QWeight::dot_lanes`], in its order, and the
//! final horizontal sums are the same: results are bit-identical to the other levels.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::thread::LocalKey;

use super::pairs::{self, Pairs, MAX_PAIRS};
use super::{Isa, Kind, OutPtr, QActs, QWeight, MAGIC_BITS, QK};

/// The rows of one tile rearranged for the kernel, per block `b` and row pair `p`
/// (index `b * P + p`), reused between calls.
#[derive(Default)]
pub(super) struct PairScratch {
    /// The two rows' 32 activation bytes, side by side (64 bytes).
    y: Vec<i8>,
    /// The two rows' activation scales, each repeated eight times.
    dy: Vec<f32>,
    /// `MAGIC_BITS - off * (sum of four activations)` per lane (Q4_0 and Q8_0).
    corr: Vec<i32>,
    /// Q4_1: the two rows' `s` (scale times the block's sum), each repeated eight times.
    sy: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<PairScratch> = RefCell::new(PairScratch::default());
}

/// How far ahead of the tile being computed its weights are prefetched, in bytes.
const PREFETCH: usize = 2048;

/// [`hsum8`] of lanes `0..8` and of lanes `8..16`, in registers: `l[i] + l[i + 4]`,
/// then `(r0 + r2) + (r1 + r3)`, the same additions (addition commutes bit for bit).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn hsum8_pair(a: __m512) -> [f32; 2] {
    // Quarters swapped within each half: lane i meets lane i + 4.
    let r = _mm512_add_ps(a, _mm512_shuffle_f32x4::<0xB1>(a, a));
    // Within each quarter [r0, r1, r2, r3] + [r2, r3, r0, r1].
    let u = _mm512_add_ps(r, _mm512_permute_ps::<0x4E>(r));
    // [u0, u1] + [u1, u0].
    let v = _mm512_add_ps(u, _mm512_permute_ps::<0xB1>(u));
    let mut l = [0f32; 16];
    // SAFETY: `l` holds 16 floats.
    unsafe { _mm512_storeu_ps(l.as_mut_ptr(), v) };
    [l[0], l[8]]
}

impl QWeight {
    /// Every row of `x` (at least two) against columns `c0..c1`.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and VNNI, AVX2 and FMA are available; `c0 % 8 == 0`,
    /// `c1 <= n`, and the output holds every row at stride `ldo` for columns `c0..c1`.
    pub(super) unsafe fn cols_zmm(&self, x: &QActs, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        debug_assert!(c0.is_multiple_of(8) && c1 <= self.n);
        // SAFETY: as for this function.
        unsafe { pairs::cols(self, x, c0, c1, out, ldo) }
    }
}

impl Pairs for QWeight {
    type Acts = QActs;
    type Scratch = PairScratch;

    fn rows(x: &QActs) -> usize {
        x.m
    }

    const SCRATCH: &'static LocalKey<RefCell<PairScratch>> = &SCRATCH;

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
        // SAFETY: as for this function.
        unsafe {
            match self.kind {
                Kind::Q4_0 => self.pairs_zmm::<0, P>(x, rows, c0, c1, s, out, ldo),
                Kind::Q4_1 => self.pairs_zmm::<1, P>(x, rows, c0, c1, s, out, ldo),
                Kind::Q8_0 => self.pairs_zmm::<2, P>(x, rows, c0, c1, s, out, ldo),
            }
        }
    }

    unsafe fn last_row(&self, x: &QActs, r: usize, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        self.one_row(Isa::Avx512Vnni, x, r, c0, c1, out, ldo);
    }

    /// The scales come eight columns to a vector.
    fn align() -> usize {
        8
    }
}

impl QWeight {
    /// `rows` (`2P` of them, or `2P - 1`: the last pair is then one row twice) against
    /// columns `c0..c1`, a group of eight columns (one scale vector) at a time.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pairs_zmm<const K: u8, const P: usize>(
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
            if s.y.len() < nbk * MAX_PAIRS * 64 {
                s.y.resize(nbk * MAX_PAIRS * 64, 0);
                s.dy.resize(nbk * MAX_PAIRS * 16, 0.0);
                s.corr.resize(nbk * MAX_PAIRS * 16, 0);
                s.sy.resize(nbk * MAX_PAIRS * 16, 0.0);
            }
            let magic = _mm512_set1_epi32(MAGIC_BITS);
            let off = _mm512_set1_epi8(if K == 0 { 8 } else { -128 });
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
                    if K == 1 {
                        let sy = _mm512_mask_blend_ps(
                            0xFF00,
                            _mm512_set1_ps(*ra.s.get_unchecked(b)),
                            _mm512_set1_ps(*rb.s.get_unchecked(b)),
                        );
                        _mm512_storeu_ps(s.sy.as_mut_ptr().add(at * 16), sy);
                    }
                    if K != 1 {
                        let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, y);
                        let corr = _mm512_sub_epi32(magic, sum);
                        _mm512_storeu_si512(s.corr.as_mut_ptr().add(at * 16) as *mut __m512i, corr);
                    }
                }
            }
            // The start of this task's weight stream (the tiles prefetch ahead of themselves
            // from then on), and, group by group, the next group's scales.
            let bsz = if K == 2 { QK } else { QK / 2 };
            let first = self.qs.as_ptr().add(c0 * nbk * bsz);
            for line in 0..PREFETCH.min((c1 - c0) * nbk * bsz) / 64 {
                _mm_prefetch::<_MM_HINT_T0>(first.add(line * 64) as *const i8);
            }
            let mut g = c0;
            while g < c1 {
                let cols = (c1 - g).min(8);
                if g + 8 < c1 {
                    let next = self.sc(g + 8, 0);
                    for line in 0..(nbk * 8 * 4).div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T0>(
                            self.d.as_ptr().add(next + line * 16) as *const i8
                        );
                        if K == 1 {
                            _mm_prefetch::<_MM_HINT_T0>(
                                self.m.as_ptr().add(next + line * 16) as *const i8
                            );
                        }
                    }
                }
                // Q4_1's `m * s` sums, eight columns to a vector, per row.
                // Two rows to a register as in the tiles; the pairs' chains overlap.
                let mut sm = [[0f32; 8]; 2 * MAX_PAIRS];
                if K == 1 {
                    let mut acc = [_mm512_setzero_ps(); MAX_PAIRS];
                    for b in 0..nbk {
                        let mw = _mm256_loadu_ps(self.m.as_ptr().add(self.sc(g, b)));
                        let mw = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(mw)));
                        for (p, a) in acc.iter_mut().enumerate().take(P) {
                            let sy = _mm512_loadu_ps(s.sy.as_ptr().add((b * P + p) * 16));
                            *a = _mm512_fmadd_ps(mw, sy, *a);
                        }
                    }
                    for (p, a) in acc.iter().enumerate().take(P) {
                        let mut lanes = [0f32; 16];
                        _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
                        sm[2 * p].copy_from_slice(&lanes[..8]);
                        sm[2 * p + 1].copy_from_slice(&lanes[8..]);
                    }
                }
                // Two columns per tile measured fastest in the model (four spill registers,
                // one reloads the activations too often).
                let mut j = 0;
                while j + 2 <= cols {
                    self.tile_zmm::<K, P, 2>(g, j, s, &sm, out, (r0, nr), ldo);
                    j += 2;
                }
                if j < cols {
                    self.tile_zmm::<K, P, 1>(g, j, s, &sm, out, (r0, nr), ldo);
                }
                g += 8;
            }
        }
    }

    /// Columns `g + j0 .. g + j0 + C` (inside the group starting at `g`) for the `P`
    /// row pairs prepared in `s`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_zmm<const K: u8, const P: usize, const C: usize>(
        &self,
        g: usize,
        j0: usize,
        s: &PairScratch,
        sm: &[[f32; 8]; 2 * MAX_PAIRS],
        out: OutPtr,
        (r0, nr): (usize, usize),
        ldo: usize,
    ) {
        unsafe {
            let nbk = self.k / QK;
            let qs = self.qs.as_ptr();
            let low = _mm512_set1_epi8(0x0F);
            let flip = _mm512_set1_epi8(-128);
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
            let magic_i = _mm512_set1_epi32(MAGIC_BITS);
            let magic = _mm512_castsi512_ps(magic_i);
            let mut acc = [[_mm512_setzero_ps(); C]; P];
            // The weights are one stream in column order; in the model they come from
            // memory, not cache. Prefetch the blocks `PREFETCH` bytes ahead, one line per
            // 64 bytes of this tile, so that the loads overlap the arithmetic.
            let bsz = if K == 2 { QK } else { QK / 2 };
            let tile = qs.add((g + j0) * nbk * bsz);
            let lines = (C * nbk * bsz).div_ceil(64);
            let mut line = 0;
            for b in 0..nbk {
                while line * nbk < (b + 1) * lines {
                    _mm_prefetch::<_MM_HINT_T0>(
                        tile.wrapping_add(PREFETCH + line * 64) as *const i8
                    );
                    line += 1;
                }
                let mut ws = [_mm512_setzero_si512(); C];
                for (j, w) in ws.iter_mut().enumerate() {
                    let wb = (g + j0 + j) * nbk + b;
                    *w = if K == 2 {
                        let t = _mm256_loadu_si256(qs.add(wb * QK) as *const __m256i);
                        _mm512_xor_si512(_mm512_broadcast_i64x4(t), flip)
                    } else {
                        let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                        _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(t), shifts), low)
                    };
                }
                let dw = self.d.as_ptr().add(self.sc(g, b) + j0);
                for (p, accp) in acc.iter_mut().enumerate() {
                    let at = b * P + p;
                    let y = _mm512_loadu_si512(s.y.as_ptr().add(at * 64) as *const __m512i);
                    let dy = _mm512_loadu_ps(s.dy.as_ptr().add(at * 16));
                    let start = if K == 1 {
                        magic_i
                    } else {
                        _mm512_loadu_si512(s.corr.as_ptr().add(at * 16) as *const __m512i)
                    };
                    for (j, w) in ws.iter().enumerate() {
                        let sum = _mm512_dpbusd_epi32(start, *w, y);
                        let f = _mm512_sub_ps(_mm512_castsi512_ps(sum), magic);
                        let d = _mm512_mul_ps(dy, _mm512_set1_ps(*dw.add(j)));
                        let a = accp.get_unchecked_mut(j);
                        *a = _mm512_fmadd_ps(d, f, *a);
                    }
                }
            }
            for (p, accp) in acc.iter().enumerate() {
                for (j, a) in accp.iter().enumerate() {
                    let [lo, hi] = hsum8_pair(*a);
                    for (h, v) in [lo, hi].into_iter().enumerate() {
                        let i = 2 * p + h;
                        if i == nr {
                            break; // the duplicate of an odd tile's last row
                        }
                        let v = v + if K == 1 { sm[i][j0 + j] } else { 0.0 };
                        out.write((r0 + i) * ldo + g + j0 + j, v);
                    }
                }
            }
        }
    }
}

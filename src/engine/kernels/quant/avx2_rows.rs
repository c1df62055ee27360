//! The multi-row kernel of Q4_0, Q4_1 and Q8_0 on plain AVX2 (no VNNI): several
//! activation rows at once (decode steps of several sequences, prefill), with
//! everything that depends on only the row or only the column hoisted out of the
//! inner loop, as the VNNI tiles in `avx2.rs` do. Bit-identical to
//! [`QWeight::dot_lanes`].
//!
//! Per (row, column, block) the work is the integer sum of the block in eight lanes
//! of four products, one conversion and one fused multiply-add, and nothing else. The
//! conversion is exact by the `MAGIC_BITS` trick (the sum added to the bits of
//! 1.5 * 2^23, then 1.5 * 2^23 subtracted as a float): a floating-point subtraction,
//! which recent Intel cores also run on port 5, where `vcvtdq2ps` competes with the
//! multiplies and multiply-adds for ports 0 and 1.
//!
//! * Q4_1 nibbles are unsigned: `vpmaddubsw` (nibble times activation, pairs summed in
//!   16 bits) then `vpmaddwd` by ones (pairs of pairs in 32 bits).
//! * Q4_0 runs the same on its nibbles without their `- 8`; the offset comes back as
//!   one integer addition of `-8 * (sum of four activations)`, which depends on the
//!   row and block only (formed once per tile of rows). No 16-bit sum can overflow:
//!   `2 * 15 * 127 < 2^15`.
//! * Q8_0 weights are signed: ggml's sign trick, `|w|` (once per column and block)
//!   against the activations with the weights' signs (`vpsignb`).
//! * The scale products `d_w * d_y` of eight columns are formed once per block and row
//!   (one vector multiply, the same f32 products as the portable code) and read back
//!   as broadcasts; Q4_1's `m * s` chains run eight columns to a vector.
//! * The rows' blocks are copied side by side (`[b][r]`, like the scale products), so
//!   that a tile steps three pointers a block, not one per row.
//!
//! That leaves three instructions per (row, column, block) on the two ports that
//! multiply (ports 0 and 1 on recent Intel cores): `vpmaddubsw`, `vpmaddwd` (or the
//! `vpdpwssd` the compiler fuses it into where the build has VNNI) and the FMA, so
//! about 1.5 cycles at best; on the Xeon the tile's loop runs at about 1.75 in L1 and
//! the whole kernel at about 2 (the scale products, Q4_1's `m * s` and the horizontal
//! sums take the rest). Going below needs fewer multiplies per block, which plain AVX2
//! does not have (VNNI's `vpdpbusd` is the `avx2` module's level).
//!
//! All integer steps are exact, so each lane holds the same four-product sum as the
//! reference, and the FMAs, their order and the horizontal sum are the reference's.
//!
//! Must not depend on anything outside `quant`.

use std::arch::x86_64::*;

use super::avx2::{tile_sums, TileScratch, TILE_SCRATCH};
use super::drive::prefetch_bytes;
use super::{Kind, OutPtr, QActs, QWeight, Row, MAGIC_BITS, QK};

/// Most rows sharing one pass over the weights (eight accumulators of one column, plus
/// the weights, an activation block and constants, fit the sixteen `ymm` registers).
/// Measured on a Xeon capped at AVX2, one thread, 8 rows: Q4_1 the same as four rows by
/// two columns, Q8_0 2 % faster, Q4_0 11 % slower (so Q4_0 takes the four-row tiles).
const ROWS: usize = 8;

/// Columns of a tile of [`ROWS`] rows: two where the build targets a CPU with 32 vector
/// registers (AVX-512 VL: LLVM then gives 256-bit code `ymm16`–`ymm31` too), so that
/// each activation block, loop step and weight-scale pointer serves twice the work;
/// one with sixteen registers, where sixteen accumulators would spill. A standalone copy
/// of the Q4_1 kernel (8 rows, 3072 x 576, one thread, the Xeon at AVX2) took 2.0-2.1
/// cycles per row, column and block with two, 2.2-2.4 with one; built for `x86-64-v3`
/// two spilled (2.8-3.0). Q4_0 measured no faster at eight rows by two columns than at
/// four by two, so it keeps the four-row tiles.
const COLS8: usize = if cfg!(target_feature = "avx512vl") {
    2
} else {
    1
};

/// How far ahead of the group being computed its weights are prefetched, in bytes.
const PREFETCH: usize = 2048;

impl QWeight {
    /// Every row of `x` against columns `c0..c1`.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `c0 % 8 == 0`, `c1 <= n`, and the output holds
    /// every row at stride `ldo` for columns `c0..c1`, written by this task alone.
    pub(super) unsafe fn cols_avx2(
        &self,
        x: &QActs,
        c0: usize,
        c1: usize,
        out: OutPtr,
        ldo: usize,
    ) {
        // SAFETY: as for this function.
        unsafe {
            match self.kind {
                Kind::Q4_0 => self.cols_avx2_k::<0>(x, c0, c1, out, ldo),
                Kind::Q4_1 => self.cols_avx2_k::<1>(x, c0, c1, out, ldo),
                Kind::Q8_0 => self.cols_avx2_k::<2>(x, c0, c1, out, ldo),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn cols_avx2_k<const K: u8>(
        &self,
        x: &QActs,
        c0: usize,
        c1: usize,
        out: OutPtr,
        ldo: usize,
    ) {
        debug_assert!(c0.is_multiple_of(8) && c1 <= self.n);
        let nbk = self.k / QK;
        TILE_SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            if s.dd.len() < nbk * ROWS * 8 {
                s.corr.resize(nbk * ROWS * 8, 0);
                s.dd.resize(nbk * ROWS * 8, 0.0);
            }
            if s.rs.len() < nbk * ROWS * 2 {
                s.rs.resize(nbk * ROWS * 2, 0.0);
            }
            if s.ys.len() < nbk * ROWS * QK {
                s.ys.resize(nbk * ROWS * QK, 0);
            }
            let mut r = 0;
            while r < x.m {
                let left = x.m - r;
                // SAFETY: as for this function; the scratch holds nbk * ROWS * 8 values
                // (`ys`: nbk * ROWS * 32).
                unsafe {
                    // Q4_0 reads a correction per row and block: two columns a tile
                    // halve those loads, and measured faster in tiles of four rows.
                    if left >= 8 && K != 0 {
                        self.rows_avx2::<K, 8, COLS8>(x, r, c0, c1, s, out, ldo);
                        r += 8;
                    } else if left >= 4 {
                        self.rows_avx2::<K, 4, 2>(x, r, c0, c1, s, out, ldo);
                        r += 4;
                    } else if left >= 2 {
                        self.rows_avx2::<K, 2, 2>(x, r, c0, c1, s, out, ldo);
                        r += 2;
                    } else {
                        self.rows_avx2::<K, 1, 2>(x, r, c0, c1, s, out, ldo);
                        r += 1;
                    }
                }
            }
        })
    }

    /// Rows `r0..r0 + R` against columns `c0..c1`, a group of eight columns (one scale
    /// vector) at a time, `C` columns to a tile.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2<const K: u8, const R: usize, const C: usize>(
        &self,
        x: &QActs,
        r0: usize,
        c0: usize,
        c1: usize,
        s: &mut TileScratch,
        out: OutPtr,
        ldo: usize,
    ) {
        unsafe {
            let nbk = self.k / QK;
            let rows: [Row<'_>; R] = std::array::from_fn(|i| x.row(r0 + i));
            // The rows' blocks side by side, `[b][r]`, so that the tiles reach all of a
            // block's rows from one pointer that steps once a block (with the rows at
            // their own stride, the compiler kept a pointer per row and stepped each).
            let ys = s.ys.as_mut_ptr();
            for b in 0..nbk {
                for (i, row) in rows.iter().enumerate() {
                    let y = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                    _mm256_storeu_si256(ys.add((b * R + i) * QK) as *mut __m256i, y);
                }
            }
            let corr = s.corr.as_mut_ptr();
            if K == 0 {
                // MAGIC_BITS - 8 * (sum of four activations) per lane, `[b][r]`.
                let ones = _mm256_set1_epi16(1);
                let eight = _mm256_set1_epi8(8);
                for b in 0..nbk {
                    for (i, row) in rows.iter().enumerate() {
                        let y = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                        let sum = _mm256_madd_epi16(_mm256_maddubs_epi16(eight, y), ones);
                        let neg = _mm256_sub_epi32(_mm256_set1_epi32(MAGIC_BITS), sum);
                        _mm256_storeu_si256(corr.add((b * R + i) * 8) as *mut __m256i, neg);
                    }
                }
            }
            // The rows' scales side by side, so that one pointer reaches them all.
            let rs = s.rs.as_mut_ptr();
            for b in 0..nbk {
                for (i, row) in rows.iter().enumerate() {
                    *rs.add(b * R + i) = *row.d.get_unchecked(b);
                    if K == 1 {
                        *rs.add((nbk + b) * R + i) = *row.s.get_unchecked(b);
                    }
                }
            }
            let dd = s.dd.as_mut_ptr();
            let bsz = if K == 2 { QK } else { QK / 2 };
            let group = 8 * nbk * bsz;
            let first = self.qs.as_ptr().add(c0 * nbk * bsz);
            for line in 0..PREFETCH.min((c1 - c0) * nbk * bsz) / 64 {
                _mm_prefetch::<_MM_HINT_T0>(first.add(line * 64) as *const i8);
            }
            let mut g = c0;
            while g < c1 {
                let cols = (c1 - g).min(8);
                // The next group's weight scales (the stream of quants is prefetched
                // per tile below), which its first loads below would otherwise wait for.
                let next = self.sc(g + 8, 0);
                prefetch_bytes(self.d.as_ptr().wrapping_add(next), nbk * 8 * 4);
                if K == 1 {
                    prefetch_bytes(self.m.as_ptr().wrapping_add(next), nbk * 8 * 4);
                }
                // Scale products `[b][r][column in group]`, and Q4_1's `m * s` sums.
                let mut summs = [_mm256_setzero_ps(); R];
                for b in 0..nbk {
                    let si = self.sc(g, b);
                    let dw = _mm256_loadu_ps(self.d.as_ptr().add(si));
                    let mw = if K == 1 {
                        _mm256_loadu_ps(self.m.as_ptr().add(si))
                    } else {
                        dw
                    };
                    for (i, sum) in summs.iter_mut().enumerate() {
                        let p = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*rs.add(b * R + i)));
                        _mm256_storeu_ps(dd.add((b * R + i) * 8), p);
                        if K == 1 {
                            let sy = _mm256_broadcast_ss(&*rs.add((nbk + b) * R + i));
                            *sum = _mm256_fmadd_ps(mw, sy, *sum);
                        }
                    }
                }
                let mut sm = [[0f32; 8]; R];
                for (i, v) in summs.iter().enumerate() {
                    _mm256_storeu_ps(sm[i].as_mut_ptr(), *v);
                }
                // The weights stream from memory in column order: the group after the
                // next is fetched while this one computes, a share per tile.
                let ahead = self.qs.as_ptr().wrapping_add(g * nbk * bsz + PREFETCH);
                let mut j = 0;
                while j < cols {
                    let cw = if j + C <= cols { C } else { 1 };
                    let lines = group / 64 * cw / 8;
                    let from = ahead.wrapping_add(j * nbk * bsz);
                    for line in 0..lines {
                        _mm_prefetch::<_MM_HINT_T0>(from.wrapping_add(line * 64) as *const i8);
                    }
                    let at = Tile {
                        ys,
                        corr,
                        dd,
                        g,
                        j0: j,
                    };
                    if cw == C {
                        self.tile_avx2::<K, R, C>(at, &sm, out, r0, ldo);
                    } else {
                        self.tile_avx2::<K, R, 1>(at, &sm, out, r0, ldo);
                    }
                    j += cw;
                }
                g += 8;
            }
        }
    }

    /// Columns `g + j0 .. g + j0 + C` of the group starting at `g`, for the `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const K: u8, const R: usize, const C: usize>(
        &self,
        at: Tile,
        sm: &[[f32; 8]; R],
        out: OutPtr,
        r0: usize,
        ldo: usize,
    ) {
        unsafe {
            let Tile {
                ys,
                corr,
                dd,
                g,
                j0,
            } = at;
            let nbk = self.k / QK;
            let bsz = if K == 2 { QK } else { QK / 2 };
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let magic_i = _mm256_set1_epi32(MAGIC_BITS);
            let magic = _mm256_castsi256_ps(magic_i);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            // One pointer per operand, each stepped once a block: the weights of the
            // tile's first column (the others at a fixed distance), the rows' blocks,
            // their scale products and (Q4_0) corrections.
            let mut wp = self.qs.as_ptr().add((g + j0) * nbk * bsz);
            let mut yp = ys;
            let mut dp = dd.add(j0);
            let mut cp = corr;
            for _ in 0..nbk {
                // The weights (Q8_0: their magnitudes) and, for Q8_0, the weights
                // themselves for their signs.
                let mut ws = [_mm256_setzero_si256(); C];
                let mut sg = [_mm256_setzero_si256(); C];
                for j in 0..C {
                    let p = wp.add(j * nbk * bsz);
                    if K == 2 {
                        let w = _mm256_loadu_si256(p as *const __m256i);
                        sg[j] = w;
                        ws[j] = _mm256_sign_epi8(w, w);
                    } else {
                        let t = _mm_loadu_si128(p as *const __m128i);
                        ws[j] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low);
                    }
                }
                for i in 0..R {
                    let y = _mm256_loadu_si256(yp.add(i * QK) as *const __m256i);
                    for j in 0..C {
                        let yj = if K == 2 {
                            _mm256_sign_epi8(y, sg[j])
                        } else {
                            y
                        };
                        let mut sum = _mm256_madd_epi16(_mm256_maddubs_epi16(ws[j], yj), ones);
                        sum = _mm256_add_epi32(
                            sum,
                            if K == 0 {
                                _mm256_loadu_si256(cp.add(i * 8) as *const __m256i)
                            } else {
                                magic_i
                            },
                        );
                        let d = _mm256_broadcast_ss(&*dp.add(i * 8 + j));
                        let a = acc.get_unchecked_mut(i).get_unchecked_mut(j);
                        // The lane sums sit in the low mantissa bits of MAGIC: one
                        // subtraction yields them as exact floats, on the adders (ports
                        // 1 and 5 on recent Intel cores) instead of the multipliers'
                        // ports that `vcvtdq2ps` shares with the multiply-adds.
                        let f = _mm256_sub_ps(_mm256_castsi256_ps(sum), magic);
                        *a = _mm256_fmadd_ps(d, f, *a);
                    }
                }
                wp = wp.add(bsz);
                yp = yp.add(R * QK);
                dp = dp.add(R * 8);
                cp = cp.add(R * 8);
            }
            for (i, sums) in tile_sums(&acc).iter().enumerate() {
                for (j, &h) in sums.iter().enumerate() {
                    let v = h + if K == 1 { sm[i][j0 + j] } else { 0.0 };
                    out.write((r0 + i) * ldo + g + j0 + j, v);
                }
            }
        }
    }
}

/// Where a tile of [`QWeight::tile_avx2`] reads: the rows' blocks, corrections and
/// scale products in the scratch, and its columns (`g + j0`, `g` the group's first).
#[derive(Clone, Copy)]
struct Tile {
    ys: *const i8,
    corr: *const i32,
    dd: *const f32,
    g: usize,
    j0: usize,
}

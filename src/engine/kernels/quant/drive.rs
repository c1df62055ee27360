//! The loop shared by the Q5_0 and K-quant kernels: columns split across the thread
//! pool, and inside a task tiles of activation rows and weight columns small enough to
//! stay in registers and L1. A kernel only says how to compute one tile.
//!
//! Must not depend on anything outside `quant`.

use rayon::prelude::*;

use super::{Isa, OutPtr};

/// A weight matrix whose kernel computes `C` columns against `R` activation rows.
pub(super) trait Tiled: Sync {
    /// One quantized activation row, borrowed.
    type Row<'a>: Copy + Send + Sync;

    /// `out[j][r]` = column `c + j` against `rows[r]`; every result is formed in the
    /// order of the type's portable reference, whatever `R` and `C` are.
    fn tile<const R: usize, const C: usize>(
        &self,
        isa: Isa,
        c: usize,
        rows: [Self::Row<'_>; R],
    ) -> [[f32; R]; C];

    /// Hint that columns `c0..c1` come next (their weights are fetched into cache while
    /// the current tile computes). The default does nothing.
    fn prefetch(&self, _c0: usize, _c1: usize) {}
}

/// Prefetch the cache lines of `len` bytes from `p` (a hint: no effect on results).
#[inline]
pub(super) fn prefetch_bytes<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..len.div_ceil(64) {
        // SAFETY: prefetching has no architectural effect, even out of bounds.
        unsafe {
            use std::arch::x86_64::*;
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(line * 64));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Row `r` (`row`) alone against columns `c0..c1`, four columns to a tile (the row left
/// over by the 512-bit kernels' passes of row pairs).
///
/// # Safety
/// The output holds row `r` at stride `ldo` for columns `c0..c1`, written by this task
/// alone; `c1` is at most the weight's width.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn one_row<W: Tiled>(
    w: &W,
    isa: Isa,
    row: W::Row<'_>,
    r: usize,
    c0: usize,
    c1: usize,
    out: OutPtr,
    ldo: usize,
) {
    let mut c = c0;
    while c < c1 {
        if c + 4 <= c1 {
            let v = w.tile::<1, 4>(isa, c, [row]);
            for (j, &[y]) in v.iter().enumerate() {
                // SAFETY: as for this function.
                unsafe { out.write(r * ldo + c + j, y) };
            }
            c += 4;
        } else {
            let [[y]] = w.tile::<1, 1>(isa, c, [row]);
            // SAFETY: as for this function.
            unsafe { out.write(r * ldo + c, y) };
            c += 1;
        }
    }
}

/// The drivers' split of `n` output columns: checks that an output of `out_len` values
/// holds `m` rows at stride `ldo`, then runs `task(c0, c1)` for column ranges of about
/// a quarter of a thread's share (a multiple of `align` long), on the thread pool when
/// there are several. Nothing runs for an empty product.
fn column_tasks(
    n: usize,
    m: usize,
    out_len: usize,
    ldo: usize,
    align: usize,
    task: impl Fn(usize, usize) + Sync,
) {
    assert!(ldo >= n && (m == 0 || out_len >= (m - 1) * ldo + n));
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 4).next_multiple_of(align);
    let run = |ci: usize| task(ci * chunk, ((ci + 1) * chunk).min(n));
    let tasks = n.div_ceil(chunk);
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// `out[r * ldo + c] = row(r) · w_c` for `m` rows and `n` columns at level `isa`.
pub(super) fn matmul<'a, W: Tiled>(
    w: &W,
    isa: Isa,
    n: usize,
    m: usize,
    row: impl Fn(usize) -> W::Row<'a> + Sync,
    out: &mut [f32],
    ldo: usize,
) {
    let ptr = OutPtr(out.as_mut_ptr());
    // SAFETY (every write): in bounds (checked by `column_tasks`) and the columns of one
    // task belong to it alone.
    let put = |r: usize, c: usize, v: f32| unsafe { ptr.write(r * ldo + c, v) };
    let run = |c0: usize, c1: usize| {
        const ROW_TILE: usize = 32;
        for r0 in (0..m).step_by(ROW_TILE) {
            let r1 = (r0 + ROW_TILE).min(m);
            let mut c = c0;
            while c < c1 {
                let many = r1 - r0 >= 4;
                let cw = match (many, c1 - c) {
                    (true, left) if left >= 2 => 2,
                    (false, left) if left >= 4 => 4,
                    _ => 1,
                };
                if r0 == 0 {
                    // The weights stream from memory: ask for the next tile's now.
                    w.prefetch((c + cw).min(c1), (c + 2 * cw).min(c1));
                }
                let mut r = r0;
                while r + 4 <= r1 {
                    let rows = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                    if cw == 2 {
                        let v = w.tile::<4, 2>(isa, c, rows);
                        for (j, col) in v.iter().enumerate() {
                            for (i, &y) in col.iter().enumerate() {
                                put(r + i, c + j, y);
                            }
                        }
                    } else {
                        for j in 0..cw {
                            let [col] = w.tile::<4, 1>(isa, c + j, rows);
                            for (i, &y) in col.iter().enumerate() {
                                put(r + i, c + j, y);
                            }
                        }
                    }
                    r += 4;
                }
                while r < r1 {
                    if cw == 4 {
                        let v = w.tile::<1, 4>(isa, c, [row(r)]);
                        for (j, &[y]) in v.iter().enumerate() {
                            put(r, c + j, y);
                        }
                    } else {
                        for j in 0..cw {
                            let [[y]] = w.tile::<1, 1>(isa, c + j, [row(r)]);
                            put(r, c + j, y);
                        }
                    }
                    r += 1;
                }
                c += cw;
            }
        }
    };
    column_tasks(n, m, out.len(), ldo, 4, run);
}

#[cfg(target_arch = "x86_64")]
/// A weight matrix whose columns can be unpacked once into a panel of ready-to-use
/// values and then run against many activation rows (prefill): the unpacking, a large
/// share of a tile's work when it is redone for every four rows, is paid once for
/// [`PANEL_ROWS`] rows.
pub(super) trait Paneled: Sync {
    /// One quantized activation row, borrowed.
    type Row<'a>: Copy + Send + Sync;
    /// Scratch holding up to two unpacked columns.
    type Panel: Default + Send;

    /// Unpack columns `c..c + cw` (`cw` is 1 or 2) into `panel`.
    fn unpack(&self, isa: Isa, c: usize, cw: usize, panel: &mut Self::Panel);

    /// `out[j][r]` = the panel's column `j` against `rows[r]`, formed exactly as
    /// [`Tiled::tile`] forms it.
    fn panel_tile<const R: usize, const C: usize>(
        &self,
        isa: Isa,
        panel: &Self::Panel,
        rows: [Self::Row<'_>; R],
    ) -> [[f32; R]; C];
}

#[cfg(target_arch = "x86_64")]
/// Activation rows that one unpacked panel serves before the next columns' (the rows'
/// quantized bytes stay in L1/L2 while the task walks its columns).
pub(super) const PANEL_ROWS: usize = 64;

/// From this many activation rows on (prefill, large batches) the 256-bit levels run
/// the [`Paneled`] kernels (Zen 3, 8 rows of Qwen2.5-Coder's Q5_0 gate|up: 4.0 ms
/// against 4.9 with the four-row tiles).
#[cfg(target_arch = "x86_64")]
pub(super) const PANEL_MIN_ROWS: usize = 8;

/// Rows of a panel tile.
#[cfg(target_arch = "x86_64")]
const PR: usize = 3;

#[cfg(target_arch = "x86_64")]
/// [`matmul`] for a [`Paneled`] weight: per task and [`PANEL_ROWS`] rows, each pair of
/// columns is unpacked once and run against the rows [`PR`] at a time.
pub(super) fn matmul_panels<'a, W: Paneled>(
    w: &W,
    isa: Isa,
    n: usize,
    m: usize,
    row: impl Fn(usize) -> W::Row<'a> + Sync,
    out: &mut [f32],
    ldo: usize,
) {
    let ptr = OutPtr(out.as_mut_ptr());
    // SAFETY (every write): in bounds (checked by `column_tasks`) and the columns of one
    // task belong to it alone.
    let put = |r: usize, c: usize, v: f32| unsafe { ptr.write(r * ldo + c, v) };
    let run = |c0: usize, c1: usize| {
        let mut panel = W::Panel::default();
        for r0 in (0..m).step_by(PANEL_ROWS) {
            let r1 = (r0 + PANEL_ROWS).min(m);
            let mut c = c0;
            while c < c1 {
                let cw = (c1 - c).min(2);
                w.unpack(isa, c, cw, &mut panel);
                let mut r = r0;
                while r + PR <= r1 {
                    let rows: [_; PR] = std::array::from_fn(|i| row(r + i));
                    if cw == 2 {
                        let v = w.panel_tile::<PR, 2>(isa, &panel, rows);
                        for (j, col) in v.iter().enumerate() {
                            for (i, &y) in col.iter().enumerate() {
                                put(r + i, c + j, y);
                            }
                        }
                    } else {
                        let [col] = w.panel_tile::<PR, 1>(isa, &panel, rows);
                        for (i, &y) in col.iter().enumerate() {
                            put(r + i, c, y);
                        }
                    }
                    r += PR;
                }
                while r < r1 {
                    if cw == 2 {
                        let [[a], [b]] = w.panel_tile::<1, 2>(isa, &panel, [row(r)]);
                        put(r, c, a);
                        put(r, c + 1, b);
                    } else {
                        let [[a]] = w.panel_tile::<1, 1>(isa, &panel, [row(r)]);
                        put(r, c, a);
                    }
                    r += 1;
                }
                c += cw;
            }
        }
    };
    column_tasks(n, m, out.len(), ldo, 2, run);
}

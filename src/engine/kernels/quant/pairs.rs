//! The loop shared by the 512-bit multi-row kernels (`zmm.rs` for Q4_0/Q4_1/Q8_0,
//! `q5_0_zmm.rs`, `kquant_zmm.rs`): columns split across the thread pool, and inside a
//! task passes of up to [`MAX_PAIRS`] activation row pairs over the task's columns, so
//! that the weights are read once per pass. An odd row count pairs its last row with
//! itself; a row left over after whole passes (9, 17, ... rows) goes through the
//! weight's one-row kernel. A kernel only says how to run one pass.
//!
//! Must not depend on anything outside `quant`.

use std::cell::RefCell;
use std::ops::Range;
use std::thread::LocalKey;

use rayon::prelude::*;

use super::OutPtr;

/// Most row pairs in one pass (four pairs by two columns: eight accumulators).
pub(super) const MAX_PAIRS: usize = 4;

/// A weight matrix with a 512-bit kernel over activation row pairs.
pub(super) trait Pairs: Sync {
    /// The quantized activations it takes.
    type Acts: Sync;
    /// Per-thread buffers of a pass (the rows rearranged for the kernel).
    type Scratch: 'static;

    /// How many rows `x` holds.
    fn rows(x: &Self::Acts) -> usize;

    /// This thread's scratch.
    const SCRATCH: &'static LocalKey<RefCell<Self::Scratch>>;

    /// `rows` (`2P` of them, or `2P - 1`: the last pair is then one row twice) against
    /// columns `c0..c1`.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and VNNI, AVX2 and FMA are available; `c1` is at most the
    /// weight's width and `c0` a multiple of [`Pairs::align`]; the output holds every
    /// row at stride `ldo` for columns `c0..c1`, written by this task alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pass<const P: usize>(
        &self,
        x: &Self::Acts,
        rows: Range<usize>,
        c0: usize,
        c1: usize,
        s: &mut Self::Scratch,
        out: OutPtr,
        ldo: usize,
    );

    /// Row `r` alone against columns `c0..c1`.
    ///
    /// # Safety
    /// As for [`Pairs::pass`].
    unsafe fn last_row(
        &self,
        x: &Self::Acts,
        r: usize,
        c0: usize,
        c1: usize,
        out: OutPtr,
        ldo: usize,
    );

    /// What a task's first column is a multiple of.
    fn align() -> usize {
        2
    }
}

/// Every row of `x` against columns `c0..c1` of `w`.
///
/// # Safety
/// As for [`Pairs::pass`].
pub(super) unsafe fn cols<W: Pairs>(
    w: &W,
    x: &W::Acts,
    c0: usize,
    c1: usize,
    out: OutPtr,
    ldo: usize,
) {
    let m = W::rows(x);
    let mut r = 0;
    W::SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        while m - r >= 2 {
            let pairs = (m - r).div_ceil(2).min(MAX_PAIRS);
            let rows = r..(r + 2 * pairs).min(m);
            let n = rows.len();
            // SAFETY: as for this function.
            unsafe {
                match pairs {
                    4 => w.pass::<4>(x, rows, c0, c1, s, out, ldo),
                    3 => w.pass::<3>(x, rows, c0, c1, s, out, ldo),
                    2 => w.pass::<2>(x, rows, c0, c1, s, out, ldo),
                    _ => w.pass::<1>(x, rows, c0, c1, s, out, ldo),
                }
            }
            r += n;
        }
    });
    if r < m {
        // SAFETY: as for this function.
        unsafe { w.last_row(x, r, c0, c1, out, ldo) };
    }
}

/// `out[r * ldo + c] = x_r · w_c` for every row of `x` and the `n` columns of `w`, the
/// columns split across the thread pool.
///
/// # Safety
/// AVX-512 F, BW, VL and VNNI, AVX2 and FMA are available; `x` has the weight's width.
pub(super) unsafe fn matmul<W: Pairs>(w: &W, n: usize, x: &W::Acts, out: &mut [f32], ldo: usize) {
    let m = W::rows(x);
    assert!(ldo >= n && (m == 0 || out.len() >= (m - 1) * ldo + n));
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 4).next_multiple_of(W::align());
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |ci: usize| {
        let c0 = ci * chunk;
        // SAFETY: the features are there (caller), the output range was checked above,
        // and the columns of one task belong to it alone.
        unsafe { cols(w, x, c0, (c0 + chunk).min(n), ptr, ldo) }
    };
    let tasks = n.div_ceil(chunk);
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

//! Q4_0, Q4_1 and Q8_0 weights: repacking a GGUF tensor at load, the portable
//! reference dot product that every kernel equals bit for bit, and the dispatch of a
//! matrix product to the one-row, tiled or 512-bit kernels by instruction-set level.

use super::*;

impl QWeight {
    /// Repack a GGUF tensor; None for types these kernels do not cover.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        let (n, k) = t.shape().dims2()?;
        if k % QK != 0 {
            return Ok(None);
        }
        let raw = t.data()?;
        let nb = n * k / QK;
        let (bsz, qlen) = match kind {
            Kind::Q4_0 => (18, 16),
            Kind::Q4_1 => (20, 16),
            Kind::Q8_0 => (34, 32),
        };
        if raw.len() != nb * bsz {
            candle_core::bail!(
                "{kind:?} tensor has {} bytes, expected {}",
                raw.len(),
                nb * bsz
            );
        }
        let nbk = k / QK;
        let grouped = n.div_ceil(8) * 8 * nbk;
        let mut w = QWeight {
            kind,
            n,
            k,
            d: vec![0.0; grouped],
            m: if kind == Kind::Q4_1 {
                vec![0.0; grouped]
            } else {
                Vec::new()
            },
            qs: Vec::with_capacity(nb * qlen),
        };
        for (i, blk) in raw.chunks_exact(bsz).enumerate() {
            let at = w.sc(i / nbk, i % nbk);
            w.d[at] = f16_at(blk, 0);
            let q0 = match kind {
                Kind::Q4_1 => {
                    w.m[at] = f16_at(blk, 2);
                    4
                }
                _ => 2,
            };
            w.qs.extend_from_slice(&blk[q0..q0 + qlen]);
        }
        Ok(Some(w))
    }

    /// Index of the scales of column `c`, block `b` in `d` and `m`.
    #[inline(always)]
    pub(super) fn sc(&self, c: usize, b: usize) -> usize {
        ((c / 8) * (self.k / QK) + b) * 8 + c % 8
    }

    #[inline]
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Portable reference of one dot product (weight row `c` with one activation row),
    /// with the lane structure and rounding of ggml's AVX2 kernels: eight f32 lanes
    /// (lane i takes block elements 4i..4i+3), each block added with a fused
    /// multiply-add, then a fixed horizontal sum; Q4_1's `m * s` terms go into a
    /// separate scalar. The SIMD paths produce bit-identical results (tested).
    pub(super) fn dot_lanes(&self, c: usize, x: Row<'_>) -> f32 {
        let nbk = self.k / QK;
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        let mut w = [0i32; QK];
        for b in 0..nbk {
            let wb = c * nbk + b;
            match self.kind {
                Kind::Q4_1 | Kind::Q4_0 => {
                    let off = if self.kind == Kind::Q4_0 { 8 } else { 0 };
                    let q = &self.qs[wb * 16..wb * 16 + 16];
                    for j in 0..16 {
                        w[j] = (q[j] & 0x0F) as i32 - off;
                        w[j + 16] = (q[j] >> 4) as i32 - off;
                    }
                }
                Kind::Q8_0 => {
                    for (j, v) in self.qs[wb * QK..wb * QK + QK].iter().enumerate() {
                        w[j] = *v as i8 as i32;
                    }
                }
            }
            let y = &x.qs[b * QK..b * QK + QK];
            let dd = self.d[self.sc(c, b)] * x.d[b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (4 * lane..4 * lane + 4).map(|e| w[e] * y[e] as i32).sum();
                *a = dd.mul_add(s as f32, *a);
            }
            if self.kind == Kind::Q4_1 {
                summs = self.m[self.sc(c, b)].mul_add(x.s[b], summs);
            }
        }
        hsum8(acc) + summs
    }

    /// Dot products of weight rows `c..c + C` with `R` activation rows, at the given
    /// level: `out[j][r]` is column `c + j` against row `r`. A weight block is unpacked
    /// once for all `R` rows and an activation block loaded once for all `C` columns;
    /// the `C * R` sums are independent chains (no FMA latency bound), each formed in
    /// exactly the order of [`QWeight::dot_lanes`].
    #[inline]
    pub(super) fn dot_tile<const R: usize, const C: usize>(
        &self,
        isa: Isa,
        c: usize,
        rows: [Row<'_>; R],
    ) -> [[f32; R]; C] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `isa` comes from `isa()` (or a lower level), so the CPU has the
            // features each variant enables; shapes were checked by the caller.
            unsafe {
                match (isa, self.kind) {
                    (Isa::Avx2Vnni, Kind::Q4_0) if vex_vnni() => {
                        return self.dot_vex::<0, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni, Kind::Q4_1) if vex_vnni() => {
                        return self.dot_vex::<1, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni, Kind::Q8_0) if vex_vnni() => {
                        return self.dot_vex::<2, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_0) => {
                        return self.dot_vnni::<0, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_1) => {
                        return self.dot_vnni::<1, R, C>(c, rows)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q8_0) => {
                        return self.dot_vnni::<2, R, C>(c, rows)
                    }
                    (Isa::Avx2, Kind::Q4_0) => return self.dot_avx2::<0, R, C>(c, rows),
                    (Isa::Avx2, Kind::Q4_1) => return self.dot_avx2::<1, R, C>(c, rows),
                    (Isa::Avx2, Kind::Q8_0) => return self.dot_avx2::<2, R, C>(c, rows),
                    (Isa::Scalar, _) => {}
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(isa, Isa::Neon | Isa::NeonDot) {
            return self.tile_neon::<R, C>(isa, c, rows);
        }
        let _ = isa;
        std::array::from_fn(|j| rows.map(|r| self.dot_lanes(c + j, r)))
    }

    /// One activation row against columns `c..c + 8`, `c` a multiple of 8 (the scales
    /// of those columns are one vector). Same sums as [`QWeight::dot_lanes`].
    #[inline]
    pub(super) fn dot_row8(&self, isa: Isa, c: usize, row: Row<'_>) -> [f32; 8] {
        debug_assert!(c.is_multiple_of(8) && c + 8 <= self.n);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `dot_tile`; the grouped scale arrays are padded to whole
            // groups of eight columns.
            unsafe {
                match (isa, self.kind) {
                    (Isa::Avx2Vnni, Kind::Q4_0) if vex_vnni() => return self.dot8_vex::<0>(c, row),
                    (Isa::Avx2Vnni, Kind::Q4_1) if vex_vnni() => return self.dot8_vex::<1>(c, row),
                    (Isa::Avx2Vnni, Kind::Q8_0) if vex_vnni() => return self.dot8_vex::<2>(c, row),
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_0) => {
                        return self.dot8_vnni::<0>(c, row)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q4_1) => {
                        return self.dot8_vnni::<1>(c, row)
                    }
                    (Isa::Avx2Vnni | Isa::Avx512Vnni, Kind::Q8_0) => {
                        return self.dot8_vnni::<2>(c, row)
                    }
                    (Isa::Avx2, Kind::Q4_0) => return self.dot8_avx2::<0>(c, row),
                    (Isa::Avx2, Kind::Q4_1) => return self.dot8_avx2::<1>(c, row),
                    (Isa::Avx2, Kind::Q8_0) => return self.dot8_avx2::<2>(c, row),
                    (Isa::Scalar, _) => {}
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(isa, Isa::Neon | Isa::NeonDot) {
            return self.tile_neon::<1, 8>(isa, c, [row]).map(|[y]| y);
        }
        let _ = isa;
        std::array::from_fn(|j| self.dot_lanes(c + j, row))
    }

    /// `out[r * ldo + c] = x_r · w_c` for every row `r` of `x` and column `c` of the
    /// weight. Columns are split across the thread pool; each task runs all rows over
    /// its columns, so a weight row is read from memory once per call.
    pub fn matmul_into(&self, x: &QActs, out: &mut [f32], ldo: usize) {
        self.matmul_into_isa(isa(), x, out, ldo)
    }

    /// [`QWeight::matmul_into`] at a chosen level (at most [`isa()`]), for tests and benches.
    pub fn matmul_into_isa(&self, isa: Isa, x: &QActs, out: &mut [f32], ldo: usize) {
        assert!(isa_available(isa), "{isa:?} is not supported by this CPU");
        let (m, n) = (x.m, self.n);
        assert_eq!(
            x.k, self.k,
            "matmul: activation width differs from the weight's"
        );
        assert!(ldo >= n && (m == 0 || out.len() >= (m - 1) * ldo + n));
        if m == 0 {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        let chunk = n.div_ceil(threads * 4).next_multiple_of(8);
        let ptr = OutPtr(out.as_mut_ptr());
        let tasks = n.div_ceil(chunk);
        let run = |ci: usize| {
            let c0 = ci * chunk;
            self.cols(isa, x, c0, (c0 + chunk).min(n), ptr, ldo);
        };
        if tasks == 1 {
            run(0);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }

    /// Columns `c0..c1` for every row: on x86 from two rows on the multi-row kernel of
    /// the level, otherwise in tiles of rows that stay in L1: four rows by two columns
    /// at a time where there are four rows, else one row by eight columns.
    pub(super) fn cols(&self, isa: Isa, x: &QActs, c0: usize, c1: usize, out: OutPtr, ldo: usize) {
        #[cfg(target_arch = "x86_64")]
        if x.m >= 2 {
            // SAFETY: the CPU has the features of `isa` (checked by the caller), `c0` is
            // a multiple of 8 and the output range was checked in `matmul_into_isa`.
            if isa == Isa::Avx512Vnni {
                return unsafe { self.cols_zmm(x, c0, c1, out, ldo) };
            }
            if isa == Isa::Avx2Vnni && vex_vnni() {
                return unsafe { self.cols_vex(x, c0, c1, out, ldo) };
            }
            if isa == Isa::Avx2Vnni {
                return unsafe { self.cols_vnni(x, c0, c1, out, ldo) };
            }
            if isa == Isa::Avx2 {
                return unsafe { self.cols_avx2(x, c0, c1, out, ldo) };
            }
        }
        const ROW_TILE: usize = 32;
        // SAFETY (every write below): in bounds (checked in matmul_into), and the
        // columns c0..c1 belong to this task alone.
        let put = |r: usize, c: usize, v: f32| unsafe { out.write(r * ldo + c, v) };
        for r0 in (0..x.m).step_by(ROW_TILE) {
            let r1 = (r0 + ROW_TILE).min(x.m);
            let mut c = c0;
            while c < c1 {
                let wide = if r1 - r0 >= 4 { 2 } else { 8 };
                let cw = if c + wide <= c1 { wide } else { 1 };
                let mut r = r0;
                while r + 4 <= r1 {
                    let rows = [x.row(r), x.row(r + 1), x.row(r + 2), x.row(r + 3)];
                    if cw == 2 {
                        let v = self.dot_tile::<4, 2>(isa, c, rows);
                        for (j, col) in v.iter().enumerate() {
                            for (i, &y) in col.iter().enumerate() {
                                put(r + i, c + j, y);
                            }
                        }
                    } else {
                        let [col] = self.dot_tile::<4, 1>(isa, c, rows);
                        for (i, &y) in col.iter().enumerate() {
                            put(r + i, c, y);
                        }
                    }
                    r += 4;
                }
                while r < r1 {
                    if cw == 8 {
                        let v = self.dot_row8(isa, c, x.row(r));
                        for (j, &y) in v.iter().enumerate() {
                            put(r, c + j, y);
                        }
                    } else {
                        for j in 0..cw {
                            let [[y]] = self.dot_tile::<1, 1>(isa, c + j, [x.row(r)]);
                            put(r, c + j, y);
                        }
                    }
                    r += 1;
                }
                c += cw;
            }
        }
    }

    /// Row `r` of `x` against columns `c0..c1` (`c0` a multiple of 8), eight at a time.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn one_row(
        &self,
        isa: Isa,
        x: &QActs,
        r: usize,
        c0: usize,
        c1: usize,
        out: OutPtr,
        ldo: usize,
    ) {
        let row = x.row(r);
        let mut c = c0;
        while c + 8 <= c1 {
            for (j, &y) in self.dot_row8(isa, c, row).iter().enumerate() {
                // SAFETY: in bounds (checked in matmul_into_isa); the columns are this task's.
                unsafe { out.write(r * ldo + c + j, y) };
            }
            c += 8;
        }
        while c < c1 {
            let [[y]] = self.dot_tile::<1, 1>(isa, c, [row]);
            // SAFETY: as above.
            unsafe { out.write(r * ldo + c, y) };
            c += 1;
        }
    }

    /// `x (m, k)` times the transposed weight: `(m, n)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        tensor_matmul(
            x,
            self.n,
            self.k,
            |a: &mut QActs, xs, k| a.quantize(xs, k),
            |a, out| self.matmul_into(a, out, self.n),
        )
    }
}

//! The 256-bit x86 kernels of Q4_0, Q4_1 and Q8_0: one-row dot products with AVX2 (and
//! VNNI's `vpdpbusd` where present, in its AVX512-VL or its AVX-VNNI encoding), and the
//! multi-row VNNI tiles for batched decode and prefill (the plain-AVX2 ones are in
//! `avx2_rows.rs`). Bit-identical to [`QWeight::dot_lanes`].

use super::*;

/// Per-thread buffers of the multi-row kernels (these VNNI tiles and the plain-AVX2
/// ones of `avx2_rows.rs`): the activation-side corrections and the `d_w * d_y`
/// products of one tile, reused between calls.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
pub(super) struct TileScratch {
    pub(super) corr: Vec<i32>,
    pub(super) dd: Vec<f32>,
    /// The plain-AVX2 tiles' activation scales `d` (then Q4_1's `s`), `[b][r]`.
    pub(super) rs: Vec<f32>,
    /// The plain-AVX2 tiles' activation blocks, `[b][r][32]`.
    pub(super) ys: Vec<i8>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    pub(super) static TILE_SCRATCH: std::cell::RefCell<TileScratch> =
        std::cell::RefCell::new(TileScratch::default());
}

/// [`hsum8`] of eight vectors at once: lane `k` of the result is `hsum8` of `a[k]`, the
/// same additions in the same pairing (float addition is commutative, so only the
/// grouping matters): `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`. Fourteen shuffles and
/// seven vector additions instead of about ten scalar operations per sum.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(in crate::engine::kernels) unsafe fn hsum8x8(a: [std::arch::x86_64::__m256; 8]) -> [f32; 8] {
    use std::arch::x86_64::*;
    // [l0+l4, l1+l5, l2+l6, l3+l7] of a[k] in the low half, of a[k + 4] in the high.
    let t: [__m256; 4] = std::array::from_fn(|k| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a[k], a[k + 4]),
            _mm256_permute2f128_ps::<0x31>(a[k], a[k + 4]),
        )
    });
    // Per half: [(l0+l4)+(l2+l6), (l1+l5)+(l3+l7)] of two vectors.
    let u = |x: __m256, y: __m256| {
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
        )
    };
    let (u01, u23) = (u(t[0], t[1]), u(t[2], t[3]));
    let r = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(u01, u23),
        _mm256_shuffle_ps::<0b11_01_11_01>(u01, u23),
    );
    let mut out = [0f32; 8];
    // SAFETY: `out` holds eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), r) };
    out
}

/// The [`hsum8`] of every accumulator of an `R` x `C` tile, `[i][j]`, eight at a time
/// through [`hsum8x8`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_sums<const R: usize, const C: usize>(
    acc: &[[std::arch::x86_64::__m256; C]; R],
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let mut out = [[0f32; C]; R];
    for k0 in (0..R * C).step_by(8) {
        let v: [__m256; 8] = std::array::from_fn(|k| match k0 + k {
            kk if kk < R * C => acc[kk / C][kk % C],
            _ => _mm256_setzero_ps(),
        });
        // SAFETY: the features were checked by the caller (this function's own).
        let s = unsafe { hsum8x8(v) };
        for (k, &x) in s.iter().enumerate().take((R * C - k0).min(8)) {
            out[(k0 + k) / C][(k0 + k) % C] = x;
        }
    }
    out
}

/// Several activation rows at once with VNNI (decode steps of several sequences, and
/// prefill). Per (row, column, block) the work is one `vpdpbusd`, one conversion and
/// one FMA: everything that depends on only the row or only the column is hoisted.
///
/// * The weights are the unsigned operand of `vpdpbusd` for every kind: Q4_1 nibbles
///   as they are, Q4_0 nibbles without their `- 8`, Q8_0 bytes plus 128 (`^ 0x80`). The
///   offset comes back through the accumulator's start value, `-off * (sum of four
///   activations)` per lane, which depends on the row and block only. All of it is
///   exact integer arithmetic, so each lane holds the same four-product sum as
///   [`QWeight::dot_lanes`] (no saturation: `vpdpbusd` adds in 32 bits).
/// * The scale products `d_w * d_y` of eight columns are formed once per block and row
///   (one vector multiply, the same f32 products as the scalar code) and read back as
///   broadcasts; Q4_1's `m * s` chains run eight columns to a vector.
///
/// So the FMAs, their order and the final horizontal sum are those of `dot_lanes`.
///
/// One instance per encoding of 256-bit `vpdpbusd`: EVEX (AVX512-VNNI + VL, 32
/// registers) and VEX (AVX-VNNI: Intel cores from Alder Lake on, AMD Zen 5; 16
/// registers). `$acc` is how many accumulators a tile may hold: with 16 registers
/// eight rows take one column at a time.
macro_rules! vnni_rows {
    ($cols:ident, $cols_k:ident, $rows:ident, $pair:ident, $feat:literal, $dp:ident, $acc:literal) => {
        #[cfg(target_arch = "x86_64")]
        impl QWeight {
            /// # Safety
            /// The features of `$feat` are available; `c0 % 8 == 0`, `c1 <= n`, and the
            /// output holds every row at stride `ldo` for columns `c0..c1`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $cols(
                &self,
                x: &QActs,
                c0: usize,
                c1: usize,
                out: OutPtr,
                ldo: usize,
            ) {
                unsafe {
                    match self.kind {
                        Kind::Q4_0 => self.$cols_k::<0>(x, c0, c1, out, ldo),
                        Kind::Q4_1 => self.$cols_k::<1>(x, c0, c1, out, ldo),
                        Kind::Q8_0 => self.$cols_k::<2>(x, c0, c1, out, ldo),
                    }
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn $cols_k<const K: u8>(
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
                    let mut s = s.borrow_mut();
                    let s = &mut *s;
                    if s.corr.len() < nbk * 8 * 8 {
                        s.corr.resize(nbk * 8 * 8, 0);
                        s.dd.resize(nbk * 8 * 8, 0.0);
                    }
                    let mut r = 0;
                    while r < x.m {
                        let left = x.m - r;
                        // SAFETY: as for this function; the scratch holds nbk * 8 * 8 values.
                        unsafe {
                            if left >= 8 {
                                self.$rows::<K, 8>(x, r, c0, c1, s, out, ldo);
                                r += 8;
                            } else if left >= 4 {
                                self.$rows::<K, 4>(x, r, c0, c1, s, out, ldo);
                                r += 4;
                            } else if left >= 2 {
                                self.$rows::<K, 2>(x, r, c0, c1, s, out, ldo);
                                r += 2;
                            } else {
                                self.$rows::<K, 1>(x, r, c0, c1, s, out, ldo);
                                r += 1;
                            }
                        }
                    }
                })
            }

            /// Rows `r0..r0 + R` against columns `c0..c1`, eight columns (one scale group) at a time.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $feat)]
            unsafe fn $rows<const K: u8, const R: usize>(
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
                    use std::arch::x86_64::*;
                    let nbk = self.k / QK;
                    let rows: [Row<'_>; R] = std::array::from_fn(|i| x.row(r0 + i));
                    // Accumulator start values, `[b][r]` (eight lanes each): -off * four-sums of y.
                    let corr = s.corr.as_mut_ptr();
                    if K != 1 {
                        let off = _mm256_set1_epi8(if K == 0 { 8 } else { -128 });
                        for b in 0..nbk {
                            for (i, row) in rows.iter().enumerate() {
                                let y = _mm256_loadu_si256(
                                    row.qs.as_ptr().add(b * QK) as *const __m256i
                                );
                                let sum = $dp(_mm256_setzero_si256(), off, y);
                                let neg = _mm256_sub_epi32(_mm256_set1_epi32(MAGIC_BITS), sum);
                                _mm256_storeu_si256(corr.add((b * R + i) * 8) as *mut __m256i, neg);
                            }
                        }
                    }
                    let dd = s.dd.as_mut_ptr();
                    let mut g = c0;
                    while g < c1 {
                        let cols = (c1 - g).min(8);
                        // Scale products `[b][r][column in group]`, and Q4_1's `m * s` sums.
                        let mut summs = [_mm256_setzero_ps(); R];
                        for b in 0..nbk {
                            let si = self.sc(g, b);
                            let dw = _mm256_loadu_ps(self.d.as_ptr().add(si));
                            let mw = if K == 1 {
                                _mm256_loadu_ps(self.m.as_ptr().add(si))
                            } else {
                                _mm256_setzero_ps()
                            };
                            for (i, row) in rows.iter().enumerate() {
                                let p = _mm256_mul_ps(dw, _mm256_set1_ps(*row.d.get_unchecked(b)));
                                _mm256_storeu_ps(dd.add((b * R + i) * 8), p);
                                if K == 1 {
                                    summs[i] = _mm256_fmadd_ps(
                                        mw,
                                        _mm256_set1_ps(*row.s.get_unchecked(b)),
                                        summs[i],
                                    );
                                }
                            }
                        }
                        let mut sm = [[0f32; 8]; R];
                        for (i, v) in summs.iter().enumerate() {
                            _mm256_storeu_ps(sm[i].as_mut_ptr(), *v);
                        }
                        let mut j = 0;
                        if R * 2 <= $acc {
                            while j + 2 <= cols {
                                self.$pair::<K, R, 2>(&rows, g, j, corr, dd, &sm, out, r0, ldo);
                                j += 2;
                            }
                        }
                        while j < cols {
                            self.$pair::<K, R, 1>(&rows, g, j, corr, dd, &sm, out, r0, ldo);
                            j += 1;
                        }
                        g += 8;
                    }
                }
            }

            /// Columns `g + j0 .. g + j0 + C` of the group starting at `g`, for the `R` rows.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn $pair<const K: u8, const R: usize, const C: usize>(
                &self,
                rows: &[Row<'_>; R],
                g: usize,
                j0: usize,
                corr: *const i32,
                dd: *const f32,
                sm: &[[f32; 8]; R],
                out: OutPtr,
                r0: usize,
                ldo: usize,
            ) {
                unsafe {
                    use std::arch::x86_64::*;
                    let nbk = self.k / QK;
                    let qs = self.qs.as_ptr();
                    let low = _mm256_set1_epi8(0x0F);
                    let flip = _mm256_set1_epi8(-128);
                    let magic_i = _mm256_set1_epi32(MAGIC_BITS);
                    let magic = _mm256_castsi256_ps(magic_i);
                    let mut acc = [[_mm256_setzero_ps(); C]; R];
                    for b in 0..nbk {
                        let mut ws = [_mm256_setzero_si256(); C];
                        for (j, w) in ws.iter_mut().enumerate() {
                            let wb = (g + j0 + j) * nbk + b;
                            *w = if K == 2 {
                                _mm256_xor_si256(
                                    _mm256_loadu_si256(qs.add(wb * QK) as *const __m256i),
                                    flip,
                                )
                            } else {
                                let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low)
                            };
                        }
                        for (i, row) in rows.iter().enumerate() {
                            let y =
                                _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                            let start = if K == 1 {
                                magic_i
                            } else {
                                _mm256_loadu_si256(corr.add((b * R + i) * 8) as *const __m256i)
                            };
                            for (j, w) in ws.iter().enumerate() {
                                let sum = $dp(start, *w, y);
                                let d = _mm256_set1_ps(*dd.add((b * R + i) * 8 + j0 + j));
                                let a = acc.get_unchecked_mut(i).get_unchecked_mut(j);
                                // The lane sums sit in the low mantissa bits of MAGIC: one
                                // subtraction yields them as exact floats (cheaper than vcvtdq2ps).
                                let f = _mm256_sub_ps(_mm256_castsi256_ps(sum), magic);
                                *a = _mm256_fmadd_ps(d, f, *a);
                            }
                        }
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
    };
}

vnni_rows!(
    cols_vnni,
    cols_vnni_k,
    rows_vnni,
    pair_vnni,
    "avx2,fma,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32,
    16
);
vnni_rows!(
    cols_vex,
    cols_vex_k,
    rows_vex,
    pair_vex,
    "avx2,fma,avxvnni",
    _mm256_dpbusd_avx_epi32,
    8
);

/// The x86 kernels: `K` is the weight kind (0 Q4_0, 1 Q4_1, 2 Q8_0), `R` the number of
/// activation rows sharing one unpacked weight block. With VNNI one `vpdpbusd` replaces
/// `vpmaddubsw` + `vpmaddwd`; the integer sums are the same (no i16 saturation is
/// possible: |w| <= 15 or 128, |y| <= 127, so a pair sums to at most 32512).
macro_rules! x86_dot {
    ($name:ident, $name8:ident, $feat:literal, $vnni:expr, $dp:ident) => {
        #[cfg(target_arch = "x86_64")]
        impl QWeight {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const K: u8, const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [Row<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    use std::arch::x86_64::*;
                    let nbk = self.k / QK;
                    let mut acc = [[_mm256_setzero_ps(); R]; C];
                    let mut summs = [[0f32; R]; C];
                    let ones = _mm256_set1_epi16(1);
                    let low = _mm256_set1_epi8(0x0F);
                    let off8 = _mm256_set1_epi8(8);
                    let qs = self.qs.as_ptr();
                    for b in 0..nbk {
                        let mut ws = [_mm256_setzero_si256(); C];
                        for (j, w) in ws.iter_mut().enumerate() {
                            let wb = (c + j) * nbk + b;
                            *w = if K == 2 {
                                _mm256_loadu_si256(qs.add(wb * QK) as *const __m256i)
                            } else {
                                let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                                let q = _mm256_and_si256(
                                    _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
                                    low,
                                );
                                if K == 0 {
                                    _mm256_sub_epi8(q, off8)
                                } else {
                                    q
                                }
                            };
                        }
                        for r in 0..R {
                            let row = rows.get_unchecked(r);
                            let yq =
                                _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                            let dy = *row.d.get_unchecked(b);
                            for j in 0..C {
                                let w = ws[j];
                                // Q4_1 nibbles are unsigned already; signed weights move their
                                // sign onto the activations so `maddubs` sees |w| (ggml's trick).
                                let (ax, sy) = if K == 1 {
                                    (w, yq)
                                } else {
                                    (_mm256_sign_epi8(w, w), _mm256_sign_epi8(yq, w))
                                };
                                let sum = if $vnni {
                                    $dp(_mm256_setzero_si256(), ax, sy)
                                } else {
                                    _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy))
                                };
                                let si = self.sc(c + j, b);
                                let dd = _mm256_set1_ps(*self.d.get_unchecked(si) * dy);
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), *a);
                                if K == 1 {
                                    let s = summs.get_unchecked_mut(j).get_unchecked_mut(r);
                                    *s = self
                                        .m
                                        .get_unchecked(si)
                                        .mul_add(*row.s.get_unchecked(b), *s);
                                }
                            }
                        }
                    }
                    let mut out = [[0f32; R]; C];
                    for j in 0..C {
                        for r in 0..R {
                            let mut lanes = [0f32; 8];
                            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][r]);
                            out[j][r] = hsum8(lanes) + summs[j][r];
                        }
                    }
                    out
                }
            }

            /// One activation row against the eight columns `c..c + 8` (`c % 8 == 0`):
            /// the eight `d_w * d_y` products and Q4_1's eight `m * s` chains are
            /// vector lanes (the same products and FMAs as the scalar ones, per lane).
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name8<const K: u8>(&self, c: usize, row: Row<'_>) -> [f32; 8] {
                unsafe {
                    use std::arch::x86_64::*;
                    let nbk = self.k / QK;
                    let mut acc = [_mm256_setzero_ps(); 8];
                    let mut summs = _mm256_setzero_ps();
                    let ones = _mm256_set1_epi16(1);
                    let low = _mm256_set1_epi8(0x0F);
                    let off8 = _mm256_set1_epi8(8);
                    let qs = self.qs.as_ptr();
                    // The next eight columns' weights (one contiguous region), prefetched a
                    // share per block: the loads of this group are spread over eight
                    // streams, too many for the hardware prefetcher to run far ahead.
                    let bsz = if K == 2 { QK } else { QK / 2 };
                    let next = qs.wrapping_add((c + 8) * nbk * bsz);
                    let lines = 8 * nbk * bsz / 64;
                    let mut line = 0;
                    for b in 0..nbk {
                        while line * nbk < (b + 1) * lines {
                            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64) as *const i8);
                            line += 1;
                        }
                        let yq = _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                        let si = self.sc(c, b);
                        let dd8 = _mm256_mul_ps(
                            _mm256_loadu_ps(self.d.as_ptr().add(si)),
                            _mm256_set1_ps(*row.d.get_unchecked(b)),
                        );
                        if K == 1 {
                            summs = _mm256_fmadd_ps(
                                _mm256_loadu_ps(self.m.as_ptr().add(si)),
                                _mm256_set1_ps(*row.s.get_unchecked(b)),
                                summs,
                            );
                        }
                        for (j, a) in acc.iter_mut().enumerate() {
                            let wb = (c + j) * nbk + b;
                            let w = if K == 2 {
                                _mm256_loadu_si256(qs.add(wb * QK) as *const __m256i)
                            } else {
                                let t = _mm_loadu_si128(qs.add(wb * 16) as *const __m128i);
                                let q = _mm256_and_si256(
                                    _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
                                    low,
                                );
                                if K == 0 {
                                    _mm256_sub_epi8(q, off8)
                                } else {
                                    q
                                }
                            };
                            let (ax, sy) = if K == 1 {
                                (w, yq)
                            } else {
                                (_mm256_sign_epi8(w, w), _mm256_sign_epi8(yq, w))
                            };
                            let sum = if $vnni {
                                $dp(_mm256_setzero_si256(), ax, sy)
                            } else {
                                _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy))
                            };
                            let dd = _mm256_permutevar8x32_ps(dd8, _mm256_set1_epi32(j as i32));
                            *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), *a);
                        }
                    }
                    let mut sm = [0f32; 8];
                    _mm256_storeu_ps(sm.as_mut_ptr(), summs);
                    let mut out = [0f32; 8];
                    for j in 0..8 {
                        let mut lanes = [0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j]);
                        out[j] = hsum8(lanes) + sm[j];
                    }
                    out
                }
            }
        }
    };
}

x86_dot!(dot_avx2, dot8_avx2, "avx2,fma", false, _mm256_dpbusd_epi32);
x86_dot!(
    dot_vnni,
    dot8_vnni,
    "avx2,fma,avx512vnni,avx512vl",
    true,
    _mm256_dpbusd_epi32
);
x86_dot!(
    dot_vex,
    dot8_vex,
    "avx2,fma,avxvnni",
    true,
    _mm256_dpbusd_avx_epi32
);

//! Q5_0 weights (32 values per block: f16 scale, 16 bytes of low nibbles, 32 high
//! bits) against activations quantized to Q8_0 — ggml's `vec_dot_q5_0_q8_0`, whose
//! x86 arithmetic is Q4_0's with a fifth bit: each block's 32 integer products are
//! summed in eight lanes of four, scaled by `d_w * d_y` with one fused multiply-add per
//! lane, and the lanes added by `hsum_float_8` at the end. [`Q5Weight::dot_lanes`] is
//! that order; the AVX2/VNNI tiles below, the 512-bit multi-row kernels in
//! `q5_0_zmm.rs` and the NEON ones in `q5_0_neon.rs` equal it bit for bit.
//!
//! Must not depend on anything outside `quant`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use super::drive::{self, Tiled};
use super::{f16_at, hsum8, isa, isa_available, Isa, QActs, Row, QK};

/// One Q5_0 weight matrix `(n, k)`, blocks of column `c` at `c * k / 32 ..`.
#[derive(Debug)]
pub struct Q5Weight {
    n: usize,
    k: usize,
    d: Vec<f32>,
    qh: Vec<u32>,
    /// 16 bytes of nibbles per block: element `j` low, element `j + 16` high.
    qs: Vec<u8>,
}

impl Q5Weight {
    /// Repack a GGUF tensor; None unless it is a Q5_0 matrix.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q5_0 {
            return Ok(None);
        }
        let (n, k) = t.shape().dims2()?;
        if !k.is_multiple_of(QK) {
            return Ok(None);
        }
        let raw = t.data()?;
        let nb = n * k / QK;
        if raw.len() != nb * 22 {
            candle_core::bail!("Q5_0 tensor has {} bytes, expected {}", raw.len(), nb * 22);
        }
        let mut w = Q5Weight {
            n,
            k,
            d: Vec::with_capacity(nb),
            qh: Vec::with_capacity(nb),
            qs: Vec::with_capacity(nb * 16),
        };
        for blk in raw.chunks_exact(22) {
            w.d.push(f16_at(blk, 0));
            w.qh.push(u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]));
            w.qs.extend_from_slice(&blk[6..22]);
        }
        Ok(Some(w))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The signed 5-bit values of block `wb`.
    fn values(&self, wb: usize) -> [i32; QK] {
        let q = &self.qs[wb * 16..wb * 16 + 16];
        let h = self.qh[wb];
        std::array::from_fn(|j| {
            let nib = if j < 16 { q[j] & 0x0F } else { q[j - 16] >> 4 } as i32;
            nib | (((h >> j) & 1) as i32) << 4
        })
        .map(|v| v - 16)
    }

    /// Portable reference of one dot product, lane for lane as ggml's AVX2 kernel.
    fn dot_lanes(&self, c: usize, x: Row<'_>) -> f32 {
        let nbk = self.k / QK;
        let mut acc = [0f32; 8];
        for b in 0..nbk {
            let w = self.values(c * nbk + b);
            let y = &x.qs[b * QK..b * QK + QK];
            let dd = self.d[c * nbk + b] * x.d[b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (4 * lane..4 * lane + 4).map(|e| w[e] * y[e] as i32).sum();
                *a = dd.mul_add(s as f32, *a);
            }
        }
        hsum8(acc)
    }

    /// `out[r * ldo + c] = x_r · w_c` (activations quantized by [`QActs::quantize`]).
    pub fn matmul_into(&self, x: &QActs, out: &mut [f32], ldo: usize) {
        self.matmul_into_isa(isa(), x, out, ldo)
    }

    /// [`Q5Weight::matmul_into`] at a chosen level (at most [`isa()`]).
    pub fn matmul_into_isa(&self, level: Isa, x: &QActs, out: &mut [f32], ldo: usize) {
        assert!(isa_available(level), "{level:?} is not supported");
        assert_eq!(
            x.k, self.k,
            "matmul: activation width differs from the weight's"
        );
        #[cfg(target_arch = "x86_64")]
        if level == Isa::Avx512Vnni && x.m >= 2 {
            // SAFETY: the CPU has AVX-512 VNNI (checked above) and the widths agree.
            return unsafe { super::pairs::matmul(self, self.n, x, out, ldo) };
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(level, Isa::Avx2 | Isa::Avx2Vnni) && x.m >= drive::PANEL_MIN_ROWS {
            return drive::matmul_panels(self, level, self.n, x.m, |r| x.row(r), out, ldo);
        }
        drive::matmul(self, level, self.n, x.m, |r| x.row(r), out, ldo);
    }

    /// `x (m, k)` times the transposed weight: `(m, n)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        super::tensor_matmul(
            x,
            self.n,
            self.k,
            |a: &mut QActs, xs, k| a.quantize(xs, k),
            |a, out| self.matmul_into(a, out, self.n),
        )
    }
}

impl Tiled for Q5Weight {
    type Row<'a> = Row<'a>;

    #[inline]
    fn tile<const R: usize, const C: usize>(
        &self,
        level: Isa,
        c: usize,
        rows: [Row<'_>; R],
    ) -> [[f32; R]; C] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `level` is at most `isa()`, so the CPU has what each kernel
            // enables; `c + C <= n` and the rows have `k` values (checked by the driver
            // and `matmul_into_isa`).
            unsafe {
                match level {
                    Isa::Avx2Vnni if super::vex_vnni() => return self.tile_vex::<R, C>(c, rows),
                    Isa::Avx2Vnni | Isa::Avx512Vnni => return self.tile_vnni::<R, C>(c, rows),
                    Isa::Avx2 => return self.tile_avx2::<R, C>(c, rows),
                    Isa::Scalar => {}
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // SAFETY: as above; NeonDot means the CPU has dotprod.
            unsafe {
                match level {
                    Isa::NeonDot => return self.tile_sdot::<R, C>(c, rows),
                    Isa::Neon => return self.tile_smull::<R, C>(c, rows),
                    _ => {}
                }
            }
        }
        let _ = level;
        std::array::from_fn(|j| rows.map(|r| self.dot_lanes(c + j, r)))
    }

    fn prefetch(&self, c0: usize, c1: usize) {
        let nb = self.k / QK;
        drive::prefetch_bytes(
            self.qs.as_ptr().wrapping_add(c0 * nb * 16),
            (c1 - c0) * nb * 16,
        );
        drive::prefetch_bytes(self.qh.as_ptr().wrapping_add(c0 * nb), (c1 - c0) * nb * 4);
        drive::prefetch_bytes(self.d.as_ptr().wrapping_add(c0 * nb), (c1 - c0) * nb * 4);
    }
}

/// Block `wb`'s 32 values minus 16, as signed bytes (AVX2): nibbles as in Q4_0, the
/// fifth bit spread to bytes like ggml's `bytes_from_bits_32`, and `0xF0` or-ed in where
/// it is clear, which is `value - 16` in two's complement.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack_x86(w: &Q5Weight, wb: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    unsafe {
        let t = _mm_loadu_si128(w.qs.as_ptr().add(wb * 16) as *const __m128i);
        let nib = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
            _mm256_set1_epi8(0x0F),
        );
        let h = _mm256_set1_epi32(*w.qh.get_unchecked(wb) as i32);
        let spread = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        );
        let bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
        let set = _mm256_cmpeq_epi8(
            _mm256_or_si256(_mm256_shuffle_epi8(h, spread), bit),
            _mm256_set1_epi8(-1),
        );
        _mm256_or_si256(
            nib,
            _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
        )
    }
}

/// Up to two columns unpacked for the panel kernels: per column and block, `|w|` then
/// `w` (32 signed bytes each, as [`unpack_x86`] gives them) and the scale in eight
/// lanes (a load, where a scalar would cost the kernel a multiply and a broadcast per
/// row and column).
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Default)]
pub(super) struct Q5Panel {
    nbk: usize,
    bytes: Vec<[u8; 64]>,
    d: Vec<[f32; 8]>,
}

#[cfg(target_arch = "x86_64")]
impl drive::Paneled for Q5Weight {
    type Row<'a> = Row<'a>;
    type Panel = Q5Panel;

    fn unpack(&self, level: Isa, c: usize, cw: usize, p: &mut Q5Panel) {
        assert!(level != Isa::Scalar && c + cw <= self.n && cw <= 2);
        let nbk = self.k / QK;
        p.nbk = nbk;
        p.bytes.resize(cw * nbk, [0; 64]);
        p.d.clear();
        p.d.extend(self.d[c * nbk..(c + cw) * nbk].iter().map(|&d| [d; 8]));
        for (i, dst) in p.bytes.iter_mut().enumerate() {
            // SAFETY: AVX2 is present at every level above scalar (asserted); the block
            // is in bounds (`c + cw <= n`) and `dst` holds 64 bytes.
            unsafe {
                use std::arch::x86_64::*;
                let w = unpack_x86(self, c * nbk + i);
                _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, _mm256_sign_epi8(w, w));
                _mm256_storeu_si256(dst.as_mut_ptr().add(32) as *mut __m256i, w);
            }
        }
    }

    #[inline]
    fn panel_tile<const R: usize, const C: usize>(
        &self,
        level: Isa,
        p: &Q5Panel,
        rows: [Row<'_>; R],
    ) -> [[f32; R]; C] {
        assert!(level != Isa::Scalar, "the panel kernels need AVX2");
        assert!(p.bytes.len() >= C * p.nbk && p.d.len() >= C * p.nbk);
        assert!(rows.iter().all(|r| r.qs.len() == p.nbk * QK));
        // SAFETY: `level` is at most `isa()` and above scalar (asserted), so the CPU has
        // what each kernel enables; the panel holds `C` columns and the rows `nbk`
        // blocks (asserted).
        unsafe {
            match level {
                Isa::Avx2Vnni if super::vex_vnni() => self.panel_vex::<R, C>(p, rows),
                Isa::Avx2Vnni | Isa::Avx512Vnni => self.panel_vnni::<R, C>(p, rows),
                Isa::Avx2 | Isa::Scalar => self.panel_avx2::<R, C>(p, rows),
            }
        }
    }
}

/// AVX2 (and VNNI) tiles: a block is unpacked once for the `R` rows ([`unpack_x86`]);
/// the sign trick moves the weights' sign onto the activations (`|w| <= 16`, no i16
/// overflow). The panel kernels take the same per-block steps on columns unpacked
/// beforehand.
macro_rules! q5_x86 {
    ($name:ident, $panel:ident, $feat:literal, $vnni:expr, $dp:ident) => {
        #[cfg(target_arch = "x86_64")]
        impl Q5Weight {
            #[target_feature(enable = $feat)]
            unsafe fn $name<const R: usize, const C: usize>(
                &self,
                c: usize,
                rows: [Row<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    use std::arch::x86_64::*;
                    let nbk = self.k / QK;
                    let mut acc = [[_mm256_setzero_ps(); R]; C];
                    let ones = _mm256_set1_epi16(1);
                    for b in 0..nbk {
                        let mut ws = [_mm256_setzero_si256(); C];
                        let mut ds = [0f32; C];
                        for (j, w) in ws.iter_mut().enumerate() {
                            let wb = (c + j) * nbk + b;
                            *w = unpack_x86(self, wb);
                            ds[j] = *self.d.get_unchecked(wb);
                        }
                        for r in 0..R {
                            let row = rows.get_unchecked(r);
                            let yq =
                                _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                            let dy = *row.d.get_unchecked(b);
                            for j in 0..C {
                                let w = ws[j];
                                let ax = _mm256_sign_epi8(w, w);
                                let sy = _mm256_sign_epi8(yq, w);
                                let sum = if $vnni {
                                    $dp(_mm256_setzero_si256(), ax, sy)
                                } else {
                                    _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy))
                                };
                                let dd = _mm256_set1_ps(ds[j] * dy);
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), *a);
                            }
                        }
                    }
                    finish(acc)
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn $panel<const R: usize, const C: usize>(
                &self,
                p: &Q5Panel,
                rows: [Row<'_>; R],
            ) -> [[f32; R]; C] {
                unsafe {
                    use std::arch::x86_64::*;
                    let nbk = p.nbk;
                    let mut acc = [[_mm256_setzero_ps(); R]; C];
                    let ones = _mm256_set1_epi16(1);
                    let bytes = p.bytes.as_ptr() as *const u8;
                    let ds = p.d.as_ptr() as *const f32;
                    for b in 0..nbk {
                        let mut ax = [_mm256_setzero_si256(); C];
                        for (j, a) in ax.iter_mut().enumerate() {
                            *a =
                                _mm256_loadu_si256(bytes.add((j * nbk + b) * 64) as *const __m256i);
                        }
                        for r in 0..R {
                            let row = rows.get_unchecked(r);
                            let yq =
                                _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                            let dy = _mm256_set1_ps(*row.d.get_unchecked(b));
                            for j in 0..C {
                                let w = _mm256_loadu_si256(
                                    bytes.add((j * nbk + b) * 64 + 32) as *const __m256i
                                );
                                let sy = _mm256_sign_epi8(yq, w);
                                let sum = if $vnni {
                                    $dp(_mm256_setzero_si256(), ax[j], sy)
                                } else {
                                    _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax[j], sy))
                                };
                                let dd =
                                    _mm256_mul_ps(_mm256_loadu_ps(ds.add((j * nbk + b) * 8)), dy);
                                let a = acc.get_unchecked_mut(j).get_unchecked_mut(r);
                                *a = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sum), *a);
                            }
                        }
                    }
                    finish(acc)
                }
            }
        }
    };
}

/// The accumulators' lanes added in ggml's `hsum_float_8` order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
unsafe fn finish<const R: usize, const C: usize>(
    acc: [[std::arch::x86_64::__m256; R]; C],
) -> [[f32; R]; C] {
    let mut out = [[0f32; R]; C];
    for j in 0..C {
        for r in 0..R {
            let mut lanes = [0f32; 8];
            // SAFETY: AVX is enabled; `lanes` holds eight floats.
            unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][r]) };
            out[j][r] = hsum8(lanes);
        }
    }
    out
}

q5_x86!(
    tile_avx2,
    panel_avx2,
    "avx2,fma",
    false,
    _mm256_dpbusd_epi32
);
q5_x86!(
    tile_vnni,
    panel_vnni,
    "avx2,fma,avx512vnni,avx512vl",
    true,
    _mm256_dpbusd_epi32
);
q5_x86!(
    tile_vex,
    panel_vex,
    "avx2,fma,avxvnni",
    true,
    _mm256_dpbusd_avx_epi32
);

#[cfg(target_arch = "x86_64")]
mod zmm;

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Within activation-quantization error of the dequantized weights (and of
    /// candle's own Q5_0 path), on odd shapes.
    #[test]
    fn q5_0_matches_dequantized_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (m, n, k) in [(1, 67, 64), (3, 130, 96), (7, 5, 32), (5, 9, 896)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let q = QTensor::quantize(&w, GgmlDType::Q5_0)?;
            let ours = Q5Weight::from_qtensor(&q)?.expect("q5_0");
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let got = ours.matmul(&x)?;
            let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < 0.03 * scale.max(1.0) + 0.1,
                "{m}x{n}x{k}: err {err} (scale {scale})"
            );
            let theirs = candle_core::quantized::QMatMul::from_qtensor(q)?.forward(&x)?;
            let d2 = (&got - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d2 < 0.03 * scale.max(1.0) + 0.1, "vs candle {d2}");
        }
        Ok(())
    }

    /// Every SIMD level of this CPU equals the portable lane emulation bit for bit,
    /// through every tile shape of the driver (1..9 rows, odd column counts).
    #[test]
    fn q5_0_simd_equals_portable_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        // Every row count 1..=9 too (the 512-bit kernels pair rows, four pairs a pass,
        // an odd count pairs its last row with itself, a ninth row takes the one-row
        // tiles).
        let shapes = [
            (1, 37, 256),
            (7, 53, 96),
            (9, 5, 32),
            (4, 130, 544),
            (2, 3, 64),
            (17, 9, 160),
            // More rows than one panel serves (`drive::PANEL_ROWS`), odd widths.
            (70, 7, 64),
        ]
        .into_iter()
        .chain((1..=9).map(|m| (m, 13, 96)));
        for (m, n, k) in shapes {
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * 3.0)?;
            let ours =
                Q5Weight::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q5_0)?)?.expect("q5_0");
            let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &dev)?.to_vec1()?;
            for (i, v) in x.iter_mut().step_by(37).enumerate() {
                *v *= 1e4 * (i as f32 - 1.5);
            }
            let mut acts = QActs::new();
            acts.quantize(&x, k);
            crate::engine::kernels::quant::for_each_simd_kernel(|level| {
                let mut got = vec![f32::NAN; m * (n + 3)];
                ours.matmul_into_isa(level, &acts, &mut got, n + 3);
                for r in 0..m {
                    for c in 0..n {
                        let want = ours.dot_lanes(c, acts.row(r));
                        let g = got[r * (n + 3) + c];
                        assert_eq!(
                            want.to_bits(),
                            g.to_bits(),
                            "{level:?} {m}x{n}x{k} ({r},{c})"
                        );
                    }
                }
            });
        }
        Ok(())
    }
}

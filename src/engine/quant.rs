//! Quantized matrix-vector kernels for the GGUF block types our models use most
//! (Q4_0, Q4_1, Q8_0), with activations quantized exactly the way ggml's x86 path does
//! it (Q8_0/Q8_1 blocks, scale `amax/127`, inverse `127/amax`, round-half-even, `s`
//! rounded once). Matching ggml's arithmetic is what makes greedy outputs equal
//! llama.cpp's on small, sensitive models; candle's generic path rounds differently.
//!
//! Weights are repacked at load into a struct-of-arrays layout (scales as f32) so the
//! inner loop is integer multiply-adds that the compiler vectorises. Other types fall
//! back to candle's `QMatMul` (see `model.rs`).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

/// One weight matrix `(n, k)`: row `c` produces output column `c`.
#[derive(Debug)]
pub struct QWeight {
    kind: Kind,
    n: usize,
    k: usize,
    /// Per block scale `d` (and `m` for Q4_1), as f32.
    d: Vec<f32>,
    m: Vec<f32>,
    /// Q4: 16 bytes of nibbles per block; Q8_0: 32 signed bytes per block (as u8).
    qs: Vec<u8>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `hsum_float_8`: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
#[inline]
fn hsum8(l: [f32; 8]) -> f32 {
    let r = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Activations of one row quantized to 8 bits per block.
pub struct QRow {
    d: Vec<f32>,
    /// `d * sum(qs)` rounded to f16 (only used against Q4_1).
    s: Vec<f32>,
    qs: Vec<i8>,
}

/// ggml's `quantize_row_q8_0`/`q8_1` (x86 flavour).
pub fn quantize_row(x: &[f32]) -> QRow {
    let nb = x.len() / QK;
    let mut out = QRow {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        qs: vec![0; nb * QK],
    };
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (j, v) in xs.iter().enumerate() {
            let q = (v * id).round_ties_even() as i32;
            out.qs[b * QK + j] = q as i8;
            sum += q;
        }
        out.d.push(f16::from_f32(d).to_f32());
        out.s.push(f16::from_f32(d * sum as f32).to_f32());
    }
    out
}

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
        let mut w = QWeight {
            kind,
            n,
            k,
            d: Vec::with_capacity(nb),
            m: Vec::new(),
            qs: Vec::with_capacity(nb * qlen),
        };
        for blk in raw.chunks_exact(bsz) {
            w.d.push(f16_at(blk, 0));
            let q0 = match kind {
                Kind::Q4_1 => {
                    w.m.push(f16_at(blk, 2));
                    4
                }
                _ => 2,
            };
            w.qs.extend_from_slice(&blk[q0..q0 + qlen]);
        }
        Ok(Some(w))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Dot product of weight row `c` with a quantized activation row, summed exactly as
    /// ggml's AVX2 kernels sum it: eight f32 lanes (lane i takes block elements 4i..4i+3),
    /// each block added with a fused multiply-add, then a fixed horizontal sum; Q4_1's
    /// `m * s` terms go into a separate scalar. The AVX2 path and the scalar path below
    /// produce bit-identical results (tested).
    #[inline]
    fn dot(&self, c: usize, x: &QRow) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { self.dot_avx2(c, x) };
            }
        }
        self.dot_lanes(c, x)
    }

    /// Portable reference with the same lane structure and rounding as the AVX2 path.
    fn dot_lanes(&self, c: usize, x: &QRow) -> f32 {
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
            let dd = self.d[wb] * x.d[b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (4 * lane..4 * lane + 4).map(|e| w[e] * y[e] as i32).sum();
                *a = dd.mul_add(s as f32, *a);
            }
            if self.kind == Kind::Q4_1 {
                summs = self.m[wb].mul_add(x.s[b], summs);
            }
        }
        hsum8(acc) + summs
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(&self, c: usize, x: &QRow) -> f32 {
        use std::arch::x86_64::*;
        let nbk = self.k / QK;
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let off8 = _mm256_set1_epi8(8);
        for b in 0..nbk {
            let wb = c * nbk + b;
            let yq = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
            let dd = _mm256_set1_ps(self.d[wb] * x.d[b]);
            let (ax, sy) = match self.kind {
                Kind::Q4_1 | Kind::Q4_0 => {
                    let t = _mm_loadu_si128(self.qs.as_ptr().add(wb * 16) as *const __m128i);
                    let bytes = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
                    let q = _mm256_and_si256(bytes, low);
                    if self.kind == Kind::Q4_1 {
                        summs = self.m[wb].mul_add(x.s[b], summs);
                        (q, yq)
                    } else {
                        let q = _mm256_sub_epi8(q, off8);
                        (_mm256_sign_epi8(q, q), _mm256_sign_epi8(yq, q))
                    }
                }
                Kind::Q8_0 => {
                    let q = _mm256_loadu_si256(self.qs.as_ptr().add(wb * QK) as *const __m256i);
                    (_mm256_sign_epi8(q, q), _mm256_sign_epi8(yq, q))
                }
            };
            let pairs = _mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy));
            acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(pairs), acc);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        hsum8(lanes) + summs
    }

    /// `x (m, k)` times the transposed weight: `(m, n)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("matmul: input has {k} columns, weight expects {}", self.k);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let rows: Vec<QRow> = xs.par_chunks(k).map(quantize_row).collect();
        let n = self.n;
        let mut out = vec![0f32; m * n];
        // Columns are split across threads; each task runs all rows so a weight row is
        // read once per matmul, not once per activation row.
        const COLS: usize = 64;
        let mut col_major = vec![0f32; m * n];
        col_major
            .par_chunks_mut(COLS * m)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let c0 = ci * COLS;
                let ncols = chunk.len() / m;
                for dc in 0..ncols {
                    for (r, row) in rows.iter().enumerate() {
                        chunk[dc * m + r] = self.dot(c0 + dc, row);
                    }
                }
            });
        for c in 0..n {
            for r in 0..m {
                out[r * n + c] = col_major[c * m + r];
            }
        }
        Tensor::from_vec(out, (m, n), x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Our kernels agree with candle's dequantized weights times exact activations to
    /// within the activation quantization error, for every type and odd shapes.
    #[test]
    fn matches_dequantized_reference() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (m, n, k) in [(1, 67, 64), (3, 130, 96), (7, 5, 32)] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let q = QTensor::quantize(&w, dt)?;
                let ours = QWeight::from_qtensor(&q)?.unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let got = ours.matmul(&x)?;
                let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
                let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err < 0.03 * scale.max(1.0) + 0.2,
                    "{dt:?} {m}x{n}x{k}: err {err} (scale {scale})"
                );
                // And candle's own quantized path lands in the same place.
                let theirs = candle_core::quantized::QMatMul::from_qtensor(q)?.forward(&x)?;
                let d2 = (&got - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d2 < 0.03 * scale.max(1.0) + 0.2, "{dt:?}: vs candle {d2}");
            }
        }
        Ok(())
    }

    #[test]
    fn quantize_row_rounds_half_even_and_keeps_sum() {
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5; // 0.5 * 127/127 = 0.5 → 0 (ties to even)
        x[2] = 1.5; // → 2
        x[3] = -2.5; // → -2
        let q = quantize_row(&x);
        assert_eq!(&q.qs[..4], &[127, 0, 2, -2]);
        assert_eq!(q.d[0], 1.0);
        assert_eq!(q.s[0], 127.0);
    }

    #[test]
    fn exact_on_integer_data() -> Result<()> {
        // With integer weights representable exactly in Q8_0 and activations whose
        // amax is 127, every step is exact.
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..64).map(|i| ((i % 7) as f32 - 3.0) * 1.0).collect();
        let mut wv = w.clone();
        wv[0] = 127.0; // block amax 127 → scale exactly 1
        wv[32] = 127.0;
        let wt = Tensor::from_vec(wv.clone(), (1, 64), &dev)?;
        let q = QTensor::quantize(&wt, GgmlDType::Q8_0)?;
        let ours = QWeight::from_qtensor(&q)?.unwrap();
        let mut xv: Vec<f32> = (0..64).map(|i| (i % 5) as f32).collect();
        xv[5] = 127.0;
        xv[40] = 127.0;
        let x = Tensor::from_vec(xv.clone(), (1, 64), &dev)?;
        let got = ours.matmul(&x)?.to_vec2::<f32>()?[0][0];
        let want: f32 = wv.iter().zip(&xv).map(|(a, b)| a * b).sum();
        assert_eq!(got, want);
        Ok(())
    }

    /// The AVX2 kernels and the portable lane emulation agree bit for bit, for every
    /// type, on random data including extreme values.
    #[test]
    fn avx2_equals_portable_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = (Tensor::randn(0f32, 1.0, (37, 256), &dev)? * 3.0)?;
            let ours = QWeight::from_qtensor(&QTensor::quantize(&w, dt)?)?.unwrap();
            for seed in 0..4 {
                let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, 256, &dev)?.to_vec1()?;
                x[seed * 7] = 1e4 * (seed as f32 - 1.5);
                let row = quantize_row(&x);
                for c in 0..37 {
                    let a = ours.dot_lanes(c, &row);
                    let b = ours.dot(c, &row);
                    assert_eq!(a.to_bits(), b.to_bits(), "{dt:?} col {c}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }
}

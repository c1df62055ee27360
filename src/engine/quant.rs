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

    /// Dot product of weight row `c` with a quantized activation row.
    #[inline]
    fn dot(&self, c: usize, x: &QRow) -> f32 {
        let nbk = self.k / QK;
        let mut acc = 0f32;
        let mut summs = 0f32;
        match self.kind {
            Kind::Q4_1 | Kind::Q4_0 => {
                let off = if self.kind == Kind::Q4_0 { 8 } else { 0 };
                for b in 0..nbk {
                    let wb = c * nbk + b;
                    let q = &self.qs[wb * 16..wb * 16 + 16];
                    let y = &x.qs[b * QK..b * QK + QK];
                    let mut sumi = 0i32;
                    for j in 0..16 {
                        let lo = (q[j] & 0x0F) as i32 - off;
                        let hi = (q[j] >> 4) as i32 - off;
                        sumi += lo * y[j] as i32 + hi * y[j + 16] as i32;
                    }
                    acc += self.d[wb] * x.d[b] * sumi as f32;
                    if self.kind == Kind::Q4_1 {
                        summs += self.m[wb] * x.s[b];
                    }
                }
            }
            Kind::Q8_0 => {
                for b in 0..nbk {
                    let wb = c * nbk + b;
                    let q = &self.qs[wb * QK..wb * QK + QK];
                    let y = &x.qs[b * QK..b * QK + QK];
                    let mut sumi = 0i32;
                    for j in 0..QK {
                        sumi += (q[j] as i8) as i32 * y[j] as i32;
                    }
                    acc += self.d[wb] * x.d[b] * sumi as f32;
                }
            }
        }
        acc + summs
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
}

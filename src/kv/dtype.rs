//! Cache element types (`kv.dtype`): what one cached K or V value costs in bytes and how
//! it is stored. f32, f16 and bf16 are stored as tensors of that type; q8_0 is stored
//! as llama.cpp's Q8_0 blocks (32 values as 8-bit integers and one f16 scale: 34 bytes
//! per 32 values) and dequantized to f32 when attention reads the cache.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Result, Tensor};

/// Values per Q8_0 block.
pub const Q8_BLOCK: usize = 32;
/// Stored integer = quantized value + this, so the values fit a `u8`.
const Q8_OFFSET: f64 = 128.0;
/// The stored byte of a zero value.
pub const Q8_ZERO: u8 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDtype {
    F32,
    /// What llama.cpp stores by default; the right choice on CPU.
    #[default]
    F16,
    /// Same bytes as f16 with f32's range; the natural choice on GPUs that compute in it.
    BF16,
    /// 8-bit blocks: a little over half the bytes of f16.
    Q8_0,
}

impl KvDtype {
    pub const ALL: [KvDtype; 4] = [Self::F32, Self::F16, Self::BF16, Self::Q8_0];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The tensor type of a dense cache; None for the block-quantized q8_0.
    pub fn dense(self) -> Option<DType> {
        match self {
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::BF16 => Some(DType::BF16),
            Self::Q8_0 => None,
        }
    }

    /// Bytes that `n` cached values take (for q8_0, `n` is a whole number of blocks).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::F16 | Self::BF16 => 2 * n,
            Self::Q8_0 => n / Q8_BLOCK * (Q8_BLOCK + 2),
        }
    }

    /// Whether rows of `head_dim` values can be stored in this type.
    pub fn check_head_dim(self, head_dim: usize) -> std::result::Result<(), String> {
        if self == Self::Q8_0 && (head_dim == 0 || !head_dim.is_multiple_of(Q8_BLOCK)) {
            return Err(format!(
                "kv_dtype q8_0 needs a head dimension that is a multiple of {Q8_BLOCK}; this model's is {head_dim} (use f16)"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|d| d.name() == t || (t == "q8" && *d == Self::Q8_0))
            .ok_or_else(|| format!("kv_dtype must be one of f32, f16, bf16, q8_0; got `{s}`"))
    }
}

/// Quantize `x` `(.., head_dim)` to Q8_0 blocks along its last dimension: returns the
/// offset integers as `u8` (same shape) and one f16 scale per block `(.., head_dim/32)`.
/// Each block's scale is max|x|/127 and its values round(x/scale), as in ggml.
pub fn quantize_q8(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = x.dims().to_vec();
    let Some((&hd, lead)) = dims.split_last() else {
        candle_core::bail!("q8_0: cannot quantize a scalar");
    };
    if !hd.is_multiple_of(Q8_BLOCK) {
        candle_core::bail!("q8_0: last dimension {hd} is not a multiple of {Q8_BLOCK}");
    }
    if x.device().is_cpu() {
        // ggml's rounding exactly (what the CPU kernels and llama.cpp store).
        let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut q = vec![0u8; v.len()];
        let mut d = vec![half::f16::ZERO; v.len() / Q8_BLOCK];
        quantize_q8_row(&v, &mut q, &mut d);
        let mut sd = lead.to_vec();
        sd.push(hd / Q8_BLOCK);
        return Ok((
            Tensor::from_vec(q, dims.as_slice(), x.device())?,
            Tensor::from_vec(d, sd.as_slice(), x.device())?,
        ));
    }
    // On a GPU, with tensor ops: the same rules except that the inverse is `1 / d` and
    // ties round away from zero.
    let mut blocks = lead.to_vec();
    blocks.extend([hd / Q8_BLOCK, Q8_BLOCK]);
    let xb = x.to_dtype(DType::F32)?.reshape(blocks)?;
    let amax = xb.abs()?.max_keepdim(lead.len() + 1)?;
    let d = (amax / 127.0)?;
    // An all-zero block has scale 0; its values are 0 whatever the inverse is.
    let inv = d.clamp(f32::MIN_POSITIVE, f32::MAX)?.recip()?;
    let q = xb
        .broadcast_mul(&inv)?
        .round()?
        .clamp(-127f32, 127f32)?
        .affine(1.0, Q8_OFFSET)?
        .to_dtype(DType::U8)?
        .reshape(dims.as_slice())?;
    let d = d.squeeze(lead.len() + 1)?.to_dtype(DType::F16)?;
    Ok((q, d))
}

/// The blocks llama.cpp rotates Q, K and V in (by an orthonormal Walsh-Hadamard matrix)
/// before they meet a quantized cache, for a head dimension that is a multiple of 64: Q
/// and K in blocks of the largest power of two from 64 up that divides it, V and the
/// attention output in blocks of 64. None for other head dimensions.
pub fn q8_rotation(head_dim: usize) -> Option<(usize, usize)> {
    if head_dim == 0 || !head_dim.is_multiple_of(64) {
        return None;
    }
    let mut k = 64;
    while head_dim.is_multiple_of(2 * k) {
        k *= 2;
    }
    Some((k, 64))
}

/// One row (a whole number of 32-value blocks) into its stored bytes and block scales,
/// as ggml's x86 `quantize_row_q8_0` quantizes what llama.cpp writes into a q8_0 cache:
/// scale `amax / 127` (kept as f16), values `round_half_even(x * (127 / amax))` (0 for
/// an all-zero block), stored `+ 128`.
pub fn quantize_q8_row(x: &[f32], q: &mut [u8], d: &mut [half::f16]) {
    debug_assert!(x.len() == q.len() && x.len() == d.len() * Q8_BLOCK);
    for ((xb, qb), db) in x
        .chunks_exact(Q8_BLOCK)
        .zip(q.chunks_exact_mut(Q8_BLOCK))
        .zip(d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (o, &v) in qb.iter_mut().zip(xb) {
            *o = ((v * id).round_ties_even() as i32 + Q8_OFFSET as i32) as u8;
        }
        *db = half::f16::from_f32(amax / 127.0);
    }
}

/// Inverse of [`quantize_q8`]: f32 values of shape `q.dims()`.
pub fn dequantize_q8(q: &Tensor, d: &Tensor) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let Some((&hd, lead)) = dims.split_last() else {
        candle_core::bail!("q8_0: cannot dequantize a scalar");
    };
    let mut blocks = lead.to_vec();
    blocks.extend([hd / Q8_BLOCK, Q8_BLOCK]);
    let vals = q
        .to_dtype(DType::F32)?
        .affine(1.0, -Q8_OFFSET)?
        .reshape(blocks)?;
    let scale = d.to_dtype(DType::F32)?.unsqueeze(lead.len() + 1)?;
    vals.broadcast_mul(&scale)?.reshape(dims.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// ggml's rules: the block maximum maps to ±127, halves round to even, an all-zero
    /// block is zeros with scale 0; the tensor quantizer (CPU) gives the same bytes.
    #[test]
    fn row_quantizer_follows_ggml() {
        let mut x = vec![0f32; 96];
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = i as f32 - 15.5; // amax 15.5: x * 127 / 15.5
        }
        x[32] = 127.0; // id = 1: halves are exact ties
        x[33] = 2.5;
        x[34] = -3.5;
        x[35] = 0.5;
        let mut q = vec![0u8; 96];
        let mut d = vec![half::f16::ZERO; 3];
        quantize_q8_row(&x, &mut q, &mut d);
        assert_eq!(q[0], (128 - 127) as u8);
        assert_eq!(q[31], 255);
        assert_eq!(&q[32..36], &[255, 130, 124, 128]); // 127, 2, -4, 0
        assert_eq!(d[1].to_f32(), 1.0);
        assert_eq!((&q[64..], d[2].to_f32()), (&[128u8; 32][..], 0.0));
        let t = Tensor::from_vec(x, (3, 32), &Device::Cpu).unwrap();
        let (tq, td) = quantize_q8(&t).unwrap();
        assert_eq!(tq.flatten_all().unwrap().to_vec1::<u8>().unwrap(), q);
        assert_eq!(td.dims(), &[3, 1]);
    }

    #[test]
    fn names_and_sizes() {
        for d in KvDtype::ALL {
            assert_eq!(d.name().parse::<KvDtype>().unwrap(), d);
        }
        assert_eq!("Q8".parse::<KvDtype>().unwrap(), KvDtype::Q8_0);
        let e = "f8".parse::<KvDtype>().unwrap_err();
        assert!(
            e.contains("f32, f16, bf16, q8_0") && e.contains("`f8`"),
            "{e}"
        );
        assert_eq!(KvDtype::F32.bytes_for(64), 256);
        assert_eq!(KvDtype::F16.bytes_for(64), 128);
        assert_eq!(KvDtype::BF16.bytes_for(64), 128);
        assert_eq!(KvDtype::Q8_0.bytes_for(64), 68);
        assert!(KvDtype::Q8_0.check_head_dim(64).is_ok());
        assert!(KvDtype::Q8_0.check_head_dim(80).is_err());
        assert!(KvDtype::F16.check_head_dim(80).is_ok());
    }

    #[test]
    fn q8_round_trip_error_is_within_half_a_step() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (1, 3, 5, 64), &dev)? * 1.0)?;
        // One all-zero row must come back as zeros, not NaN.
        let zero = Tensor::zeros((1, 3, 1, 64), DType::F32, &dev)?;
        let x = Tensor::cat(&[&x, &zero], 2)?;
        let (q, d) = quantize_q8(&x)?;
        assert_eq!(q.dims(), &[1, 3, 6, 64]);
        assert_eq!(q.dtype(), DType::U8);
        assert_eq!(d.dims(), &[1, 3, 6, 2]);
        assert_eq!(d.dtype(), DType::F16);
        let y = dequantize_q8(&q, &d)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let ys: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let ds: Vec<f32> = d.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for (i, (a, b)) in xs.iter().zip(&ys).enumerate() {
            let step = ds[i / Q8_BLOCK];
            // Half a quantization step, plus the f16 rounding of the scale.
            assert!(
                (a - b).abs() <= 0.5 * step + 127.0 * step * 1e-3,
                "value {i}: {a} came back as {b} (step {step})"
            );
        }
        assert!(ys[ys.len() - 64..].iter().all(|&v| v == 0.0));
        Ok(())
    }
}

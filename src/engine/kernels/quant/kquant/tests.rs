use super::*;
use candle_core::{Device, Module};

fn levels() -> Vec<Isa> {
    crate::engine::kernels::quant::simd_levels()
}

/// Activations with spikes of both signs, so that the Q8_K scale comes from
/// negative as well as positive maxima.
fn acts(m: usize, k: usize) -> Result<Vec<f32>> {
    let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)?.to_vec1()?;
    for (i, v) in x.iter_mut().step_by(41).enumerate() {
        *v *= 1e3 * (i as f32 - 2.5);
    }
    Ok(x)
}

/// Q8_K follows ggml's reference: the signed maximum maps to -127, ties round to
/// even, `d = 1 / iscale`, and `bsums` are the sums of 16.
#[test]
fn q8k_quantization_matches_ggml_rules() {
    let mut x = vec![0f32; 512];
    x[3] = -2.0; // largest magnitude, negative: iscale = 63.5
    x[4] = 1.0 / 127.0; // 0.5 → 0 (ties to even)
    x[5] = 3.0 / 127.0; // 1.5 → 2
    x[6] = 1.0;
    let mut a = KActs::new();
    a.quantize(&x, 512);
    let r = a.row(0);
    assert_eq!(r.d[0], 1.0 / 63.5);
    assert_eq!(&r.qs[3..7], &[-127, 0, 2, 64]);
    assert_eq!(r.bsums[0], -127 + 2 + 64);
    // An all-zero super-block is all zeros with d = 0.
    assert_eq!(r.d[1], 0.0);
    assert!(r.qs[256..].iter().all(|&q| q == 0) && r.bsums[16..].iter().all(|&s| s == 0));
    // A positive maximum maps to -127 too (the sign goes into d).
    let mut y = vec![0.5f32; 256];
    y[10] = 4.0;
    a.quantize(&y, 256);
    assert_eq!(a.row(0).qs[10], -127);
    assert!(a.row(0).d[0] < 0.0);
}

/// The Q8_K quantizer of this CPU (NEON on aarch64) equals the portable one bit for
/// bit: random rows, `+max` and `-max` both present (the first decides the sign),
/// all-zero super-blocks, ties, huge values.
#[test]
fn q8k_simd_equals_scalar() -> Result<()> {
    for nb in [1usize, 2, 3, 7] {
        let mut x = acts(1, nb * QK_K)?;
        x[5] = 0.5;
        x[6] = -2.5;
        x[7] = 3e5;
        x[QK_K - 1] = -3e5; // same magnitude later in the block: x[7] decides
        if nb > 1 {
            x[QK_K..2 * QK_K].fill(0.0);
        }
        if nb > 2 {
            x[2 * QK_K + 9] = -7.0e4;
            x[2 * QK_K + 200] = 7.0e4;
        }
        let mut want = (vec![0f32; nb], vec![0i8; nb * QK_K], vec![0i16; nb * 16]);
        let mut got = (vec![1f32; nb], vec![1i8; nb * QK_K], vec![1i16; nb * 16]);
        quantize_k_scalar(&x, &mut want.0, &mut want.1, &mut want.2);
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on aarch64; slices sized for `nb` super-blocks.
        unsafe {
            neon::quantize_k_neon(&x, &mut got.0, &mut got.1, &mut got.2)
        };
        #[cfg(not(target_arch = "aarch64"))]
        quantize_k(&x, &mut got.0, &mut got.1, &mut got.2);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&want.0), bits(&got.0), "d, {nb} super-blocks");
        assert_eq!(want.1, got.1, "qs, {nb} super-blocks");
        assert_eq!(want.2, got.2, "bsums, {nb} super-blocks");
    }
    Ok(())
}

/// Within activation-quantization error of the dequantized weights and of candle's
/// own K-quant path, for both types and odd shapes.
#[test]
fn kquants_match_dequantized_reference() -> Result<()> {
    let dev = Device::Cpu;
    for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
        for (m, n, k) in [(1, 67, 256), (3, 13, 768), (6, 5, 4864)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let q = QTensor::quantize(&w, dt)?;
            let ours = KWeight::from_qtensor(&q)?.expect("k-quant");
            let x = Tensor::from_vec(acts(m, k)?, (m, k), &dev)?;
            let x = (x / 100.0)?;
            let got = ours.matmul(&x)?;
            let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < 0.02 * scale.max(1.0) + 0.1,
                "{dt:?} {m}x{n}x{k}: err {err} (scale {scale})"
            );
            let theirs = candle_core::quantized::QMatMul::from_qtensor(q)?.forward(&x)?;
            let d2 = (&got - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d2 < 0.02 * scale.max(1.0) + 0.1, "{dt:?}: vs candle {d2}");
        }
    }
    Ok(())
}

/// Every SIMD level of this CPU equals the portable reference bit for bit, through
/// every tile shape of the driver (1..9 rows, odd column counts), with the extreme
/// weight codes (all scales and nibbles at their limits) as well as random ones.
#[test]
fn kquants_simd_equal_portable_bit_for_bit() -> Result<()> {
    let dev = Device::Cpu;
    for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
        // Every row count 1..=9 (the 512-bit kernels pair rows, four pairs a pass, an
        // odd count pairs its last row with itself, a ninth row takes the one-row tiles).
        let shapes = [
            (1, 37, 256),
            (7, 53, 512),
            (9, 5, 256),
            (4, 30, 1280),
            (2, 3, 4864),
            (17, 9, 768),
        ]
        .into_iter()
        .chain((1..=9).map(|m| (m, 13, 768)));
        for (m, n, k) in shapes {
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * 3.0)?;
            let mut ours = KWeight::from_qtensor(&QTensor::quantize(&w, dt)?)?.expect("k");
            if n > 5 {
                // Column 0: every code and scale at its maximum (Q6_K scale -128 too).
                let nb = k / QK_K;
                let qlen = ours.q.len() / (n * nb);
                ours.q[..nb * qlen].fill(0xFF);
                for (i, s) in ours.sc[..nb * 16].iter_mut().enumerate() {
                    *s = match dt {
                        GgmlDType::Q4K => 63,
                        _ if i % 2 == 0 => 0x80,
                        _ => 127,
                    };
                }
            }
            let x = acts(m, k)?;
            let mut a = KActs::new();
            a.quantize(&x, k);
            for level in levels() {
                let mut got = vec![f32::NAN; m * (n + 3)];
                ours.matmul_into_isa(level, &a, &mut got, n + 3);
                for r in 0..m {
                    for c in 0..n {
                        let want = ours.dot_ref(c, a.row(r));
                        let g = got[r * (n + 3) + c];
                        assert_eq!(
                            want.to_bits(),
                            g.to_bits(),
                            "{dt:?} {level:?} {m}x{n}x{k} ({r},{c}): {want} vs {g}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// With integer activations (no quantization error) both types land within float
/// rounding of the f64 dot product of the dequantized weights.
#[test]
fn close_to_f64_on_integer_activations() -> Result<()> {
    // A -127 maximum gives iscale = 1, so the activations are exact integers.
    let mut x: Vec<f32> = (0..256).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    x[0] = -127.0;
    let mut a = KActs::new();
    a.quantize(&x, 256);
    assert_eq!(a.row(0).d[0], 1.0);
    for dt in [GgmlDType::Q4K, GgmlDType::Q6K] {
        let w = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu)?;
        let q = QTensor::quantize(&w, dt)?;
        let ours = KWeight::from_qtensor(&q)?.expect("k");
        let deq: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; 3];
        ours.matmul_into(&a, &mut out, 3);
        for c in 0..3 {
            let want: f64 = (0..256)
                .map(|e| deq[c * 256 + e] as f64 * x[e] as f64)
                .sum();
            let tol = 1e-4 * want.abs().max(1.0);
            assert!(
                (out[c] as f64 - want).abs() < tol,
                "{dt:?} col {c}: {} vs {want}",
                out[c]
            );
        }
    }
    Ok(())
}

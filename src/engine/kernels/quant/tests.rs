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

/// The SIMD quantizer (AVX2 where present; NEON on aarch64) equals the scalar one
/// bit for bit (ties, zeros, huge values).
#[test]
fn quantize_simd_equals_scalar() -> Result<()> {
    let dev = Device::Cpu;
    for nb in [1usize, 3, 18, 48] {
        let mut x: Vec<f32> = (Tensor::randn(0f32, 1.0, nb * QK, &dev)? * 5.0)?.to_vec1()?;
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -2.5;
        if nb > 1 {
            x[QK..2 * QK].fill(0.0);
        }
        x[nb * QK - 1] = -3e5;
        let (mut d1, mut s1, mut q1) = (vec![0f32; nb], vec![0f32; nb], vec![0i8; nb * QK]);
        let (mut d2, mut s2, mut q2) = (vec![0f32; nb], vec![0f32; nb], vec![0i8; nb * QK]);
        quantize_scalar(&x, &mut d1, &mut s1, &mut q1);
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on aarch64; slices sized for `nb` blocks.
        unsafe {
            neon::quantize_neon(&x, &mut d2, &mut s2, &mut q2)
        };
        #[cfg(not(target_arch = "aarch64"))]
        quantize_into(&x, &mut d2, &mut s2, &mut q2);
        assert_eq!(q1, q2);
        assert_eq!(
            d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
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

/// Every SIMD level this CPU has, for one and four rows at a time, agrees bit for
/// bit with the portable lane emulation, for every type, on random data with extreme
/// values and odd sizes (columns, rows, blocks per row).
#[test]
fn simd_equals_portable_bit_for_bit() -> Result<()> {
    let dev = Device::Cpu;
    eprintln!("levels tested: {:?}", simd_levels());
    for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for (m, n, k) in [
            (1, 37, 256),
            (7, 53, 96),
            (9, 5, 32),
            (4, 130, 544),
            (8, 67, 576),
            (19, 43, 160),
            (2, 11, 64),
            (3, 16, 64),
            (5, 9, 96),
            (6, 24, 32),
        ] {
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? * 3.0)?;
            let ours = QWeight::from_qtensor(&QTensor::quantize(&w, dt)?)?.unwrap();
            let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &dev)?.to_vec1()?;
            for (i, v) in x.iter_mut().step_by(37).enumerate() {
                *v *= 1e4 * (i as f32 - 1.5);
            }
            let mut acts = QActs::new();
            acts.quantize(&x, k);
            let mut want = vec![0f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    want[r * n + c] = ours.dot_lanes(c, acts.row(r));
                }
            }
            for_each_simd_kernel(|level| {
                let mut got = vec![f32::NAN; m * (n + 3)];
                ours.matmul_into_isa(level, &acts, &mut got, n + 3);
                for r in 0..m {
                    for c in 0..n {
                        let (a, b) = (want[r * n + c], got[r * (n + 3) + c]);
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{dt:?} {level:?} {m}x{n}x{k} ({r},{c}): {a} vs {b}"
                        );
                    }
                }
            });
        }
    }
    Ok(())
}

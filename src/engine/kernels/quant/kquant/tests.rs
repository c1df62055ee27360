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

/// The Q8_K quantizer of this CPU (AVX2 on x86-64, NEON on aarch64) equals the portable
/// one bit for bit: random rows, `+max` and `-max` both present (the first decides the
/// sign), all-zero super-blocks, ties, huge values, a NaN (skipped by both).
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
        if nb > 3 {
            x[3 * QK_K + 17] = f32::NAN;
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
/// every tile shape of the driver (1..9 rows, odd column counts, k of 1 to 19 super-blocks), with the extreme
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
            // More rows than one panel serves (`drive::PANEL_ROWS`), odd widths.
            (70, 7, 512),
        ]
        .into_iter()
        .chain((1..=9).map(|m| (m, 13, 768)))
        .chain(
            [256, 1024, 2048]
                .into_iter()
                .flat_map(|k| (1..=9).map(move |m| (m, 11, k))),
        );
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

/// ggml's `ggml_vec_dot_q4_K_q8_K` (the `__AVX2__` branch), transcribed statement by
/// statement in scalar code from the raw 144-byte blocks: eight f32 lanes of `d * sumi`
/// (lane t: bytes 4t..4t+3 of each 32 values), four of `dmin * prod` with `dmin`
/// negative, `hsum_float_8` plus `(m0 + m2) + (m1 + m3)`.
fn ggml_vec_dot_q4k(blocks: &[u8], y_d: &[f32], y_qs: &[i8], y_bs: &[i16]) -> f32 {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for (i, x) in blocks.chunks_exact(144).enumerate() {
        let d = y_d[i] * f16(&x[0..2]);
        let dmin = -y_d[i] * f16(&x[2..4]);
        let w = |o: usize| u32::from_le_bytes([x[4 + o], x[5 + o], x[6 + o], x[7 + o]]);
        let mut utmp = [w(0), w(4), w(8), 0];
        utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
        let uaux = utmp[1] & KMASK1;
        utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
        utmp[2] = uaux;
        utmp[0] &= KMASK1;
        let bytes: Vec<u8> = utmp.iter().flat_map(|u| u.to_le_bytes()).collect();
        let (scales, mins) = (&bytes[0..8], &bytes[8..16]);
        // _mm_hadd_epi16 of the bsums, _mm_madd_epi16 with the mins.
        let bs = &y_bs[16 * i..16 * i + 16];
        let q8s: Vec<i16> = (0..8)
            .map(|k| bs[2 * k].wrapping_add(bs[2 * k + 1]))
            .collect();
        for u in 0..4 {
            let prod = mins[2 * u] as i32 * q8s[2 * u] as i32
                + mins[2 * u + 1] as i32 * q8s[2 * u + 1] as i32;
            acc_m[u] = dmin.mul_add(prod as f32, acc_m[u]);
        }
        let mut sumi = [0i32; 8];
        for j in 0..4 {
            let q4 = &x[16 + 32 * j..16 + 32 * j + 32];
            let q8 = &y_qs[256 * i + 64 * j..256 * i + 64 * j + 64];
            for (t, s) in sumi.iter_mut().enumerate() {
                let (mut lo, mut hi) = (0i32, 0i32);
                for e in 4 * t..4 * t + 4 {
                    lo += (q4[e] & 0xF) as i32 * q8[e] as i32;
                    hi += (q4[e] >> 4) as i32 * q8[32 + e] as i32;
                }
                *s += scales[2 * j] as i32 * lo + scales[2 * j + 1] as i32 * hi;
            }
        }
        for t in 0..8 {
            acc[t] = d.mul_add(sumi[t] as f32, acc[t]);
        }
    }
    let m = (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]);
    let x = acc;
    let hsum = ((x[4] + x[0]) + (x[6] + x[2])) + ((x[5] + x[1]) + (x[7] + x[3]));
    hsum + m
}

/// The reference's Q4_K order is llama.cpp's `vec_dot_q4_K_q8_K` (AVX2), pinned by a
/// direct transcription on random blocks: random scale/min bytes and nibbles, random
/// f16 `d` and `dmin`, activations with spikes of both signs.
#[test]
fn q4k_reference_is_ggml_vec_dot_order() -> Result<()> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (n, k) in [(7, 256), (5, 1024), (3, 2048), (4, 4864)] {
        let nb = k / QK_K;
        let mut raw = vec![0u8; n * nb * 144];
        for blk in raw.chunks_exact_mut(144) {
            for b in blk.iter_mut() {
                *b = next() as u8;
            }
            // Normal f16 values 2^-10 .. 2^-1 for d and dmin.
            for o in [0, 2] {
                let r = next();
                let bits = ((5 + r % 10) << 10 | (r >> 8) & 0x3FF) as u16;
                blk[o..o + 2].copy_from_slice(&bits.to_le_bytes());
            }
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q4K,
            &raw,
            vec![n, k],
            &Device::Cpu,
        )?;
        let w = KWeight::from_qtensor(&q)?.expect("q4k");
        for m in [1, 3] {
            let mut a = KActs::new();
            a.quantize(&acts(m, k)?, k);
            for r in 0..m {
                let row = a.row(r);
                for c in 0..n {
                    let want = ggml_vec_dot_q4k(
                        &raw[c * nb * 144..(c + 1) * nb * 144],
                        row.d,
                        row.qs,
                        row.bsums,
                    );
                    let got = w.dot_ref(c, row);
                    assert_eq!(
                        want.to_bits(),
                        got.to_bits(),
                        "{n}x{k} row {r} col {c}: ggml {want} vs reference {got}"
                    );
                }
            }
        }
    }
    Ok(())
}

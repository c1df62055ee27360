//! Every path against the portable reference, bit for bit.

use super::*;
use rand::{Rng, SeedableRng};

pub(super) fn data(rng: &mut rand::rngs::StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-amp..amp)).collect()
}

fn halves(x: Vec<f32>) -> Vec<f16> {
    x.into_iter().map(f16::from_f32).collect()
}

/// Bits equal, or both NaN (which NaN an operation returns depends on operand order,
/// which the compiler may swap).
pub(super) fn same(x: f32, y: f32) -> bool {
    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
}

/// Softmax attention of one head in f64: `q` (hd) over `k`, `v` (positions × hd).
pub(super) fn attention_f64(q: &[f32], k: &[f64], v: &[f64], scale: f32) -> Vec<f64> {
    let hd = q.len();
    let s: Vec<f64> = k
        .chunks_exact(hd)
        .map(|kj| q.iter().zip(kj).map(|(&a, b)| a as f64 * b).sum::<f64>() * scale as f64)
        .collect();
    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..hd)
        .map(|d| (0..s.len()).map(|j| e[j] / z * v[j * hd + d]).sum())
        .collect()
}

/// Each head of `q` through the single-head portable loop, then every path's grouped
/// kernel; all must agree bit for bit.
fn check_all_paths(q: &[f32], hd: usize, k: &[f16], v: &[f16], scale: f32, what: &str) {
    let mut want = vec![0f32; q.len()];
    for (qh, o) in q.chunks(hd).zip(want.chunks_mut(hd)) {
        attend_with(false, qh, k, v, scale, o);
    }
    for p in paths() {
        let mut got = vec![0f32; q.len()];
        attend_heads_with(p, q, hd, k, v, scale, &mut got);
        for (i, (x, y)) in want.iter().zip(&got).enumerate() {
            assert!(same(*x, *y), "{p:?} {what} [{i}]: want {x:e}, got {y:e}");
        }
        if q.len() == hd {
            let mut one = vec![0f32; hd];
            if p == path() {
                attend(q, k, v, scale, &mut one);
                assert!(
                    one.iter().zip(&want).all(|(x, y)| same(*x, *y)),
                    "attend {what}"
                );
            }
        }
    }
}

/// Grouped heads give each head exactly what `attend` gives it, on every path.
#[test]
fn heads_equal_single_head() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (hd, len, g) in [
        (64, 1, 3),
        (64, 130, 3),
        (13, 9, 5),
        (8, 40, 1),
        (64, 17, 9),
    ] {
        let q = data(&mut rng, hd * g, 2.0);
        let k = halves(data(&mut rng, hd * len, 2.0));
        let v = halves(data(&mut rng, hd * len, 3.0));
        let scale = 1.0 / (hd as f32).sqrt();
        check_all_paths(&q, hd, &k, &v, scale, &format!("hd {hd} len {len} g {g}"));
    }
}

/// Odd and even head sizes, lengths 1..300 across block edges, groups 1..4 (and more),
/// small and large scores (large ones send `expf` below its underflow threshold).
#[test]
fn paths_agree_on_random_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let hds = [1, 7, 16, 31, 63, 64, 65, 80, 96, 100, 128, 130, 200, 256];
    let lens = [
        1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300,
    ];
    for (n, &hd) in hds.iter().enumerate() {
        for (m, &len) in lens.iter().enumerate() {
            let g = 1 + (n + m) % 4;
            let amp = [0.5, 2.0, 8.0, 40.0][(n * 3 + m) % 4];
            let q = data(&mut rng, hd * g, amp);
            let k = halves(data(&mut rng, hd * len, 2.0));
            let v = halves(data(&mut rng, hd * len, 3.0));
            let scale = 1.0 / (hd as f32).sqrt();
            let what = format!("hd {hd} len {len} g {g} amp {amp}");
            check_all_paths(&q, hd, &k, &v, scale, &what);
        }
    }
    for g in 1..=6 {
        let (hd, len) = (64, 1 + rng.gen_range(0..300));
        let q = data(&mut rng, hd * g, 3.0);
        let k = halves(data(&mut rng, hd * len, 2.0));
        let v = halves(data(&mut rng, hd * len, 3.0));
        check_all_paths(&q, hd, &k, &v, 0.125, &format!("hd 64 len {len} g {g}"));
    }
}

/// Scores that repeat the maximum exactly, rising and falling sequences, V values
/// that overflow f16, infinities in K.
#[test]
fn paths_agree_on_edge_values() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let hd = 64;
    for case in 0..6 {
        let len = 150;
        let g = 3;
        let mut q = data(&mut rng, hd * g, 2.0);
        let mut k = halves(data(&mut rng, hd * len, 2.0));
        let mut v = halves(data(&mut rng, hd * len, 3.0));
        match case {
            // Every position the same key: ties everywhere.
            0 => {
                let row = k[..hd].to_vec();
                for c in k.chunks_mut(hd) {
                    c.copy_from_slice(&row);
                }
            }
            // Keys growing along the sequence: the maximum grows at every step.
            1 => {
                for (j, c) in k.chunks_mut(hd).enumerate() {
                    c.iter_mut()
                        .for_each(|x| *x = f16::from_f32(j as f32 * 0.01));
                }
                q.iter_mut().for_each(|x| *x = x.abs());
            }
            // Falling, steeply: later weights underflow to zero and subnormals.
            2 => {
                for (j, c) in k.chunks_mut(hd).enumerate() {
                    c.iter_mut()
                        .for_each(|x| *x = f16::from_f32(8.0 - j as f32 * 0.1));
                }
                q.iter_mut().for_each(|x| *x = x.abs() * 4.0);
            }
            // V near f16's limit: the accumulators overflow to infinity.
            3 => v.iter_mut().for_each(|x| *x = f16::from_f32(60000.0)),
            // An infinite key: an infinite or NaN score.
            4 => k[5 * hd + 3] = f16::INFINITY,
            // Zero query: every score 0.
            _ => q.iter_mut().for_each(|x| *x = 0.0),
        }
        check_all_paths(&q, hd, &k, &v, 0.125, &format!("edge case {case}"));
    }
}

/// The portable path agrees with a plain f64 softmax-attention to f16 precision.
#[test]
fn portable_matches_f64_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (hd, len) in [(64, 1), (64, 37), (8, 5), (13, 9), (128, 300), (80, 2)] {
        let q = data(&mut rng, hd, 2.0);
        let k = halves(data(&mut rng, hd * len, 2.0));
        let v = halves(data(&mut rng, hd * len, 3.0));
        let scale = 1.0 / (hd as f32).sqrt();
        let mut a = vec![0f32; hd];
        attend_with(false, &q, &k, &v, scale, &mut a);
        check_all_paths(&q, hd, &k, &v, scale, &format!("hd {hd} len {len}"));
        let kd: Vec<f64> = k.iter().map(|x| x.to_f64()).collect();
        let vd: Vec<f64> = v.iter().map(|x| x.to_f64()).collect();
        for (d, want) in attention_f64(&q, &kd, &vd, scale).into_iter().enumerate() {
            assert!(
                (want - a[d] as f64).abs() < 2e-2,
                "hd {hd} len {len} d {d}: {want} vs {}",
                a[d]
            );
        }
    }
}

/// On this machine the fastest path is the one the CPU allows (so the tests above did
/// test it): AVX-512 where the CPU has it, the AVX2 passes where it has AVX2 (with
/// glibc's `expf`, which the vector ones reproduce), NEON on aarch64.
#[test]
fn detected_path_is_the_fastest_available() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var("CANDELA_ATTN_PATH").is_err() {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") {
            assert_eq!(path(), Path::Avx512);
        } else if has!("avx2") && has!("fma") && has!("f16c") && cfg!(target_env = "gnu") {
            assert_eq!(path(), Path::Avx2);
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::env::var("CANDELA_ATTN_PATH").as_deref() != Ok("portable") {
        assert_eq!(path(), Path::Neon);
    }
    eprintln!("attention path: {:?}", path());
}

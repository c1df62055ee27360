//! The bf16 kernel: every path against the portable single-head loop, bit for bit, and
//! that loop against f64 attention to f32 precision.

use super::super::paths;
use super::super::tests::{attention_f64, data, same};
use super::*;
use rand::SeedableRng;

fn bf16s(x: Vec<f32>) -> Vec<bf16> {
    x.into_iter().map(bf16::from_f32).collect()
}

/// Each head of `q` through [`one_head`], then every path's grouped kernel; all must
/// agree bit for bit.
fn check_all_paths(q: &[f32], hd: usize, k: &[bf16], v: &[bf16], scale: f32, what: &str) {
    let mut want = vec![0f32; q.len()];
    for (qh, o) in q.chunks(hd).zip(want.chunks_mut(hd)) {
        one_head(qh, k, v, scale, o);
    }
    for p in paths() {
        let mut got = vec![0f32; q.len()];
        heads_with(p, q, hd, k, v, scale, &mut got);
        for (i, (x, y)) in want.iter().zip(&got).enumerate() {
            assert!(same(*x, *y), "{p:?} {what} [{i}]: want {x:e}, got {y:e}");
        }
    }
}

/// Odd and even head sizes (over 256 too), lengths across the AVX-512 blocks, groups
/// 1..6, small and large scores.
#[test]
fn paths_agree_on_random_shapes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let hds = [1, 7, 16, 31, 64, 65, 80, 96, 128, 130, 256, 300];
    let lens = [1, 2, 15, 16, 17, 64, 127, 128, 129, 257, 300];
    for (n, &hd) in hds.iter().enumerate() {
        for (m, &len) in lens.iter().enumerate() {
            let g = 1 + (n + m) % 6;
            let amp = [0.5, 2.0, 8.0, 40.0][(n * 3 + m) % 4];
            let q = data(&mut rng, hd * g, amp);
            let k = bf16s(data(&mut rng, hd * len, 2.0));
            let v = bf16s(data(&mut rng, hd * len, 3.0));
            let scale = 1.0 / (hd as f32).sqrt();
            let what = format!("hd {hd} len {len} g {g} amp {amp}");
            check_all_paths(&q, hd, &k, &v, scale, &what);
        }
    }
}

/// Ties of the maximum, a maximum growing at every step, weights underflowing, V
/// overflowing f32, an infinite key, a zero query.
#[test]
fn paths_agree_on_edge_values() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let (hd, len, g) = (64, 150, 3);
    for case in 0..6 {
        let mut q = data(&mut rng, hd * g, 2.0);
        let mut k = bf16s(data(&mut rng, hd * len, 2.0));
        let mut v = bf16s(data(&mut rng, hd * len, 3.0));
        match case {
            0 => {
                let row = k[..hd].to_vec();
                k.chunks_mut(hd).for_each(|c| c.copy_from_slice(&row));
            }
            1 => {
                for (j, c) in k.chunks_mut(hd).enumerate() {
                    c.fill(bf16::from_f32(j as f32 * 0.01));
                }
                q.iter_mut().for_each(|x| *x = x.abs());
            }
            2 => {
                for (j, c) in k.chunks_mut(hd).enumerate() {
                    c.fill(bf16::from_f32(8.0 - j as f32 * 0.1));
                }
                q.iter_mut().for_each(|x| *x = x.abs() * 4.0);
            }
            3 => v.fill(bf16::from_f32(3e38)),
            4 => k[5 * hd + 3] = bf16::INFINITY,
            _ => q.fill(0.0),
        }
        check_all_paths(&q, hd, &k, &v, 0.125, &format!("edge case {case}"));
    }
}

/// The portable loop is attention in f32 over the widened cache: it agrees with f64
/// attention over the same values (Q unrounded) to f32 rounding, far closer than the
/// f16 kernel could (which rounds Q and the accumulators to f16).
#[test]
fn portable_matches_f64_attention_to_f32_precision() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for (hd, len) in [
        (64, 1),
        (64, 37),
        (8, 5),
        (13, 9),
        (128, 300),
        (80, 2),
        (64, 2000),
    ] {
        let q = data(&mut rng, hd, 2.0);
        let k = bf16s(data(&mut rng, hd * len, 2.0));
        let v = bf16s(data(&mut rng, hd * len, 3.0));
        let scale = 1.0 / (hd as f32).sqrt();
        let mut a = vec![0f32; hd];
        one_head(&q, &k, &v, scale, &mut a);
        let kd: Vec<f64> = k.iter().map(|x| x.to_f64()).collect();
        let vd: Vec<f64> = v.iter().map(|x| x.to_f64()).collect();
        for (d, want) in attention_f64(&q, &kd, &vd, scale).into_iter().enumerate() {
            assert!(
                (want - a[d] as f64).abs() < 1e-5,
                "hd {hd} len {len} d {d}: {want} vs {}",
                a[d]
            );
        }
    }
}

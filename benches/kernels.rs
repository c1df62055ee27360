//! The quantized matmul kernels at every level this CPU has, for the shapes of the
//! default model (SmolLM2-135M: hidden 576, Q|K|V 960, gate|up 3072, vocab 49152), one
//! row (a decode step), 8 rows (a decode step of 8 sequences) and 64 rows (prefill); the
//! Q5_0 and K-quant kernels at the shapes of Qwen2.5-Coder-0.5B (hidden 896, gate|up
//! 9728, ffn 4864); and the attention kernel over 512 cached positions.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;
use util::cpu_seconds;

use candela::engine::kernels::attn;
use candela::engine::kernels::quant::{
    isa_available, Isa, KActs, KWeight, Q5Weight, QActs, QWeight,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};

fn weight(dt: GgmlDType, n: usize, k: usize) -> QWeight {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    QWeight::from_qtensor(&QTensor::quantize(&w, dt).unwrap())
        .unwrap()
        .unwrap()
}

/// Every kernel level this CPU runs (on aarch64: scalar, NEON, NEON with `sdot`).
fn levels() -> Vec<Isa> {
    [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx2Vnni,
        Isa::Avx512Vnni,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon,
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot,
    ]
    .into_iter()
    .filter(|&l| isa_available(l))
    .collect()
}

fn matmul(c: &mut Criterion) {
    let levels = levels();
    let shapes = [
        ("q4_1_qkv", GgmlDType::Q4_1, 960, 576),
        ("q4_1_gate_up", GgmlDType::Q4_1, 3072, 576),
        ("q4_0_gate_up", GgmlDType::Q4_0, 3072, 576),
        ("q8_0_vocab", GgmlDType::Q8_0, 49152, 576),
    ];
    for (name, dt, n, k) in shapes {
        let w = weight(dt, n, k);
        for m in [1usize, 8, 64] {
            if n > 10_000 && m > 8 {
                continue;
            }
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut acts = QActs::new();
            acts.quantize(&x, k);
            let mut out = vec![0f32; m * n];
            let mut g = c.benchmark_group(format!("matmul_{name}_m{m}"));
            g.throughput(Throughput::Elements((m * n * k) as u64));
            for &level in &levels {
                if level == Isa::Scalar && (m > 1 || n > 10_000) {
                    continue;
                }
                g.bench_function(format!("{level:?}"), |b| {
                    b.iter(|| w.matmul_into_isa(level, &acts, &mut out, n))
                });
            }
            g.finish();
        }
    }
    let mut g = c.benchmark_group("quantize_acts");
    let x: Vec<f32> = Tensor::randn(0f32, 1.0, 1536, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut acts = QActs::new();
    g.bench_function("row_1536", |b| b.iter(|| acts.quantize(&x, 1536)));
    g.finish();
}

/// Random activations of `m` rows of `k` values.
fn acts(m: usize, k: usize) -> Vec<f32> {
    Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Qwen2.5-Coder-0.5B's Q5_0 projections and its Q4_K / Q6_K down projections.
fn qwen_kernels(c: &mut Criterion) {
    let levels = levels();
    let quantized = |dt, n, k| {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dt).unwrap()
    };
    for (name, n, k) in [("q5_0_qk", 1024, 896), ("q5_0_gate_up", 9728, 896)] {
        let w = Q5Weight::from_qtensor(&quantized(GgmlDType::Q5_0, n, k))
            .unwrap()
            .unwrap();
        for m in [1usize, 8, 64] {
            let mut a = QActs::new();
            a.quantize(&acts(m, k), k);
            let mut out = vec![0f32; m * n];
            let mut g = c.benchmark_group(format!("matmul_{name}_m{m}"));
            g.throughput(Throughput::Elements((m * n * k) as u64));
            for &level in &levels {
                if level == Isa::Scalar && m > 1 {
                    continue;
                }
                g.bench_function(format!("{level:?}"), |b| {
                    b.iter(|| w.matmul_into_isa(level, &a, &mut out, n))
                });
            }
            g.finish();
        }
    }
    for (name, dt) in [("q4_k_down", GgmlDType::Q4K), ("q6_k_down", GgmlDType::Q6K)] {
        let (n, k) = (896, 4864);
        let w = KWeight::from_qtensor(&quantized(dt, n, k))
            .unwrap()
            .unwrap();
        for m in [1usize, 64] {
            let mut a = KActs::new();
            a.quantize(&acts(m, k), k);
            let mut out = vec![0f32; m * n];
            let mut g = c.benchmark_group(format!("matmul_{name}_m{m}"));
            g.throughput(Throughput::Elements((m * n * k) as u64));
            for &level in &levels {
                if level == Isa::Scalar && m > 1 {
                    continue;
                }
                g.bench_function(format!("{level:?}"), |b| {
                    b.iter(|| w.matmul_into_isa(level, &a, &mut out, n))
                });
            }
            g.finish();
        }
    }
    let mut g = c.benchmark_group("quantize_acts_q8k");
    let x = acts(1, 4864);
    let mut a = KActs::new();
    g.bench_function("row_4864", |b| b.iter(|| a.quantize(&x, 4864)));
    g.finish();
}

fn attention(c: &mut Criterion) {
    let hd = 64;
    let len = 512;
    let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.37).sin()).collect();
    let k: Vec<half::f16> = (0..hd * len)
        .map(|i| half::f16::from_f32((i as f32 * 0.11).cos()))
        .collect();
    let v = k.clone();
    let mut out = vec![0f32; hd];
    c.bench_function("attend_hd64_len512", |b| {
        b.iter(|| attn::attend(&q, &k, &v, 0.125, &mut out))
    });
    // Three query heads over one KV head (SmolLM2's grouping) at context 128: one head
    // at a time, and interleaved.
    let len = 128;
    let q3: Vec<f32> = (0..3 * hd).map(|i| (i as f32 * 0.37).sin()).collect();
    let (k, v) = (&k[..hd * len], &v[..hd * len]);
    let mut out3 = vec![0f32; 3 * hd];
    c.bench_function("attend_3x_hd64_len128_one_by_one", |b| {
        b.iter(|| {
            for (qh, o) in q3.chunks(hd).zip(out3.chunks_mut(hd)) {
                attn::attend(qh, k, v, 0.125, o)
            }
        })
    });
    c.bench_function("attend_3x_hd64_len128_grouped", |b| {
        b.iter(|| attn::attend_heads(&q3, hd, k, v, 0.125, &mut out3))
    });
    // The same group at context 2048, over an f16 and a bf16 cache of the same values.
    let len = 2048;
    let kf: Vec<f32> = (0..hd * len).map(|i| (i as f32 * 0.11).cos()).collect();
    let k16: Vec<half::f16> = kf.iter().map(|&x| half::f16::from_f32(x)).collect();
    let kb16: Vec<half::bf16> = kf.iter().map(|&x| half::bf16::from_f32(x)).collect();
    c.bench_function("attend_3x_hd64_len2048_f16", |b| {
        b.iter(|| attn::attend_heads(&q3, hd, &k16, &k16, 0.125, &mut out3))
    });
    c.bench_function("attend_3x_hd64_len2048_bf16", |b| {
        b.iter(|| attn::attend_heads_bf16(&q3, hd, &kb16, &kb16, 0.125, &mut out3))
    });
    // And over a q8_0 cache of the same values (stored offset by 128, a scale per 32).
    let mut k8 = vec![0u8; hd * len];
    let mut k8s = vec![half::f16::ZERO; hd * len / 32];
    for (b, (blk, out)) in kf.chunks(32).zip(k8.chunks_mut(32)).enumerate() {
        let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        k8s[b] = half::f16::from_f32(d);
        for (o, x) in out.iter_mut().zip(blk) {
            *o = ((x / d).round() as i32 + 128) as u8;
        }
    }
    let rows = attn::Q8Rows {
        k: &k8,
        k_scale: &k8s,
        v: &k8,
        v_scale: &k8s,
    };
    c.bench_function("attend_3x_hd64_len2048_q8", |b| {
        b.iter(|| attn::attend_heads_q8(&q3, hd, rows, 0.125, &mut out3))
    });
}

/// `CANDELA_BENCH_CPU_SECS=S`: each model shape at 1 and 8 rows, at the best level, run
/// for about S seconds of CPU time each; prints CPU µs per call and per row, and wall µs per call. On a shared
/// machine CPU time is steadier than wall time; run with `RAYON_NUM_THREADS=1`.
fn cpu_matmul(secs: f64) {
    if std::env::var("CANDELA_BENCH_SEQ").is_ok() {
        // CANDELA_BENCH_SEQ=1: the model's Q4_1 projection sequence over 30 layers of
        // distinct random weights, m = 8 (weights stream from memory as in a decode step).
        let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
        let layers: Vec<Vec<QWeight>> = (0..30)
            .map(|_| {
                shapes
                    .iter()
                    .map(|&(n, k)| weight(GgmlDType::Q4_1, n, k))
                    .collect()
            })
            .collect();
        let acts: Vec<QActs> = shapes
            .iter()
            .map(|&(_, k)| {
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, 8 * k, &Device::Cpu)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut a = QActs::new();
                a.quantize(&x, k);
                a
            })
            .collect();
        let mut out = vec![0f32; 8 * 3072];
        let (t0, mut steps) = (std::time::Instant::now(), 0);
        while t0.elapsed().as_secs_f64() < secs {
            for l in &layers {
                for (w, a) in l.iter().zip(&acts) {
                    w.matmul_into(a, &mut out, w.dims().0);
                }
            }
            steps += 1;
        }
        println!(
            "seq m8: {:.3} ms wall per step",
            t0.elapsed().as_secs_f64() * 1e3 / steps as f64
        );
        return;
    }
    let shapes = [
        ("q4_1_qkv", GgmlDType::Q4_1, 960, 576),
        ("q4_1_wo", GgmlDType::Q4_1, 576, 576),
        ("q4_1_gate_up", GgmlDType::Q4_1, 3072, 576),
        ("q4_1_down", GgmlDType::Q4_1, 576, 1536),
        ("q4_0_gate_up", GgmlDType::Q4_0, 3072, 576),
        ("q8_0_vocab", GgmlDType::Q8_0, 49152, 576),
    ];
    // CANDELA_BENCH_LAYERS=L: L copies of each weight, used in turn, so that (as in the
    // model) the weights stream from memory instead of staying in cache.
    let copies: usize = std::env::var("CANDELA_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for (name, dt, n, k) in shapes {
        if copies > 1 && n > 10_000 {
            continue;
        }
        let ws: Vec<QWeight> = (0..copies).map(|_| weight(dt, n, k)).collect();
        for m in [1usize, 8] {
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, m * k, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut acts = QActs::new();
            acts.quantize(&x, k);
            let mut out = vec![0f32; m * n];
            // Reading the CPU time costs ~100 µs (/proc): read it every ~20 ms of work.
            let t1 = std::time::Instant::now();
            for w in &ws {
                w.matmul_into(&acts, &mut out, n);
            }
            let reps = (0.02 / t1.elapsed().as_secs_f64()).ceil().max(1.0) as u64;
            let (c0, t0, mut calls) = (cpu_seconds(), std::time::Instant::now(), 0u64);
            while cpu_seconds() - c0 < secs {
                for _ in 0..reps {
                    for w in &ws {
                        w.matmul_into(&acts, &mut out, n);
                    }
                }
                calls += reps * ws.len() as u64;
            }
            let us = (cpu_seconds() - c0) * 1e6 / calls as f64;
            let wall = t0.elapsed().as_secs_f64() * 1e6 / calls as f64;
            println!(
                "{name:>14} m{m}: {us:9.1} µs CPU per call, {:8.1} per row, {:6.1} GMAC/s; {wall:9.1} µs wall",
                us / m as f64,
                (m * n * k) as f64 / us / 1e3
            );
        }
    }
}

criterion_group!(benches, matmul, qwen_kernels, attention);

/// `CANDELA_BENCH_MEMBW=1`: the machine's read bandwidth, for the decode figures' roofline:
/// 1 GiB summed by the rayon pool (`RAYON_NUM_THREADS`), best of six passes.
fn read_bandwidth() {
    use rayon::prelude::*;
    let words = 1usize << 27;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..6 {
        let t = std::time::Instant::now();
        // Eight independent sums a chunk (vectorized): the loop is bound by the loads.
        let sum: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut l = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for (a, x) in l.iter_mut().zip(w) {
                        *a = a.wrapping_add(*x);
                    }
                }
                l.iter().fold(0u64, |a, x| a.wrapping_add(*x))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    println!(
        "read bandwidth: {best:.1} GB/s with {} threads",
        rayon::current_num_threads()
    );
}

fn main() {
    if std::env::var("CANDELA_BENCH_MEMBW").is_ok() {
        return read_bandwidth();
    }
    if let Some(s) = std::env::var("CANDELA_BENCH_CPU_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return cpu_matmul(s);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

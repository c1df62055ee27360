//! One decode step of the default model (batch 1 and batch 8), one 128-token prefill
//! chunk, on the CPU, and sampling one token from its vocabulary. Needs the model: `CANDELA_TEST_DATA_DIR=/tmp/cdata` (or
//! `CANDELA_BENCH_MODEL=/path/to.gguf`).

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;
use util::cpu_seconds;

use candela::engine::decode::sampling::Sampler;
use candela::engine::model::{Model, SeqInput};
use candela::engine::SamplingParams;
use candela::kv::{KvDtype, SeqCache};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use criterion::{criterion_group, Criterion};

fn model_path() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("CANDELA_BENCH_MODEL") {
        return p.into();
    }
    let dir = std::env::var("CANDELA_TEST_DATA_DIR").unwrap_or_else(|_| "/tmp/cdata".into());
    std::path::Path::new(&dir).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load() -> Model {
    let path = model_path();
    let mut f = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set CANDELA_BENCH_MODEL)", path.display()));
    let ct = gguf_file::Content::read(&mut f).unwrap();
    Model::from_gguf(&ct, &mut f, &Device::Cpu, 2048).unwrap()
}

/// Caches each holding a `len`-token prompt.
fn primed(model: &Model, n: usize, len: usize) -> Vec<SeqCache> {
    (0..n)
        .map(|i| {
            let mut c = SeqCache::new(model.cache_layout(KvDtype::F16), &Device::Cpu);
            let toks: Vec<u32> = (0..len as u32)
                .map(|t| 1000 + (t * 37 + i as u32) % 30000)
                .collect();
            model
                .forward(&mut [SeqInput {
                    tokens: &toks,
                    cache: &mut c,
                    all_logits: false,
                }])
                .unwrap();
            c
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let model = load();
    for batch in [1usize, 8] {
        let mut caches = primed(&model, batch, 128);
        c.bench_function(&format!("decode_step_batch{batch}_ctx128"), |b| {
            b.iter(|| {
                let toks = [1234u32];
                let mut inputs: Vec<SeqInput> = caches
                    .iter_mut()
                    .map(|c| SeqInput {
                        tokens: &toks,
                        cache: c,
                        all_logits: false,
                    })
                    .collect();
                let out = model.forward(&mut inputs).unwrap();
                for c in caches.iter_mut() {
                    c.truncate(128);
                }
                out
            })
        });
    }
    let prompt: Vec<u32> = (0..128u32).map(|t| 1000 + t * 91 % 30000).collect();
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10);
    g.bench_function("prefill_128", |b| {
        b.iter(|| {
            let mut cache = SeqCache::new(model.cache_layout(KvDtype::F16), &Device::Cpu);
            model
                .forward(&mut [SeqInput {
                    tokens: &prompt,
                    cache: &mut cache,
                    all_logits: false,
                }])
                .unwrap()
        })
    });
    g.finish();
}

/// `CANDELA_BENCH_CPU_STEPS=N`: run N decode steps at context 128, at batch 1 and at
/// batch 8 (or the sizes in `CANDELA_BENCH_BATCH`, comma-separated; the context length
/// in `CANDELA_BENCH_CTX`), and print the CPU time per step next to the wall time. On a shared machine
/// CPU time is the steadier number; run with `RAYON_NUM_THREADS=1` so that no idle
/// worker spins into it.
fn cpu_steps(n: usize) {
    let model = load();
    let batches: Vec<usize> = std::env::var("CANDELA_BENCH_BATCH")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    let ctx: usize = std::env::var("CANDELA_BENCH_CTX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    for batch in batches {
        let mut caches = primed(&model, batch, ctx);
        let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
        for _ in 0..n {
            let mut inputs: Vec<SeqInput> = caches
                .iter_mut()
                .map(|c| SeqInput {
                    tokens: &[1234],
                    cache: c,
                    all_logits: false,
                })
                .collect();
            model.forward(&mut inputs).unwrap();
            for c in caches.iter_mut() {
                c.truncate(ctx);
            }
        }
        let (cpu, wall) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
        println!(
            "decode step, batch {batch}, ctx {ctx}: {:.2} ms CPU, {:.2} ms wall (isa {:?})",
            cpu * 1e3 / n as f64,
            wall * 1e3 / n as f64,
            candela::engine::kernels::quant::isa()
        );
    }
}

/// Sampling one token from the default model's 49,152 logits as the peer benchmark asks
/// for it (temperature 1, no top-k/top-p), and with top-p 0.9, top-k 40, and greedy.
fn sampling(c: &mut Criterion) {
    let vocab = 49152;
    // Logits shaped like a model's: a few large values over a long low tail.
    let logits: Vec<f32> = (0..vocab)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2654435761) as f32 / u32::MAX as f32;
            8.0 * h * h * h * h - 2.0
        })
        .collect();
    let mut g = c.benchmark_group("sample_vocab49152");
    for (name, p) in [
        ("temp1", SamplingParams::default()),
        (
            "temp08_top_p09",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_k40",
            SamplingParams {
                top_k: 40,
                ..Default::default()
            },
        ),
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
        ),
    ] {
        let mut s = Sampler::new(SamplingParams { seed: Some(1), ..p });
        let mut buf = logits.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                buf.copy_from_slice(&logits);
                s.sample(&mut buf, &[])
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, sampling);

fn main() {
    if let Some(n) = std::env::var("CANDELA_BENCH_CPU_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return cpu_steps(n);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

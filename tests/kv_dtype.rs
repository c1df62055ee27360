//! `kv.dtype` against the real server: each cache type gives the same greedy
//! continuation from the cache as without it, accounts its real bytes per token (sessions
//! API, metrics), and a spill file of another type is skipped, never misread.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candela::kv::KvDtype;
use common::Running;
use serde_json::{json, Value};

fn server(dtype: KvDtype) -> String {
    match dtype {
        KvDtype::F32 => common::server_with("f32", |c| c.kv_dtype = KvDtype::F32),
        KvDtype::F16 => common::server_with("f16", |c| c.kv_dtype = KvDtype::F16),
        KvDtype::BF16 => common::server_with("bf16", |c| c.kv_dtype = KvDtype::BF16),
        KvDtype::Q8_0 => common::server_with("q8_0", |c| c.kv_dtype = KvDtype::Q8_0),
    }
}

async fn chat(url: &str, key: &str, messages: &Value) -> Value {
    let (st, r) = common::post_json(
        &format!("{url}/v1/chat/completions"),
        &json!({"messages": messages, "max_tokens": 16, "temperature": 0, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    r
}

fn cached(r: &Value) -> u64 {
    r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

fn text(r: &Value) -> &str {
    r["choices"][0]["message"]["content"].as_str().unwrap()
}

/// Two turns of one session; the second turn again under a fresh key (no cache).
/// Returns (cached turn-2 reply, uncached turn-2 reply, cached tokens of turn 2).
async fn cached_vs_uncached(dtype: KvDtype) -> (String, String, u64) {
    let url = server(dtype);
    let key = format!("dtype-{dtype}");
    let m1 = json!([
        {"role": "system", "content": "You are a terse assistant for a gardening shop."},
        {"role": "user", "content": "List three vegetables that grow well in shade."}
    ]);
    let r1 = chat(&url, &key, &m1).await;
    let mut m2 = m1.as_array().unwrap().clone();
    m2.push(json!({"role": "assistant", "content": text(&r1)}));
    m2.push(json!({"role": "user", "content": "Which of them is easiest for a beginner?"}));
    let m2 = Value::Array(m2);
    let warm = chat(&url, &key, &m2).await;
    let cold = chat(&url, &format!("{key}-fresh"), &m2).await;
    assert_eq!(cached(&cold), 0, "a fresh key must not reuse anything");
    (
        text(&warm).to_string(),
        text(&cold).to_string(),
        cached(&warm),
    )
}

#[tokio::test]
async fn cached_equals_uncached_greedy_output_in_f32_and_f16() {
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let (warm, cold, reused) = cached_vs_uncached(dtype).await;
        assert!(reused > 20, "{dtype}: only {reused} tokens reused");
        assert_eq!(warm, cold, "{dtype}: cached and uncached replies differ");
        assert!(!warm.is_empty());
    }
}

#[tokio::test]
async fn q8_0_and_bf16_caches_serve_and_reuse() {
    for dtype in [KvDtype::Q8_0, KvDtype::BF16] {
        let (warm, cold, reused) = cached_vs_uncached(dtype).await;
        assert!(reused > 20, "{dtype}: only {reused} tokens reused");
        // Same cache contents either way (the prompt's K/V are stored in the cache type
        // before attention reads them), so the replies agree here too.
        assert_eq!(warm, cold, "{dtype}: cached and uncached replies differ");
        assert!(!warm.trim().is_empty(), "{dtype}: empty reply");
    }
}

#[tokio::test]
async fn bytes_per_token_follow_the_dtype_in_the_sessions_api_and_metrics() {
    // SmolLM2-135M: 2 (K, V) x 30 layers x 3 KV heads x 64 values.
    for (dtype, per_token) in [
        (KvDtype::F32, 46_080u64),
        (KvDtype::F16, 23_040),
        (KvDtype::Q8_0, 12_240),
    ] {
        let url = server(dtype);
        let key = format!("bytes-{dtype}");
        chat(
            &url,
            &key,
            &json!([{"role": "user", "content": "Say hello."}]),
        )
        .await;
        let list: Value = reqwest::get(format!("{url}/v1/sessions"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["kv_dtype"], dtype.name(), "{list}");
        assert_eq!(list["kv_bytes_per_token"], per_token, "{list}");
        let s: Value = reqwest::get(format!("{url}/v1/sessions/{key}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // Caches grow in 256-token steps; a short session holds exactly one step.
        assert_eq!(
            s["bytes"].as_u64().unwrap(),
            256 * per_token,
            "{dtype}: {s}"
        );
        let metrics = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = format!("candela_kv_bytes_per_token{{dtype=\"{dtype}\"}} {per_token}");
        assert!(metrics.contains(&line), "{dtype}: no `{line}`");
    }
}

async fn start(spill: &std::path::Path, dtype: KvDtype) -> Running {
    let mut cfg = common::test_config(spill.to_path_buf());
    cfg.queue_size = 16;
    cfg.max_batch = 4;
    cfg.kv_dtype = dtype;
    Running::start(cfg).await
}

async fn session(url: &str, id: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{url}/v1/sessions/{id}"))
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_spill_file_of_another_dtype_is_skipped_and_kept_for_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let m = json!([{"role": "user", "content": "Name a colour."}]);
    // f16 server: one session, spilled on the graceful stop.
    let a = start(dir.path(), KvDtype::F16).await;
    let first = chat(&a.url, "keep", &m).await;
    a.stop().await;
    // A q8_0 server on the same dir does not load it (and does not crash).
    let b = start(dir.path(), KvDtype::Q8_0).await;
    assert_eq!(session(&b.url, "keep").await.0, 404);
    let fresh = chat(&b.url, "other", &m).await;
    assert_eq!(cached(&fresh), 0);
    b.stop().await;
    // Back on f16, the session is there and restores from its file.
    let c = start(dir.path(), KvDtype::F16).await;
    let (st, s) = session(&c.url, "keep").await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(s["tier"], "disk");
    let again = chat(&c.url, "keep", &m).await;
    assert!(cached(&again) > 0, "{again}");
    assert_eq!(text(&again), text(&first));
    c.stop().await;
}

/// On the CPU a q8_0 cache lives in host vectors and attention reads its bytes with
/// candela's kernel, in the arithmetic of llama.cpp's flash attention over a Q8_0 cache:
/// greedy output equals llama.cpp's (`-ctk q8_0 -ctv q8_0 -fa on`, the fixture of
/// `tests/fixtures/gen_llama_ref_kv.py`, which rotates Q, K and V by a Walsh-Hadamard
/// matrix in front of the cache as candela does) on every prompt, 32 tokens each.
#[test]
fn q8_0_cache_on_the_cpu_kernels_follows_llama_cpp() {
    use candela::kv::SeqCache;
    use candle_core::quantized::gguf_file;
    let path = common::model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let dev = candle_core::Device::Cpu;
    let model = candela::engine::model::Model::from_gguf(&ct, &mut f, &dev, 1024).unwrap();
    let layout = model.cache_layout(KvDtype::Q8_0);
    assert!(SeqCache::new(layout, &dev).is_host());
    assert!(!SeqCache::new_tensor_path(layout, &dev).is_host());
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/llama_ref_q8_0.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut report = Vec::new();
    for g in fx["greedy"].as_array().unwrap() {
        let prompt = common::ids(&g["prompt_ids"]);
        let want = common::ids(&g["completion_ids"]);
        let got = common::greedy_on(&model, SeqCache::new(layout, &dev), &prompt, want.len());
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        report.push(agree);
        assert_eq!(
            got, want,
            "prompt {:?}: parts after {agree} tokens ({report:?})",
            g["prompt"]
        );
    }
    eprintln!("q8_0 cache: tokens agreeing with llama.cpp per prompt: {report:?}");
}

/// Greedy decoding of `prompt` on the CPU kernels (a host cache of `dtype`) and on the
/// tensor path (the same type in tensors), `n` tokens each: the tokens that agree, and
/// where they part, how far the tensor path's logit of its own pick was above its
/// logit of the kernels' pick (how near a tie it was).
fn kernels_vs_tensor_path(
    model: &candela::engine::model::Model,
    dtype: KvDtype,
    prompt: &[u32],
    n: usize,
) -> (usize, Option<f32>) {
    use candela::kv::SeqCache;
    let dev = candle_core::Device::Cpu;
    let layout = model.cache_layout(dtype);
    assert!(SeqCache::new(layout, &dev).is_host(), "{dtype}");
    let (want, rows) =
        common::greedy_with_logits(model, SeqCache::new_tensor_path(layout, &dev), prompt, n);
    let got = common::greedy_on(model, SeqCache::new(layout, &dev), prompt, n);
    let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    if agree == n {
        return (n, None);
    }
    let row = &rows[agree];
    (
        agree,
        Some(row[want[agree] as usize] - row[got[agree] as usize]),
    )
}

/// On the CPU a bf16 cache lives in host vectors and attention reads it with candela's
/// kernel, in f32 over the widened values as the tensor path computes attention over a
/// bf16 cache (only the order of the additions differs). The rest of the two forward
/// passes differ at rounding level for every cache type (the f16 kernels follow
/// llama.cpp token for token where the tensor path does not), so greedy output is
/// compared, for f16 as the control and for bf16, over the prompts of
/// `tests/fixtures/llama_ref.json`, 32 tokens each: where the kernels part from the
/// tensor path, the tensor path's own choice must have been a near tie (its logit under
/// 0.5 above the kernels' pick; a wrong kernel parts at once, by whole units).
#[test]
fn bf16_cache_on_the_cpu_kernels_parts_from_the_tensor_path_only_at_near_ties() {
    use candle_core::quantized::gguf_file;
    let path = common::model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let dev = candle_core::Device::Cpu;
    let model = candela::engine::model::Model::from_gguf(&ct, &mut f, &dev, 1024).unwrap();
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_ref.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for dtype in [KvDtype::F16, KvDtype::BF16] {
        let (mut report, mut gaps) = (Vec::new(), Vec::new());
        for g in fx["greedy"].as_array().unwrap() {
            let prompt = common::ids(&g["prompt_ids"]);
            let (agree, gap) = kernels_vs_tensor_path(&model, dtype, &prompt, 32);
            report.push(agree);
            gaps.extend(gap);
            if let Some(gap) = gap {
                assert!(
                    (0.0..0.5).contains(&gap),
                    "{dtype}, prompt {:?}: parts after {agree} tokens, {gap} from a tie",
                    g["prompt"]
                );
            }
        }
        let whole = report.iter().filter(|&&a| a == 32).count();
        eprintln!(
            "{dtype} cache: tokens agreeing with the tensor path per prompt: {report:?} \
             ({whole} of {} prompts whole; logit gaps where they part: {gaps:.3?})",
            report.len()
        );
    }
}

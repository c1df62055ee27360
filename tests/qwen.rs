//! The second model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`qwen2`: QKV biases, tied
//! embeddings; Q5_0/Q8_0/Q4_K/Q6_K tensors), against llama.cpp on the same file
//! (`tests/fixtures/llama_ref_qwen.json`), and several models served at once.
//!
//! The file (491 MB) is fetched by the tests themselves through the same code path as
//! `candela fetch qwen2.5-coder-0.5b` (set `CANDELA_TEST_DATA_DIR` to share one copy).

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::ids;

use candela::engine::model::Model;
use candela::engine::{ChatTemplate, TemplateMessage};
use candela::kv::KvDtype;
use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde_json::{json, Value};

const QWEN: &str = "qwen2.5-coder-0.5b";
const SMOL: &str = "smollm2-135m-instruct";
/// `<|endoftext|>` and `<|im_end|>`: where Qwen's turn ends.
const QWEN_EOG: [u32; 2] = [151_643, 151_645];

/// One server holding both models: the default SmolLM2 first, Qwen second.
fn both() -> String {
    common::server_with("both", |c| {
        c.models
            .push(common::qwen_path().to_string_lossy().into_owned())
    })
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    common::post_json(&format!("{}{path}", both()), &body).await
}

async fn get(path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", both())).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[test]
fn the_file_is_fetched_and_verified() {
    let p = common::qwen_path();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 491_400_064);
    let m = candela::engine::fetch::known_model(QWEN).unwrap();
    let marker = std::fs::read_to_string(format!("{}.verified", p.display())).unwrap();
    assert_eq!(marker.trim(), m.sha256);
    // A second resolve uses the cache (no download) and names the model the same way.
    let r = candela::engine::fetch::resolve("qwen", &common::data_dir()).unwrap();
    assert_eq!((r.id.as_str(), &r.path), (QWEN, &p));
}

#[tokio::test]
async fn tokenizer_ids_equal_llama_cpp() {
    let fx = common::fixture_qwen();
    assert_eq!(fx["metadata"]["tokenizer.ggml.pre"], "qwen2");
    let cases = fx["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for c in cases {
        let (st, r) = post("/tokenize", json!({"model": QWEN, "content": c["text"]})).await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(ids(&r["tokens"]), ids(&c["ids"]), "text {:?}", c["text"]);
    }
}

/// Qwen's own template (with tools, tool calls and tool results) renders through
/// minijinja exactly as transformers' `apply_chat_template` renders it with jinja2.
#[test]
fn chat_template_with_tools_renders_like_transformers() {
    let fx = common::fixture_qwen();
    let t = ChatTemplate::new(
        fx["metadata"]["tokenizer.chat_template"].as_str().unwrap(),
        "",
        "",
    )
    .unwrap();
    let cases = fx["template"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let msgs: Vec<TemplateMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| TemplateMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
                name: None,
                tool_call_id: m["tool_call_id"].as_str().map(String::from),
                tool_calls: m.get("tool_calls").cloned(),
            })
            .collect();
        let tools = c.get("tools").filter(|t| !t.is_null());
        let got = t.render(&msgs, tools, true).unwrap();
        assert_eq!(got, c["text"].as_str().unwrap());
    }
}

/// Greedy decoding through the server against llama.cpp's on the same file: leading
/// tokens agree while llama.cpp's text so far is a prefix of ours; where llama.cpp ends
/// the turn we must end it too (and count the end token as agreeing).
///
/// Every prompt must agree all the way (32 tokens, or through llama.cpp's end of turn).
#[tokio::test]
async fn greedy_completions_follow_llama_cpp() {
    let fx = common::fixture_qwen();
    let mut report = Vec::new();
    let mut full = 0;
    for g in fx["greedy"].as_array().unwrap() {
        let all = ids(&g["completion_ids"]);
        let want: Vec<u32> = all
            .iter()
            .copied()
            .take_while(|t| !QWEN_EOG.contains(t))
            .collect();
        let (st, r) = post(
            "/v1/completions",
            json!({"model": QWEN, "prompt": g["prompt_ids"], "max_tokens": 32, "temperature": 0,
                   "prompt_cache_key": format!("greedy-{}", uuid::Uuid::new_v4().simple())}),
        )
        .await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["model"], QWEN);
        let text = r["choices"][0]["text"].as_str().unwrap().to_string();
        let mut agree = 0;
        for k in 1..=want.len() {
            let (_, t) = post("/detokenize", json!({"model": QWEN, "tokens": &want[..k]})).await;
            let t = t["content"].as_str().unwrap();
            if t.contains('\u{FFFD}') {
                continue;
            }
            if !text.starts_with(t) {
                break;
            }
            agree = k;
        }
        let ended = want.len() < all.len();
        if ended && agree == want.len() {
            let (_, t) = post("/detokenize", json!({"model": QWEN, "tokens": &want})).await;
            if r["choices"][0]["finish_reason"] == "stop" && t["content"] == text.as_str() {
                agree += 1; // the end-of-turn token agrees too
                full += 1;
            }
        } else if agree == all.len() {
            full += 1;
        }
        report.push(agree);
        // Every prompt agrees on its first three tokens (or a shorter whole answer).
        let floor = if ended { (want.len() + 1).min(3) } else { 3 };
        assert!(
            agree >= floor,
            "greedy output left llama.cpp's within {floor} tokens for {:?}: {report:?}",
            g["prompt"]
        );
    }
    eprintln!("qwen: tokens agreeing with llama.cpp per prompt: {report:?}");
    assert!(
        full == 10,
        "only {full} of 10 prompts agree fully: {report:?}"
    );
}

fn load(f32_weights: bool) -> Model {
    let path = common::qwen_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    if f32_weights {
        Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, 512).unwrap()
    } else {
        Model::from_gguf(&ct, &mut f, &Device::Cpu, 512).unwrap()
    }
}

/// In plain f32 (weights dequantized, f32 cache) cached decoding must equal full
/// recomputation to float tolerance (measured: ~3e-5). With the quantized weights and
/// the f16 cache the server uses, the best token must agree at every position and the
/// logits stay within 1.0 (measured: up to ~0.5 of ~15): the one-row and many-row
/// attention products round differently at float level, and the 8-bit quantization of
/// the next layer's activations turns that into whole quantization steps.
#[test]
fn cached_decode_equals_full_recompute() {
    let fx = common::fixture_qwen();
    let g = &fx["greedy"][1];
    let seq: Vec<u32> = ids(&g["prompt_ids"])
        .into_iter()
        .chain(ids(&g["completion_ids"]))
        .collect();
    let split = seq.len() - 12;
    let r = common::full_vs_cached(&load(true), KvDtype::F32, &seq, split);
    eprintln!("f32: (max |full - cached|, same argmax) at 4 positions: {r:?}");
    assert!(r.iter().all(|&(d, same)| d < 1e-3 && same), "{r:?}");
    let r = common::full_vs_cached(&load(false), KvDtype::F16, &seq, split);
    eprintln!("quantized, f16 cache: (max |full - cached|, same argmax): {r:?}");
    assert!(r.iter().all(|&(d, same)| d < 1.0 && same), "{r:?}");
}

#[tokio::test]
async fn models_lists_both_and_requests_route_by_model() {
    let (st, r) = get("/v1/models").await;
    assert_eq!(st, 200);
    let listed: Vec<&str> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [SMOL, QWEN]);
    let (st, r) = get(&format!("/v1/models/{QWEN}")).await;
    assert_eq!((st, r["id"].as_str()), (200, Some(QWEN)));

    // Each request is served by the model it names: its greedy output is that model's
    // (llama.cpp's first tokens on each file), and the response says which.
    let fq = &common::fixture_qwen()["greedy"][1];
    let fs = &common::fixture()["greedy"][1];
    for (name, fx, served) in [
        (Some(QWEN), fq, QWEN),
        (Some("qwen"), fq, QWEN),
        (Some(SMOL), fs, SMOL),
        (Some("default"), fs, SMOL),
        (None, fs, SMOL),
    ] {
        let mut body = json!({"prompt": fx["prompt_ids"], "max_tokens": 4, "temperature": 0});
        if let Some(n) = name {
            body["model"] = json!(n);
        }
        let (st, r) = post("/v1/completions", body).await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["model"], served, "model {name:?}");
        let (_, want) = post(
            "/detokenize",
            json!({"model": served, "tokens": &ids(&fx["completion_ids"])[..4]}),
        )
        .await;
        assert_eq!(r["choices"][0]["text"], want["content"], "model {name:?}");
    }
    // Chat too, and the two tokenizers differ on the same text.
    let (st, r) = post(
        "/v1/chat/completions",
        json!({"model": QWEN, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!((st, r["model"].as_str()), (200, Some(QWEN)), "{r}");
    let (_, a) = post(
        "/tokenize",
        json!({"model": QWEN, "content": "Hello world"}),
    )
    .await;
    let (_, b) = post("/tokenize", json!({"content": "Hello world"})).await;
    assert_ne!(a["tokens"], b["tokens"]);

    // An unknown model is a 404 in OpenAI's shape, on every route that takes `model`.
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-4o", "prompt": "hi"}),
        ),
        ("/tokenize", json!({"model": "gpt-4o", "content": "hi"})),
    ] {
        let (st, r) = post(path, body).await;
        assert_eq!(st, 404, "{path}: {r}");
        assert_eq!(r["error"]["code"], "model_not_found");
        assert_eq!(r["error"]["param"], "model");
        assert!(r["error"]["message"].as_str().unwrap().contains(QWEN));
    }
    let (st, r) = get("/v1/models/gpt-4o").await;
    assert_eq!(
        (st, r["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // Per-model series carry the model's name, one series per configured model.
    let text = reqwest::get(format!("{}/metrics", both()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [QWEN, SMOL] {
        for name in [
            "candela_generated_tokens_total",
            "candela_model_weight_bytes",
            "candela_requests_running",
        ] {
            let series = format!("{name}{{model=\"{m}\"}}");
            assert!(text.contains(&series), "missing {series}");
        }
    }
}

/// Sessions are per model: the same id names one session in each model's store.
#[tokio::test]
async fn sessions_are_per_model() {
    let key = format!("both-{}", uuid::Uuid::new_v4().simple());
    for m in [QWEN, SMOL] {
        let (st, r) = post(
            "/v1/completions",
            json!({"model": m, "prompt": "def add(a, b):", "max_tokens": 3, "prompt_cache_key": key}),
        )
        .await;
        assert_eq!(st, 200, "{r}");
    }
    let (_, list) = get("/v1/sessions").await;
    let mine: Vec<&Value> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["id"] == key.as_str())
        .collect();
    let mut models: Vec<&str> = mine.iter().map(|s| s["model"].as_str().unwrap()).collect();
    models.sort();
    assert_eq!(models, [QWEN, SMOL]);
    let (_, only) = get(&format!("/v1/sessions?model={QWEN}")).await;
    assert!(only["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["model"] == QWEN));
    // Ambiguous without ?model; precise with it.
    let (st, r) = get(&format!("/v1/sessions/{key}")).await;
    assert_eq!(
        (st, r["error"]["param"].as_str()),
        (400, Some("model")),
        "{r}"
    );
    let (st, r) = get(&format!("/v1/sessions/{key}?model=qwen")).await;
    assert_eq!((st, r["model"].as_str()), (200, Some(QWEN)), "{r}");
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/sessions/{key}?model={QWEN}", both()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Now only SmolLM's holds it, and the id alone finds it.
    let (st, r) = get(&format!("/v1/sessions/{key}")).await;
    assert_eq!((st, r["model"].as_str()), (200, Some(SMOL)), "{r}");
    let (st, _) = get(&format!("/v1/sessions/{key}?model={QWEN}")).await;
    assert_eq!(st, 404);
}

/// `candela plan` for the qwen model: 2 (K, V) x 24 layers x 2 KV heads x 64 x 2 bytes.
#[test]
fn plan_figures_for_qwen() {
    let gguf = common::qwen_path();
    let budget = 1u64 << 30;
    let p = candela::cli::plan::plan(
        &gguf,
        QWEN,
        KvDtype::F16,
        budget,
        4096,
        (24 << 30, 20 << 30),
    )
    .unwrap();
    assert_eq!(
        (p.arch.as_str(), p.n_layers, p.n_kv_heads),
        ("qwen2", 24, 2)
    );
    assert_eq!(p.bytes_per_token, 12_288);
    assert_eq!(p.tokens_fit, budget / 12_288);
    assert_eq!(p.train_ctx, 32_768);
    let file = std::fs::metadata(&gguf).unwrap().len();
    assert!(p.weight_bytes < file && p.weight_bytes > file * 9 / 10);
    // Q5_0, Q8_0, Q4_K and Q6_K projections all prefill wide on a CUDA card: f32 rows of
    // 1,024 x (896 + 1,152 + 896 + 896), the step buffer (1 + 1,024 x 51 words), f16
    // input rows (1,024 x 4,864), the dequantized gate|up (9,728 x 896 in f16), its f32
    // output (1,024 x 9,728), SwiGLU's in f16 (1,024 x 4,864) and cuBLAS's workspace.
    assert_eq!(
        p.gpu_scratch,
        15_728_640 + 417_800 + 9_961_472 + 17_432_576 + 39_845_888 + 9_961_472 + (32 << 20)
    );
}

/// The multi-turn tool loop through the official `openai` SDK (call -> tool result ->
/// answer, plus streamed call deltas), on Qwen with its own tool-aware chat template.
#[test]
fn openai_sdk_tool_loop_on_qwen() {
    let base = both();
    let stdout = common::run_sdk_script("openai_tool_loop.py", &[&base, QWEN]);
    assert!(stdout.contains("tool loop ok"), "{stdout}");
    eprintln!("{stdout}");
}

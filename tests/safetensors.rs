//! Hugging Face model directories, checked against the real default model: a directory
//! is built from the GGUF (every tensor dequantized to f32, Q/K rows un-permuted back to
//! Hugging Face's layout, HF tensor names, two shards and an index, `config.json` from
//! the GGUF metadata, the GGUF's tokenizer saved as `tokenizer.json`, its chat template
//! in `tokenizer_config.json`). Served from that directory, candela must give the same
//! logits, token ids, chat prompts and greedy completions as the GGUF run in f32.
//! Bad directories and an unreachable hub must fail at start-up with a clear message.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candela::engine::decode::sampling::argmax;
use candela::engine::model::{Model, ModelConfig, SeqInput};
use candela::engine::Tok;
use candela::kv::{KvDtype, SeqCache};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde_json::{json, Value};

const CTX: usize = 2048;

fn gguf() -> (gguf_file::Content, std::fs::File) {
    let mut f = std::fs::File::open(common::model_path()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    (ct, f)
}

/// The Hugging Face directory built from the default GGUF, once per test binary.
fn hf_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("SmolLM2-135M-Instruct-hf");
        std::fs::create_dir(&dir).unwrap();
        build_hf_dir(&dir);
        (root, dir)
    })
    .1
}

/// The GGUF `ct` as a Hugging Face directory's weights and `config.json`.
fn write_weights(ct: &gguf_file::Content, f: &mut std::fs::File, dir: &Path) -> ModelConfig {
    common::hfdir::write_weights(ct, f, dir, Default::default(), &json!({}))
}

fn build_hf_dir(dir: &Path) {
    let (ct, mut f) = gguf();
    write_weights(&ct, &mut f, dir);
    let write = |name: &str, v: Value| {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&v).unwrap()).unwrap()
    };
    // config.json as transformers writes it: BOS/EOS ids beside the shapes.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["bos_token_id"] = json!(1);
    config["eos_token_id"] = json!(2);
    write("config.json", config);
    let tok = Tok::from_gguf(&ct, None).unwrap();
    tok.save_json(&dir.join("tokenizer.json")).unwrap();
    let template = ct.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    // A list of named templates: `default` must be picked, not the first.
    write(
        "tokenizer_config.json",
        json!({
            "add_bos_token": false,
            "bos_token": tok.id_to_token(1).unwrap(),
            "eos_token": {"content": tok.id_to_token(2).unwrap(), "special": true},
            "chat_template": [
                {"name": "tool_use", "template": "WRONG TEMPLATE"},
                {"name": "default", "template": template}
            ]
        }),
    );
    write("generation_config.json", json!({"eos_token_id": [2]}));
}

/// The GGUF with every weight dequantized to f32: the reference.
fn reference() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let (ct, mut f) = gguf();
        Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, CTX).unwrap()
    })
}

fn gguf_tok() -> &'static Tok {
    static T: OnceLock<Tok> = OnceLock::new();
    T.get_or_init(|| Tok::from_gguf(&gguf().0, None).unwrap())
}

/// Logits of every position of `ids`: a prefill of all but the last 4, then single steps.
fn logits(m: &Model, ids: &[u32], dtype: KvDtype) -> Vec<Vec<f32>> {
    let mut cache = SeqCache::new(m.cache_layout(dtype), &Device::Cpu);
    let split = ids.len() - 4;
    let mut out = Vec::new();
    for chunk in std::iter::once(&ids[..split]).chain(ids[split..].chunks(1)) {
        let l = m
            .forward(&mut [SeqInput {
                tokens: chunk,
                cache: &mut cache,
                all_logits: true,
            }])
            .unwrap();
        out.extend(l[0].to_vec2::<f32>().unwrap());
    }
    out
}

#[test]
fn logits_match_the_gguf_in_f32_at_every_position() {
    let hf = Model::from_hf_dir(hf_dir(), &Device::Cpu, CTX).unwrap();
    let rf = reference();
    let (a, b) = (&hf.config, &rf.config);
    assert_eq!(a.arch, "llama");
    assert_eq!(
        (
            a.n_layers,
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            a.hidden,
            a.vocab
        ),
        (
            b.n_layers,
            b.n_heads,
            b.n_kv_heads,
            b.head_dim,
            b.hidden,
            b.vocab
        )
    );
    assert_eq!(
        (a.rope_base, a.rms_eps, a.train_ctx),
        (b.rope_base, b.rms_eps, b.train_ctx)
    );
    assert!(a.rope_neox && !b.rope_neox, "HF layout rotates halves");
    assert_eq!(
        hf.weight_bytes,
        4 * 134_515_008,
        "f32 weights, embeddings tied"
    );
    let ids = gguf_tok()
        .encode(
            "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n\
             <|im_start|>assistant\nThe capital of France is",
            true,
        )
        .unwrap();
    assert!(ids.len() > 24);
    // f16 cache: the fused CPU path, where Q and the attention weights are rounded to
    // f16 as ggml does, so a last-bit difference in a Q.K sum (summed in another order:
    // the rows of Q and K sit elsewhere) can move a rounding step; f32 cache: the
    // tensor path in plain f32. A wrong rotary style moves logits by whole units.
    for (dtype, tol) in [(KvDtype::F16, 0.1), (KvDtype::F32, 1e-3)] {
        let (x, y) = (logits(&hf, &ids, dtype), logits(rf, &ids, dtype));
        assert_eq!(x.len(), ids.len());
        let mut worst = 0f32;
        for (p, (x, y)) in x.iter().zip(&y).enumerate() {
            let d = x
                .iter()
                .zip(y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max(d);
            assert_eq!(argmax(x), argmax(y), "{dtype:?}: best token differs at {p}");
        }
        eprintln!(
            "{dtype:?}: max |logit difference| {worst:e} over {} positions",
            ids.len()
        );
        assert!(worst < tol, "{dtype:?}: logits differ by {worst}");
    }
}

#[test]
fn plan_reads_the_directory() {
    let p = candela::cli::plan::plan(hf_dir(), "hf", KvDtype::F16, 1 << 30, 4096, (1, 1)).unwrap();
    assert_eq!(
        (p.arch.as_str(), p.n_layers, p.n_kv_heads, p.head_dim),
        ("llama", 30, 3, 64)
    );
    assert_eq!(p.bytes_per_token, 23040);
    assert_eq!(p.train_ctx, 8192);
    assert_eq!(p.weight_bytes, 4 * 134_515_008, "held as f32");
}

/// The qwen2 path — QKV biases, an untied output matrix, no Q/K permutation in the GGUF
/// either — against the real Qwen2.5-Coder GGUF in f32, in plain f32 (f32 cache).
#[test]
fn qwen2_directory_matches_its_gguf_in_f32() {
    let mut f = std::fs::File::open(common::qwen_path()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let root = tempfile::tempdir().unwrap();
    let cfg = write_weights(&ct, &mut f, root.path());
    assert_eq!(cfg.arch, "qwen2");
    let ids = Tok::from_gguf(&ct, None)
        .unwrap()
        .encode(
            "<|im_start|>user\nWrite a Python function that reverses a list.<|im_end|>\n\
             <|im_start|>assistant\n```python\ndef",
            true,
        )
        .unwrap();
    // One model in memory at a time (each is ~2.5 GB in f32).
    let want = {
        let rf = Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, 256).unwrap();
        logits(&rf, &ids, KvDtype::F32)
    };
    let hf = Model::from_hf_dir(root.path(), &Device::Cpu, 256).unwrap();
    assert_eq!(hf.config.arch, "qwen2");
    assert!(hf.config.rope_neox);
    let got = logits(&hf, &ids, KvDtype::F32);
    let mut worst = 0f32;
    for (p, (x, y)) in got.iter().zip(&want).enumerate() {
        let d = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst = worst.max(d);
        assert_eq!(argmax(x), argmax(y), "best token differs at {p}");
    }
    eprintln!(
        "qwen2: max |logit difference| {worst:e} over {} positions",
        ids.len()
    );
    assert!(worst < 1e-3, "logits differ by {worst}");
}

/// Greedy ids from the reference, as the server runs it (f16 cache), up to an
/// end-of-generation token or `n` tokens.
fn greedy_reference(prompt: &[u32], n: usize) -> Vec<u32> {
    let m = reference();
    let mut cache = SeqCache::new(m.cache_layout(KvDtype::F16), &Device::Cpu);
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    while out.len() < n {
        let l = m
            .forward(&mut [SeqInput {
                tokens: &feed,
                cache: &mut cache,
                all_logits: false,
            }])
            .unwrap();
        let t = argmax(&l[0].to_vec2::<f32>().unwrap()[0]);
        if gguf_tok().eog.contains(&t) {
            break;
        }
        out.push(t);
        feed = vec![t];
    }
    out
}

fn hf_server() -> String {
    common::server_with("hf-dir", |c| {
        c.models = vec![hf_dir().to_string_lossy().into_owned()];
    })
}

async fn get(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

async fn tokenize(base: &str, body: Value) -> Vec<u64> {
    let (s, v) = common::post_json(&format!("{base}/tokenize"), &body).await;
    assert_eq!(s, 200, "{v}");
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn served_directory_matches_the_gguf() {
    let (hf, gg) = (hf_server(), common::server());
    // Metadata: the directory's name, the context, the KV plan.
    let models = get(&format!("{hf}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct-hf");
    assert_eq!(models["data"][0]["context_length"], CTX);
    let (a, b) = (
        get(&format!("{hf}/v1/sessions")).await,
        get(&format!("{gg}/v1/sessions")).await,
    );
    assert_eq!(a["kv_bytes_per_token"], 23040);
    assert_eq!(a["kv_bytes_per_token"], b["kv_bytes_per_token"]);
    // Token ids.
    let texts = [
        "Hello world",
        "  leading spaces and\ttabs\n\nnewlines",
        "naïve café 東京 🚀 12345",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "<|im_start|>user\nhi<|im_end|>",
    ];
    for t in texts {
        for special in [false, true] {
            let body = json!({"content": t, "add_special": special});
            assert_eq!(
                tokenize(&hf, body.clone()).await,
                tokenize(&gg, body).await,
                "{t:?}"
            );
        }
    }
    // The chat template renders the same prompt.
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another?"}
    ]);
    let chat_ids = tokenize(&gg, json!({"messages": messages})).await;
    assert_eq!(tokenize(&hf, json!({"messages": messages})).await, chat_ids);
    // Greedy completions equal the f32 GGUF's.
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colors are",
    ];
    for p in prompts {
        let ids = gguf_tok().encode(p, true).unwrap();
        let want = gguf_tok()
            .decode(&greedy_reference(&ids, 24), false)
            .unwrap();
        let (s, v) = common::post_json(
            &format!("{hf}/v1/completions"),
            &json!({"prompt": p, "max_tokens": 24, "temperature": 0}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], want, "prompt {p:?}");
        assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    }
    let chat: Vec<u32> = chat_ids.iter().map(|&x| x as u32).collect();
    let want = gguf_tok()
        .decode(&greedy_reference(&chat, 32), false)
        .unwrap();
    let (s, v) = common::post_json(
        &format!("{hf}/v1/chat/completions"),
        &json!({"messages": messages, "max_tokens": 32, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], want);
    assert_eq!(v["usage"]["prompt_tokens"], chat.len());
}

/// Start a server on `model`; the error it fails to load with.
async fn load_error(model: &Path) -> String {
    let mut cfg = candela::Config::load(&Default::default()).unwrap();
    cfg.port = 0;
    cfg.models = vec![model.to_string_lossy().into_owned()];
    cfg.data_dir = common::data_dir();
    cfg.kv_disk_budget = 0;
    cfg.device = "cpu".into();
    let app = candela::App::build(cfg).await.unwrap();
    let e = app.wait_ready().await.expect_err("the model must not load");
    e.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_directories_fail_with_clear_errors() {
    let good = hf_dir();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("config.json")).unwrap()).unwrap();
    let root = tempfile::tempdir().unwrap();
    let case = |name: &str, files: &[(&str, String)]| {
        let d = root.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for (f, text) in files {
            std::fs::write(d.join(f), text).unwrap();
        }
        d
    };
    let with = |k: &str, v: Value| {
        let mut c = config.clone();
        c[k] = v;
        c.to_string()
    };
    let tokenizer = std::fs::read_to_string(good.join("tokenizer.json")).unwrap();
    let cases = [
        (
            case("empty", &[]),
            "neither a .gguf file nor a Hugging Face model",
        ),
        (
            case("malformed", &[("config.json", "{\"hidden_size\": ".into())]),
            "config.json is not valid JSON",
        ),
        (
            case(
                "gpt2",
                &[(
                    "config.json",
                    with("architectures", json!(["GPT2LMHeadModel"])),
                )],
            ),
            "unsupported architecture `GPT2LMHeadModel`",
        ),
        (
            case(
                "dynamic-rope",
                &[(
                    "config.json",
                    with(
                        "rope_scaling",
                        json!({"rope_type": "dynamic", "factor": 8.0}),
                    ),
                )],
            ),
            "rope_scaling of type `dynamic` is not supported",
        ),
        (
            case("no-tokenizer", &[("config.json", config.to_string())]),
            "no tokenizer.json",
        ),
        (
            case(
                "no-weights",
                &[
                    ("config.json", config.to_string()),
                    ("tokenizer.json", tokenizer.clone()),
                ],
            ),
            "no weights: neither model.safetensors nor model.safetensors.index.json",
        ),
        (
            case(
                "torn-weights",
                &[
                    ("config.json", config.to_string()),
                    ("tokenizer.json", tokenizer),
                    ("model.safetensors", "\u{8}\0\0\0\0\0\0\0{\"a\":1}".into()),
                ],
            ),
            "model.safetensors",
        ),
    ];
    for (dir, want) in cases {
        let e = load_error(&dir).await;
        eprintln!("{}: {e}", dir.display());
        assert!(e.contains(want), "{}: {e}", dir.display());
        assert!(
            e.contains(&*dir.to_string_lossy()),
            "names the directory: {e}"
        );
    }
}

fn candela(args: &[&str], data: &Path) -> (std::process::Output, Duration) {
    let t0 = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        // Port 1 on loopback refuses at once, whether or not the real hub answers here.
        .env("HF_ENDPOINT", "http://127.0.0.1:1")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("CANDELA_OFFLINE")
        .output()
        .unwrap();
    (out, t0.elapsed())
}

/// Without the hub, a repo fetched before comes from hf-hub's cache in the data dir.
#[test]
fn unreachable_hub_falls_back_to_the_cached_snapshot() {
    let data = tempfile::tempdir().unwrap();
    let repo = data.path().join("hf/models--someorg--cached-model");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for e in std::fs::read_dir(hf_dir()).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    let (out, _) = candela(&["fetch", "someorg/cached-model"], data.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("using the cached copy"), "{err}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.trim(), snap.to_string_lossy());
    // Not fetched before: the error stands.
    let (out, _) = candela(&["fetch", "someorg/other-model"], data.path());
    assert!(!out.status.success());
}

/// An unreachable hub fails fast, naming the repo and the network error: `candela fetch`
/// and `candela serve` both exit with it.
#[test]
fn unreachable_hub_fails_fast_naming_the_repo() {
    let data = tempfile::tempdir().unwrap();
    for cmd in [
        &["fetch", "someorg/some-model"][..],
        &["serve", "--port", "0", "--model", "someorg/some-model"],
    ] {
        let (out, took) = candela(cmd, data.path());
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{cmd:?} ({took:?}): {err}");
        assert!(!out.status.success(), "{cmd:?} must fail");
        assert!(took < Duration::from_secs(20), "{cmd:?} took {took:?}");
        assert!(err.contains("someorg/some-model"), "names the repo: {err}");
        assert!(
            err.contains("http://127.0.0.1:1"),
            "names the endpoint: {err}"
        );
        assert!(
            err.to_lowercase().contains("connection refused"),
            "names the error: {err}"
        );
    }
}

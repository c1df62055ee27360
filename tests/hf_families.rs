//! Hugging Face directories of every architecture beyond llama and qwen2 — qwen3,
//! qwen3moe, gemma3 (text-only and the multimodal wrapper), llama with llama3, linear
//! and YaRN `rope_scaling` — built from the synthetic GGUFs (`tests/common/synth.rs`):
//! every tensor dequantized to f32 under its Hugging Face name, what the converter did
//! undone (llama's Q/K permutation, Gemma's `1 + w` norms, stacked experts), a
//! `config.json` from the GGUF's hyper-parameters (`tests/common/hfdir.rs`). Each
//! directory must read to the GGUF's configuration and give the f32 GGUF's logits at
//! every position; one is served over HTTP and must complete as the GGUF does.
//! Directories we cannot run must fail at start-up with one line naming what is wrong.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use candela::engine::decode::sampling::argmax;
use candela::engine::model::{Model, SeqInput};
use candela::engine::Tok;
use candela::kv::{KvDtype, SeqCache};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::hfdir::{write_json, write_tokenizer, write_weights, Layout};
use serde_json::{json, Value};

const CTX: usize = 256;

const PROMPT: &str = "The old lighthouse keeper climbed the spiral stairs every evening, \
    counting each of the one hundred and twelve steps, to light the lamp that guided \
    fishing boats home through the fog. Nobody in the village remembered a night he missed.";

struct Case {
    /// The synthetic GGUF.
    gguf: &'static str,
    /// What this directory checks (its folder name).
    what: &'static str,
    layout: Layout,
    /// Keys set over the generated `config.json`.
    extra: Value,
    /// Wrap the config as `Gemma3ForConditionalGeneration` (text model in `text_config`).
    multimodal: bool,
}

fn cases() -> Vec<Case> {
    let plain = |gguf, what, extra| Case {
        gguf,
        what,
        layout: Layout::default(),
        extra,
        multimodal: false,
    };
    vec![
        plain("qwen3", "qwen3", json!({})),
        plain("qwen3moe", "qwen3moe", json!({})),
        // transformers 5: stacked experts, `rope_parameters` instead of `rope_theta`.
        Case {
            layout: Layout {
                stacked_experts: true,
                ..Layout::default()
            },
            ..plain(
                "qwen3moe",
                "qwen3moe-stacked",
                json!({"rope_theta": null,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}),
            )
        },
        plain("gemma3", "gemma3", json!({})),
        Case {
            layout: Layout {
                prefix: "language_model.model.",
                ..Layout::default()
            },
            multimodal: true,
            ..plain("gemma3", "gemma3-multimodal", json!({}))
        },
        plain(
            "llama-rope-llama3",
            "llama3",
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}}),
        ),
        // The older spelling of the type key.
        plain(
            "llama-rope-linear",
            "linear",
            json!({"rope_scaling": {"type": "linear", "factor": 4.0}}),
        ),
        plain("llama-rope-yarn", "yarn", json!({})),
    ]
}

fn open(name: &str) -> (gguf_file::Content, std::fs::File) {
    let mut f = std::fs::File::open(common::synth::path(name)).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    (ct, f)
}

/// Build the case's directory under `root`; returns it.
fn build(case: &Case, root: &Path) -> PathBuf {
    let dir = root.join(case.what);
    std::fs::create_dir(&dir).unwrap();
    let (ct, mut f) = open(case.gguf);
    write_weights(&ct, &mut f, &dir, case.layout, &case.extra);
    write_tokenizer(&ct, &dir);
    if case.multimodal {
        multimodal(&dir);
    }
    dir
}

/// Turn a Gemma3ForCausalLM directory (written with the `language_model.model.` prefix)
/// into a Gemma3ForConditionalGeneration one: the text config moved to `text_config`,
/// keys equal to Gemma 3's defaults left out as transformers leaves them out, and a
/// vision tower in a shard of its own, which must not be read.
fn multimodal(dir: &Path) {
    let mut text: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let o = text.as_object_mut().unwrap();
    o.remove("architectures");
    o.insert("model_type".into(), json!("gemma3_text"));
    assert_eq!(o.remove("rope_local_base_freq"), Some(json!(10_000.0)));
    assert_eq!(o.remove("tie_word_embeddings"), Some(json!(true)));
    write_json(
        dir,
        "config.json",
        &json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": text,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
            "mm_tokens_per_image": 4
        }),
    );
    let vision = "model-vision.safetensors";
    let mut t = std::collections::HashMap::new();
    t.insert(
        "vision_tower.vision_model.embeddings.patch_embedding.weight".to_string(),
        Tensor::ones((8, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join(vision)).unwrap();
    let mut index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    index["weight_map"]["vision_tower.vision_model.embeddings.patch_embedding.weight"] =
        json!(vision);
    write_json(dir, "model.safetensors.index.json", &index);
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

/// The largest |difference| over every position, the largest |logit| of `b`, and the
/// first position whose best token differs.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32, Option<usize>) {
    let mut worst = 0f32;
    let mut scale = 0f32;
    let mut moved = None;
    for (p, (x, y)) in a.iter().zip(b).enumerate() {
        for (u, v) in x.iter().zip(y) {
            worst = worst.max((u - v).abs());
            scale = scale.max(v.abs());
        }
        if moved.is_none() && argmax(x) != argmax(y) {
            moved = Some(p);
        }
    }
    (worst, scale, moved)
}

fn prompt_ids(tok: &Tok) -> Vec<u32> {
    let ids = tok.encode(PROMPT, true).unwrap();
    assert!(ids.len() >= 36, "{} tokens", ids.len());
    ids
}

/// Every case: the directory reads to the GGUF's configuration (but for the rotary
/// layout) and gives the f32 GGUF's logits at every position, in plain f32 (f32 cache,
/// the tensor path) and on the fused CPU path (f16 cache, as served).
#[test]
fn directories_match_their_gguf_in_f32() {
    let root = tempfile::tempdir().unwrap();
    for case in cases() {
        let dir = build(&case, root.path());
        let (ct, mut f) = open(case.gguf);
        let rf = Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, CTX).unwrap();
        let hf = Model::from_hf_dir(&dir, &Device::Cpu, CTX).unwrap();
        let what = case.what;
        assert!(hf.config.rope_neox, "{what}: HF checkpoints rotate halves");
        let mut want = rf.config.clone();
        want.rope_neox = true;
        assert_eq!(hf.config, want, "{what}: configuration");
        let ids = prompt_ids(&Tok::from_gguf(&ct, None).unwrap());
        // The same weights, but the directory's Q|K|V and gate|up run as one matmul where
        // the GGUF's differently quantized parts run apart (and llama's Q/K rows sit
        // elsewhere): sums in another order, last-bit differences. On the f16 cache, Q
        // and the attention weights are rounded to f16, where such a difference can move
        // a rounding step; so does Gemma's GELU, which rounds its input and output to
        // f16 as ggml's table does (with an exact GELU, gemma3 agrees as closely as the
        // others).
        let gemma = case.gguf == "gemma3";
        let tols = if gemma {
            [(KvDtype::F32, 5e-4), (KvDtype::F16, 5e-3)]
        } else {
            [(KvDtype::F32, 1e-4), (KvDtype::F16, 2e-3)]
        };
        for (dtype, tol) in tols {
            let want = logits(&rf, &ids, dtype);
            let got = logits(&hf, &ids, dtype);
            assert_eq!(got.len(), ids.len());
            let (worst, scale, moved) = compare(&got, &want);
            eprintln!(
                "{what} {dtype:?}: max |logit difference| {worst:e} (logits up to {scale:.1}) \
                 over {} positions",
                ids.len()
            );
            assert!(scale > 1.0, "{what}: degenerate logits");
            assert!(
                worst <= tol * scale,
                "{what} {dtype:?}: logits differ by {worst} (scale {scale})"
            );
            assert_eq!(moved, None, "{what} {dtype:?}: best token differs");
        }
    }
}

/// The comparison above is sharp enough to see a wrong rotary scaling or a Gemma norm
/// read without its `+ 1`: each breaks the agreement by whole logits.
#[test]
fn a_wrong_directory_is_caught() {
    let root = tempfile::tempdir().unwrap();
    let llama3 = cases().into_iter().find(|c| c.what == "llama3").unwrap();
    let dir = build(&llama3, root.path());
    let (ct, mut f) = open(llama3.gguf);
    let rf = Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, CTX).unwrap();
    let ids = prompt_ids(&Tok::from_gguf(&ct, None).unwrap());
    let want = logits(&rf, &ids, KvDtype::F32);
    // Without rope_scaling, the llama3 frequency factors are lost.
    let mut c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["rope_scaling"] = Value::Null;
    write_json(&dir, "config.json", &c);
    let hf = Model::from_hf_dir(&dir, &Device::Cpu, CTX).unwrap();
    let (worst, _, _) = compare(&logits(&hf, &ids, KvDtype::F32), &want);
    eprintln!("llama3 without rope_scaling: logits differ by {worst}");
    assert!(worst > 0.5, "{worst}");
    // A Gemma directory whose norms hold `1 + w` (as a GGUF does) is read as `2 + w`.
    let gemma = cases().into_iter().find(|c| c.what == "gemma3").unwrap();
    let dir = build(&gemma, root.path());
    let (ct, mut f) = open("gemma3");
    let rf = Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, CTX).unwrap();
    let want = logits(&rf, &ids, KvDtype::F32);
    let shard = dir.join("model-00001-of-00002.safetensors");
    let mut t = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    let name = "model.layers.0.input_layernorm.weight";
    let w = t[name].affine(1.0, 1.0).unwrap();
    t.insert(name.into(), w);
    candle_core::safetensors::save(&t, &shard).unwrap();
    let hf = Model::from_hf_dir(&dir, &Device::Cpu, CTX).unwrap();
    let (worst, _, _) = compare(&logits(&hf, &ids, KvDtype::F32), &want);
    eprintln!("gemma3 with one unshifted norm: logits differ by {worst}");
    assert!(worst > 0.5, "{worst}");
}

/// Greedy ids from the f32 GGUF as the server runs it (f16 cache), up to an
/// end-of-generation token or `n` tokens.
fn greedy(m: &Model, tok: &Tok, prompt: &[u32], n: usize) -> Vec<u32> {
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
        if tok.eog.contains(&t) {
            break;
        }
        out.push(t);
        feed = vec![t];
    }
    out
}

/// The multimodal Gemma 3 directory served over HTTP: greedy completions (past the
/// 32-token sliding window) equal the f32 GGUF's.
#[tokio::test(flavor = "multi_thread")]
async fn served_gemma3_directory_completes_as_its_gguf() {
    let root = tempfile::tempdir().unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.what == "gemma3-multimodal")
        .unwrap();
    let dir = build(&case, root.path());
    let (ct, mut f) = open("gemma3");
    let rf = Model::from_gguf_f32(&ct, &mut f, &Device::Cpu, CTX).unwrap();
    let tok = Tok::from_gguf(&ct, None).unwrap();
    let mut cfg = common::test_config(root.path().join("spill"));
    cfg.models = vec![dir.to_string_lossy().into_owned()];
    cfg.ctx_size = CTX;
    let server = common::Running::start(cfg).await;
    for p in ["Once upon a time", PROMPT] {
        let ids = tok.encode(p, true).unwrap();
        let want = tok.decode(&greedy(&rf, &tok, &ids, 24), false).unwrap();
        let (s, v) = common::post_json(
            &format!("{}/v1/completions", server.url),
            &json!({"prompt": p, "max_tokens": 24, "temperature": 0}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], ids.len());
        assert_eq!(v["choices"][0]["text"], want, "prompt {p:?}");
        assert!(!want.is_empty());
    }
    server.stop().await;
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

/// Directories we cannot run stop the start with one line naming what is wrong.
#[tokio::test(flavor = "multi_thread")]
async fn unsupported_directories_fail_with_one_clear_line() {
    let root = tempfile::tempdir().unwrap();
    let by_name = |what: &str| cases().into_iter().find(|c| c.what == what).unwrap();
    let qwen3 = build(&by_name("qwen3"), root.path());
    let moe = build(&by_name("qwen3moe"), root.path());
    let gemma = build(&by_name("gemma3"), root.path());
    let llama = build(&by_name("linear"), root.path());
    let config = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    // A copy of `from` whose config.json has `k` set to `v`.
    let variant = |from: &Path, name: &str, k: &str, v: Value| -> PathBuf {
        let d = root.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let mut c = config(from);
        c[k] = v;
        write_json(&d, "config.json", &c);
        d
    };
    // A qwen3 directory without one QK-norm.
    let torn = variant(&qwen3, "no-q-norm", "torch_dtype", json!("float32"));
    let shard = torn.join("model-00002-of-00002.safetensors");
    let mut t = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    let missing = "model.layers.3.self_attn.q_norm.weight";
    assert!(t.remove(missing).is_some());
    candle_core::safetensors::save(&t, &shard).unwrap();
    let cases = [
        (
            variant(&qwen3, "gpt2", "architectures", json!(["GPT2LMHeadModel"])),
            vec![
                "unsupported architecture `GPT2LMHeadModel`",
                "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, \
                 Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma3ForCausalLM, \
                 Gemma3ForConditionalGeneration",
            ],
        ),
        (
            torn,
            vec!["missing tensor `model.layers.3.self_attn.q_norm.weight`", "qwen3"],
        ),
        (
            variant(
                &llama,
                "dynamic-rope",
                "rope_scaling",
                json!({"rope_type": "dynamic", "factor": 2.0}),
            ),
            vec!["rope_scaling of type `dynamic` is not supported (supported: default, linear, llama3, yarn)"],
        ),
        (
            variant(&moe, "dense-layers", "mlp_only_layers", json!([1])),
            vec!["mlp_only_layers [1] is not supported"],
        ),
        (
            variant(&moe, "sparse-step", "decoder_sparse_step", json!(2)),
            vec!["decoder_sparse_step 2 is not supported"],
        ),
        (
            variant(&gemma, "attn-softcap", "attn_logit_softcapping", json!(50.0)),
            vec!["attn_logit_softcapping 50 is not supported"],
        ),
        (
            variant(&gemma, "gelu-exact", "hidden_activation", json!("gelu")),
            vec!["hidden_activation `gelu` is not supported"],
        ),
    ];
    for (dir, wants) in cases {
        let e = load_error(&dir).await;
        // (With RUST_BACKTRACE set, candle appends a backtrace on further lines.)
        let line = e.lines().next().unwrap();
        eprintln!("{line}");
        for want in wants {
            assert!(line.contains(want), "{}: {e}", dir.display());
        }
        assert!(
            line.contains(&*dir.to_string_lossy()),
            "names the directory: {e}"
        );
    }
}

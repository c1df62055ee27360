use super::*;
use serde_json::json;

fn cfg(extra: Value) -> Value {
    let mut c = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 96, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "intermediate_size": 128, "tie_word_embeddings": true
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn config_fields_are_read() {
    let c = ModelConfig::from_hf_json(&cfg(json!({})), Path::new("d")).unwrap();
    assert_eq!(c.arch, "qwen2");
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (4, 2, 16));
    assert_eq!((c.rope_base, c.train_ctx, c.vocab), (1e6, 512, 96));
    assert!(c.rope_neox, "HF checkpoints rotate halves");
    let c = ModelConfig::from_hf_json(&cfg(json!({"head_dim": 32})), Path::new("d")).unwrap();
    assert_eq!(c.head_dim, 32);
    let c = ModelConfig::from_hf_json(
        &cfg(json!({"architectures": ["MistralForCausalLM"], "rope_scaling": {"rope_type": "default"}})),
        Path::new("d"),
    )
    .unwrap();
    assert_eq!(c.arch, "mistral");
}

#[test]
fn unsupported_configs_are_named() {
    let e = |extra| {
        ModelConfig::from_hf_json(&cfg(extra), Path::new("/m"))
            .unwrap_err()
            .to_string()
    };
    let m = e(json!({"architectures": ["GPT2LMHeadModel"]}));
    assert!(
        m.contains("unsupported architecture `GPT2LMHeadModel`"),
        "{m}"
    );
    let m = e(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}));
    assert!(m.contains("rope_scaling of type `llama3`"), "{m}");
    let m = e(json!({"hidden_act": "gelu"}));
    assert!(m.contains("hidden_act `gelu`"), "{m}");
    let m = e(json!({"hidden_size": "big"}));
    assert!(m.contains("`hidden_size` missing or not a number"), "{m}");
    assert!(m.starts_with("/m: "), "{m}");
}

/// A tiny random qwen2-style model (QKV biases, tied embeddings) saved in f32, f16
/// and bf16 with values every dtype holds exactly: all three load to the same
/// weights, so their logits agree; a sharded copy too.
#[test]
fn dtypes_and_shards_load_alike() {
    use crate::kv::{KvDtype, SeqCache};
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let c = cfg(json!({}));
    let (h, ffn, v, nq, nkv) = (64, 128, 96, 64, 32);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for i in 0..2 {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![nq, h]),
            ("self_attn.q_proj.bias", vec![nq]),
            ("self_attn.k_proj.weight", vec![nkv, h]),
            ("self_attn.k_proj.bias", vec![nkv]),
            ("self_attn.v_proj.weight", vec![nkv, h]),
            ("self_attn.v_proj.bias", vec![nkv]),
            ("self_attn.o_proj.weight", vec![h, nq]),
            ("mlp.gate_proj.weight", vec![ffn, h]),
            ("mlp.up_proj.weight", vec![ffn, h]),
            ("mlp.down_proj.weight", vec![h, ffn]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(n, s)| {
            let t = Tensor::randn(0f32, 0.2, s, &dev).unwrap();
            // Round through bf16: then f16 and f32 hold the values exactly too.
            let t = t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (n, t)
        })
        .collect();
    let run = |dir: &Path| -> Vec<f32> {
        let m = Model::from_hf_dir(dir, &dev, 64).unwrap();
        assert_eq!(m.config.arch, "qwen2");
        let mut cache = SeqCache::new(m.cache_layout(KvDtype::F32), &dev);
        let out = m
            .forward(&mut [super::super::SeqInput {
                tokens: &[1, 5, 9, 33, 2, 70],
                cache: &mut cache,
                all_logits: true,
            }])
            .unwrap();
        out[0].flatten_all().unwrap().to_vec1().unwrap()
    };
    let root = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let d = root.path().join(format!("{dtype:?}"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        let conv: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&conv, d.join("model.safetensors")).unwrap();
        results.push(run(&d));
    }
    // Sharded: layer 1 in a second file, listed by an index.
    let d = root.path().join("sharded");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    let (a, b): (HashMap<_, _>, HashMap<_, _>) = tensors
        .clone()
        .into_iter()
        .partition(|(k, _)| !k.starts_with("model.layers.1."));
    candle_core::safetensors::save(&a, d.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, d.join("model-00002-of-00002.safetensors")).unwrap();
    let map: serde_json::Map<String, Value> = a
        .keys()
        .map(|k| (k.clone(), json!("model-00001-of-00002.safetensors")))
        .chain(
            b.keys()
                .map(|k| (k.clone(), json!("model-00002-of-00002.safetensors"))),
        )
        .collect();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    results.push(run(&d));
    assert!(results[0].iter().any(|x| x.abs() > 1e-3));
    // The same f32 weights; only gemm's blocking may sum in another order.
    for r in &results[1..] {
        let diff = r
            .iter()
            .zip(&results[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "logits differ by {diff}");
    }
    // A shard the index names but the directory lacks is a clear error.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = Model::from_hf_dir(&d, &dev, 64).unwrap_err().to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors named by the index is missing"),
        "{e}"
    );
}

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
    let m = e(json!({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}));
    assert!(
        m.contains("rope_scaling of type `longrope` is not supported (supported: default, linear, llama3, yarn)"),
        "{m}"
    );
    let m = e(json!({"rope_scaling": {"rope_type": "linear"}}));
    assert!(
        m.contains("rope_scaling `linear` needs a positive `factor`"),
        "{m}"
    );
    let m = e(
        json!({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
                     "num_experts_per_tok": 9, "moe_intermediate_size": 32}),
    );
    assert!(m.contains("num_experts_per_tok 9 of 8 experts"), "{m}");
    let m = e(
        json!({"architectures": ["Qwen3MoeForCausalLM"], "num_experts_per_tok": 2,
                     "moe_intermediate_size": 32}),
    );
    assert!(m.contains("`num_experts` missing"), "{m}");
    let m = e(json!({"architectures": ["Gemma3ForConditionalGeneration"]}));
    assert!(m.contains("`text_config` missing"), "{m}");
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

/// A multimodal Gemma 3 config lists only what differs from Gemma 3's defaults in its
/// `text_config` (as transformers writes it): the rest comes from the defaults.
#[test]
fn gemma3_text_config_takes_the_defaults() {
    let c = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152}
    });
    let c = ModelConfig::from_hf_json(&c, Path::new("d")).unwrap();
    assert_eq!((c.arch.as_str(), c.family), ("gemma3", Family::Gemma3));
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (8, 4, 256));
    assert_eq!((c.vocab, c.train_ctx, c.rope_base), (262_208, 131_072, 1e6));
    assert_eq!(c.act, Act::GeluTanh);
    assert!(c.q_prescale);
    assert_eq!(c.attn_scale, 1.0 / 16.0);
    assert_eq!(c.embed_scale, Some(2560f32.sqrt()));
    assert_eq!(c.final_softcap, None);
    assert_eq!(c.rope_scaling.freq_scale, 0.125);
    let sw = c.sliding.unwrap();
    assert_eq!((sw.window, sw.rope_base), (1024, 10_000.0));
    // Every sixth layer is global.
    let globals: Vec<usize> = (0..34).filter(|&l| !sw.local[l]).collect();
    assert_eq!(globals, vec![5, 11, 17, 23, 29]);
}

/// Gemma 3 in transformers 5's form: `layer_types` and `rope_parameters` per layer kind.
#[test]
fn gemma3_layer_types_and_rope_parameters() {
    let c = json!({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "vocab_size": 96, "query_pre_attn_scalar": 64,
        "final_logit_softcapping": 30.0, "sliding_window": 16,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 50000.0,
                               "original_max_position_embeddings": 128},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}
        }
    });
    let c = ModelConfig::from_hf_json(&c, Path::new("d")).unwrap();
    assert_eq!(c.rope_base, 50_000.0);
    assert_eq!(c.attn_scale, 0.125);
    assert_eq!(c.final_softcap, Some(30.0));
    assert_eq!(
        (c.rope_scaling.freq_scale, c.rope_scaling.n_ctx_orig),
        (0.5, 128)
    );
    let sw = c.sliding.unwrap();
    assert_eq!((sw.window, sw.rope_base), (16, 500.0));
    assert_eq!(sw.local, vec![false, true, false]);
}

/// llama3's frequency divisors: 1 for the fastest pairs, `factor` for the slowest, a
/// blend between; YaRN's attention factor is the total magnitude of cos/sin.
#[test]
fn llama3_factors_and_yarn_magnitude() {
    let c = cfg(
        json!({"architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    );
    let (s, f) = rope_scaling(&c, Path::new("d"), 128, 500_000.0, 512).unwrap();
    assert_eq!(
        s,
        RopeScaling {
            n_ctx_orig: 512,
            ..RopeScaling::default()
        }
    );
    let f = f.unwrap();
    assert_eq!(f.len(), 64);
    assert_eq!((f[0], f[63]), (1.0, 8.0));
    assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
    assert!(
        f.iter().any(|&x| x > 1.0 && x < 8.0),
        "a blended band: {f:?}"
    );
    for (attention_factor, want) in [(None, 1.0 + 0.1 * 4f32.ln()), (Some(1.5f32), 1.5)] {
        let mut r = json!({"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 64});
        if let Some(a) = attention_factor {
            r["attention_factor"] = json!(a);
        }
        let c = cfg(json!({"rope_scaling": r}));
        let (s, f) = rope_scaling(&c, Path::new("d"), 32, 10_000.0, 256).unwrap();
        assert!(f.is_none());
        let (cos, sin) = super::super::rope::tables(32, 10_000.0, 4, &s, None);
        // Position 0: cos = magnitude, sin = 0.
        assert!(
            (cos[0] - want).abs() < 1e-6 && sin[0] == 0.0,
            "{} {want}",
            cos[0]
        );
    }
}

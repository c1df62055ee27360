//! Hugging Face model directories built from a GGUF, for checks that a directory loads
//! to the same model: every tensor dequantized to f32 under its Hugging Face name, in
//! two shards with an index, and a `config.json` from the GGUF's hyper-parameters.
//!
//! What the GGUF converter changed is undone: llama's Q/K rows are un-permuted (qwen2,
//! qwen3 and gemma3 are not permuted by the converter), Gemma's `1 + w` norms go back to
//! `w`, stacked expert tensors are split per expert (or kept stacked, as transformers 5
//! stores them), and llama3's `rope_freqs` is dropped (Hugging Face computes the factors
//! from `rope_scaling`, which the caller passes in `extra`).

use std::collections::HashMap;
use std::path::Path;

use candela::engine::model::{Family, ModelConfig};
use candela::engine::Tok;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

/// How the directory lays its tensors out.
#[derive(Clone, Copy)]
pub struct Layout {
    /// Prefix of the text model's tensors: `model.`, or `language_model.model.` for a
    /// multimodal Gemma 3 (whose output is then `language_model.lm_head`).
    pub prefix: &'static str,
    /// Experts stacked as `mlp.experts.gate_up_proj` / `down_proj` (transformers 5)
    /// instead of one set of matrices per expert.
    pub stacked_experts: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            prefix: "model.",
            stacked_experts: false,
        }
    }
}

/// GGUF's converter permutes the rows of Q and K per head, `(2, d/2)` to `(d/2, 2)`, so
/// interleaved rotary pairs act like Hugging Face's rotate-half; undo it.
pub fn unpermute(t: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = t.dims2().unwrap();
    t.reshape((heads, out / heads / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// The Hugging Face name of a GGUF tensor (without the model prefix for layer and
/// top-level tensors; `lm_head.weight` for the output). None for tensors Hugging Face
/// does not store (`rope_freqs`) or that are split elsewhere (stacked experts).
fn hf_name(gguf: &str, family: Family) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("embed_tokens.weight".into()),
        "output_norm.weight" => return Some("norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        "rope_freqs.weight" => return None,
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").expect("a layer tensor");
    let (layer, part) = rest.split_once('.').unwrap();
    let gemma = family == Family::Gemma3;
    let part = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "ffn_gate_inp.weight" => "mlp.gate.weight",
        "ffn_gate_exps.weight" | "ffn_up_exps.weight" | "ffn_down_exps.weight" => return None,
        other => panic!("unexpected tensor {other}"),
    };
    Some(format!("layers.{layer}.{part}"))
}

/// Every tensor of the GGUF `ct`, dequantized to f32 under its Hugging Face name, in two
/// shards with an index, and `config.json` (the GGUF's hyper-parameters, then `extra`'s
/// keys over them). Returns the GGUF's hyper-parameters.
pub fn write_weights(
    ct: &gguf_file::Content,
    f: &mut std::fs::File,
    dir: &Path,
    layout: Layout,
    extra: &Value,
) -> ModelConfig {
    let cfg = ModelConfig::from_gguf(ct).unwrap();
    let permuted = !cfg.rope_neox;
    let gemma = cfg.family == Family::Gemma3;
    let p = layout.prefix;
    let head = if p == "language_model.model." {
        "language_model.lm_head.weight"
    } else {
        "lm_head.weight"
    };
    let full = |n: String| {
        if n == "lm_head.weight" {
            head.to_string()
        } else {
            format!("{p}{n}")
        }
    };
    let mut weight_map = serde_json::Map::new();
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    // Layers from the middle on go to the second shard; one shard in memory at a time.
    let shard_of = |name: &str| {
        name.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .is_some_and(|l| l.parse::<usize>().unwrap() >= cfg.n_layers / 2) as usize
    };
    for (i, file) in files.iter().enumerate() {
        let mut shard = HashMap::new();
        for name in ct.tensor_infos.keys().filter(|n| shard_of(n) == i) {
            let t = ct
                .tensor(f, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            if let Some(kind) = ["gate", "up", "down"]
                .into_iter()
                .find(|k| name.ends_with(&format!("ffn_{k}_exps.weight")))
            {
                let layer = name.split('.').nth(1).unwrap();
                let base = format!("layers.{layer}.mlp.experts");
                if layout.stacked_experts {
                    // gate and up are joined below, once both are read.
                    shard.insert(full(format!("{base}.{kind}_proj")), t);
                } else {
                    for e in 0..t.dim(0).unwrap() {
                        let n = full(format!("{base}.{e}.{kind}_proj.weight"));
                        shard.insert(n, t.get(e).unwrap().contiguous().unwrap());
                    }
                }
                continue;
            }
            let Some(hf) = hf_name(name, cfg.family) else {
                continue;
            };
            let t = if permuted && name.ends_with("attn_q.weight") {
                unpermute(&t, cfg.n_heads)
            } else if permuted && name.ends_with("attn_k.weight") {
                unpermute(&t, cfg.n_kv_heads)
            } else if gemma && name.ends_with("norm.weight") {
                // The converter stored `1 + w`.
                t.affine(1.0, -1.0).unwrap()
            } else {
                t
            };
            shard.insert(full(hf), t);
        }
        let gates: Vec<String> = shard
            .keys()
            .filter(|k| k.ends_with("mlp.experts.gate_proj"))
            .cloned()
            .collect();
        for g in gates {
            let base = g.trim_end_matches("gate_proj");
            let gate = shard.remove(&g).unwrap();
            let up = shard.remove(&format!("{base}up_proj")).unwrap();
            let gu = Tensor::cat(&[gate, up], 1).unwrap();
            shard.insert(format!("{base}gate_up_proj"), gu);
        }
        for k in shard.keys() {
            weight_map.insert(k.clone(), json!(file));
        }
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
    }
    write_json(
        dir,
        "model.safetensors.index.json",
        &json!({"metadata": {}, "weight_map": weight_map}),
    );
    let mut config = config_json(ct, &cfg);
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    write_json(dir, "config.json", &config);
    cfg
}

pub fn write_json(dir: &Path, name: &str, v: &Value) {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(v).unwrap()).unwrap()
}

/// `config.json` as transformers writes it for the GGUF's model.
fn config_json(ct: &gguf_file::Content, cfg: &ModelConfig) -> Value {
    let arch = cfg.arch.as_str();
    let meta_u32 = |k: &str| {
        ct.metadata
            .get(&format!("{arch}.{k}"))
            .map(|v| v.to_u32().unwrap())
    };
    let (hf_arch, model_type) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
        "qwen3moe" => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        "gemma3" => ("Gemma3ForCausalLM", "gemma3_text"),
        other => panic!("no HF name for {other}"),
    };
    let s = &cfg.rope_scaling;
    let rope_scaling = if s.ext_factor != 0.0 {
        json!({"rope_type": "yarn", "factor": 1.0 / s.freq_scale,
               "original_max_position_embeddings": s.n_ctx_orig})
    } else if s.freq_scale != 1.0 {
        json!({"rope_type": "linear", "factor": 1.0 / s.freq_scale})
    } else {
        Value::Null
    };
    let mut c = json!({
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": cfg.hidden,
        "intermediate_size": meta_u32("feed_forward_length").unwrap(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.train_ctx,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_base,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": !ct.tensor_infos.contains_key("output.weight"),
        "torch_dtype": "float32"
    });
    if let Some(m) = &cfg.moe {
        c["num_experts"] = json!(m.experts);
        c["num_experts_per_tok"] = json!(m.used);
        c["moe_intermediate_size"] = json!(m.ffn);
        c["norm_topk_prob"] = json!(m.norm_topk);
        c["decoder_sparse_step"] = json!(1);
        c["mlp_only_layers"] = json!([]);
    }
    if cfg.family == Family::Gemma3 {
        let o = c.as_object_mut().unwrap();
        o.remove("hidden_act");
        o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        // The GGUF scales Q by 1/sqrt(head_dim).
        o.insert("query_pre_attn_scalar".into(), json!(cfg.head_dim));
        o.insert("final_logit_softcapping".into(), json!(cfg.final_softcap));
        o.insert("attn_logit_softcapping".into(), Value::Null);
        if let Some(sw) = &cfg.sliding {
            o.insert("sliding_window".into(), json!(sw.window));
            o.insert("rope_local_base_freq".into(), json!(sw.rope_base));
            let types: Vec<&str> = sw
                .local
                .iter()
                .map(|&l| {
                    if l {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            o.insert("layer_types".into(), json!(types));
        }
    }
    c
}

/// The GGUF's tokenizer as `tokenizer.json`, its chat template and BOS/EOS in
/// `tokenizer_config.json`.
pub fn write_tokenizer(ct: &gguf_file::Content, dir: &Path) -> Tok {
    let tok = Tok::from_gguf(ct, None).unwrap();
    tok.save_json(&dir.join("tokenizer.json")).unwrap();
    let template = ct.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    write_json(
        dir,
        "tokenizer_config.json",
        &json!({
            "add_bos_token": false,
            "bos_token": tok.id_to_token(tok.bos_id.unwrap()).unwrap(),
            "eos_token": {"content": tok.id_to_token(tok.eos_id.unwrap()).unwrap(), "special": true},
            "chat_template": template
        }),
    );
    tok
}

//! Session KV tiers against the real model and server. On the CPU (the default) the
//! server has two tiers, `memory` and `disk`, named as they always were; with
//! `CANDELA_TEST_DEVICE=cuda` (a `cuda` build on a GPU) it has three, and sessions
//! really move between GPU memory and host RAM. Either way a session that moved down
//! and back up must decode exactly what it would have without moving.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candela::engine::model::{Model, SeqInput};
use candela::kv::store::{SessionStore, SpillConfig};
use candela::kv::KvDtype;
use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde_json::{json, Value};

fn test_device() -> String {
    std::env::var("CANDELA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn on_gpu() -> bool {
    test_device().starts_with("cuda")
}

fn load(device: &Device) -> Model {
    let path = common::model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    Model::from_gguf(&ct, &mut f, device, 2048).unwrap()
}

/// One turn of session `key`: check its cache out, run the prompt's new tokens, decode
/// `n` greedy tokens, check it back in. Returns the tokens and how many were reused.
fn turn(
    model: &Model,
    store: &mut SessionStore,
    key: &str,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, usize) {
    let layout = model.cache_layout(KvDtype::F16);
    let (co, _) = store
        .checkout(Some(key), prompt, layout, model.device())
        .unwrap();
    let (mut cache, reused) = (co.cache, co.reused);
    let mut feed = prompt[reused..].to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = model
            .forward(&mut [SeqInput {
                tokens: &feed,
                cache: &mut cache,
                all_logits: false,
            }])
            .unwrap();
        let t = candela::engine::decode::sampling::argmax(&common::rows(&logits[0])[0]) as u32;
        out.push(t);
        feed = vec![t];
    }
    // The last sampled token is the answer's, not yet in the cache (as in the server).
    store.checkin(Some(key), cache);
    (out, reused)
}

/// Three turns of two interleaved sessions; returns every turn's tokens and reuse.
fn conversation(
    model: &Model,
    store: &mut SessionStore,
    tiers: &mut Vec<String>,
) -> Vec<(Vec<u32>, usize)> {
    let mut hist: [Vec<u32>; 2] = [
        vec![1, 504, 3458, 282, 253, 1345, 28, 2193, 30, 216],
        vec![1, 3210, 314, 2023, 1345, 11, 284, 2506, 30, 216, 9, 17],
    ];
    let mut all = Vec::new();
    for round in 0..3u32 {
        for (i, key) in ["a", "b"].into_iter().enumerate() {
            let (out, reused) = turn(model, store, key, &hist[i], 12);
            hist[i].extend(&out);
            hist[i].extend([30 + round, 216]);
            all.push((out, reused));
            tiers.extend(
                store
                    .list()
                    .into_iter()
                    .map(|s| format!("{}:{}", s.id, s.tier)),
            );
        }
    }
    all
}

#[test]
fn a_session_moved_down_and_back_up_decodes_as_if_it_never_moved() {
    let device = candela::engine::pick_device(&test_device()).unwrap();
    let model = load(&device);
    let layout = model.cache_layout(KvDtype::F16);
    // Reference: one tier that holds everything, nothing ever moves.
    let mut plain = SessionStore::new(usize::MAX);
    let want = conversation(&model, &mut plain, &mut Vec::new());
    assert!(
        want.iter().skip(2).all(|(_, r)| *r > 0),
        "later turns reuse"
    );
    // No room on the device: every idle cache goes to host RAM, and comes back up for
    // its next turn.
    let mut to_host = SessionStore::new(usize::MAX);
    to_host.enable_device_tier(device.clone(), 0);
    let mut seen = Vec::new();
    assert_eq!(conversation(&model, &mut to_host, &mut seen), want);
    assert!(seen.contains(&"a:host".to_string()), "{seen:?}");
    // No room on the device nor in host RAM: every idle cache goes to disk and is read
    // back to the device.
    let dir = tempfile::tempdir().unwrap();
    let mut to_disk = SessionStore::new(0);
    to_disk.enable_device_tier(device.clone(), 0);
    to_disk.enable_spill(SpillConfig {
        dir: dir.path().to_path_buf(),
        disk_budget: u64::MAX,
        fingerprint: "tiers-test".into(),
        layout,
        device: device.clone(),
        shared: false,
    });
    let mut seen = Vec::new();
    assert_eq!(conversation(&model, &mut to_disk, &mut seen), want);
    assert!(seen.contains(&"a:disk".to_string()), "{seen:?}");
    // One session's room on the device: the two take turns there.
    let one = layout.bytes_for(256);
    let mut mixed = SessionStore::new(usize::MAX);
    mixed.enable_device_tier(device, one);
    let mut seen = Vec::new();
    assert_eq!(conversation(&model, &mut mixed, &mut seen), want);
    assert!(
        seen.contains(&"b:device".to_string()) && seen.contains(&"a:host".to_string()),
        "{seen:?}"
    );
    let st = mixed.stats();
    assert_eq!((st.device_bytes, st.sessions_host), (one, 1), "{st:?}");
}

async fn chat(url: &str, key: &str, content: &str) -> Value {
    let (st, r) = common::post_json(
        &format!("{url}/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": content}], "max_tokens": 12,
                "temperature": 0, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    r
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn text(r: &Value) -> String {
    r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Bytes of one short session of the default model (one 256-token step of f16).
const ONE: usize = 256 * 23_040;

#[tokio::test]
async fn tiers_show_in_the_sessions_api_and_metrics_and_moves_change_no_answer() {
    let tiered = common::server_with("tiered", |c| {
        c.kv_budget = ONE;
        c.kv_device_budget = candela::kv::store::tiers::DeviceBudget::Bytes(ONE);
    });
    let roomy = common::server_with("roomy", |_| {});
    let prompts = ["Name a colour.", "Name a fruit.", "Name a city."];
    for (i, p) in prompts.iter().enumerate() {
        chat(&tiered, &format!("s{i}"), p).await;
        chat(&roomy, &format!("s{i}"), p).await;
    }
    let list = get_json(&format!("{tiered}/v1/sessions")).await;
    let tier = |id: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["tier"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let metrics = reqwest::get(format!("{tiered}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |l: &str| metrics.lines().any(|m| m.starts_with(l));
    if on_gpu() {
        // Oldest on disk, the next in host RAM, the newest on the device.
        assert_eq!(
            [tier("s0"), tier("s1"), tier("s2")],
            ["disk", "host", "device"],
            "{list}"
        );
        assert_eq!(list["device_bytes"], ONE, "{list}");
        assert_eq!(list["device_budget_bytes"], ONE, "{list}");
        assert_eq!(list["resident_bytes"], ONE, "{list}");
        for l in [
            "candela_kv_cache_bytes{tier=\"device\"}",
            "candela_kv_cache_bytes{tier=\"host\"}",
            "candela_kv_tier_moves_total{from=\"device\",to=\"host\"}",
            "candela_kv_tier_moves_total{from=\"host\",to=\"device\"}",
            "candela_kv_sessions{state=\"host\"}",
        ] {
            assert!(has(l), "no {l} in\n{metrics}");
        }
    } else {
        // A CPU server: the memory tier and disk, named as they always were.
        assert_eq!(
            [tier("s0"), tier("s1"), tier("s2")],
            ["disk", "disk", "memory"],
            "{list}"
        );
        assert!(list.get("device_bytes").is_none(), "{list}");
        assert_eq!(list["resident_bytes"], ONE, "{list}");
        assert!(!has("candela_kv_cache_bytes{tier=\"device\"}"), "{metrics}");
        assert!(!has("candela_kv_cache_bytes{tier=\"host\"}"), "{metrics}");
        for l in [
            "candela_kv_cache_bytes{tier=\"memory\"}",
            "candela_kv_tier_moves_total{from=\"memory\",to=\"disk\"}",
            "candela_kv_tier_moves_total{from=\"disk\",to=\"memory\"}",
        ] {
            assert!(has(l), "no {l} in\n{metrics}");
        }
    }
    assert!(list["disk_bytes"].as_u64().unwrap() > 0, "{list}");
    assert!(has("candela_kv_cache_bytes{tier=\"disk\"}"), "{metrics}");
    assert!(has("candela_kv_cache_device_budget_bytes"), "{metrics}");
    // Second turns: the sessions come back from wherever they went and answer exactly
    // as the server whose sessions never moved.
    for (i, p) in prompts.iter().enumerate() {
        let follow = format!("{p} And another one.");
        let (a, b) = (
            chat(&tiered, &format!("s{i}"), &follow).await,
            chat(&roomy, &format!("s{i}"), &follow).await,
        );
        assert_eq!(text(&a), text(&b), "s{i}");
        assert_eq!(
            a["usage"]["prompt_tokens_details"]["cached_tokens"],
            b["usage"]["prompt_tokens_details"]["cached_tokens"],
            "s{i}"
        );
    }
}

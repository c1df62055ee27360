//! Sessions survive a graceful restart: spilled on stop, indexed on start, restored on
//! use with identical continuations. Foreign and torn files in the spill dir are skipped.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{json, Value};

use common::Running;

async fn start(spill: &std::path::Path, budget: usize) -> Running {
    start_with(spill, budget, 0).await
}

async fn start_with(spill: &std::path::Path, budget: usize, min_free: usize) -> Running {
    let mut cfg = common::test_config(spill.to_path_buf());
    cfg.queue_size = 16;
    cfg.max_batch = 4;
    cfg.kv_budget = budget;
    cfg.kv_min_free = min_free;
    Running::start(cfg).await
}

async fn chat(url: &str, key: &str, messages: &Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": messages, "max_tokens": 12, "temperature": 0, "prompt_cache_key": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_restart_with_identical_continuations() {
    let dir = tempfile::tempdir().unwrap();
    let turn1 = json!([{"role": "user", "content": "Give me a word that rhymes with cat."}]);
    let a = start(dir.path(), 256 << 20).await;
    let r1 = chat(&a.url, "agent-r", &turn1).await;
    let r1b = chat(&a.url, "agent-control", &turn1).await;
    assert_eq!(r1["choices"], r1b["choices"]);
    let reply = r1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let turn2 = json!([
        {"role": "user", "content": "Give me a word that rhymes with cat."},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Another one?"}
    ]);
    // The control session continues in memory on the first server.
    let control = chat(&a.url, "agent-control", &turn2).await;
    std::fs::write(dir.path().join("foreign.kv.safetensors"), b"garbage").unwrap();
    a.stop().await;
    assert!(dir.path().join("agent-r.kv.safetensors").exists());

    let b = start(dir.path(), 256 << 20).await;
    let s: Value = reqwest::get(format!("{}/v1/sessions/agent-r", b.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["tier"], "disk", "{s}");
    let restored = chat(&b.url, "agent-r", &turn2).await;
    assert_eq!(
        restored["usage"]["prompt_tokens_details"]["cached_tokens"],
        control["usage"]["prompt_tokens_details"]["cached_tokens"]
    );
    assert!(
        restored["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 20
    );
    assert_eq!(
        restored["choices"][0]["message"],
        control["choices"][0]["message"]
    );
    let s: Value = reqwest::get(format!("{}/v1/sessions/agent-r", b.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["tier"], "memory");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_sessions_spill_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    // Room for one session's cache (256 tokens x 23 KB) in memory: the rest go to disk.
    let s = start(dir.path(), 6 << 20).await;
    let msgs = |i: usize| json!([{"role": "user", "content": format!("Session {i}: say something short.")}]);
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(chat(&s.url, &format!("spill-{i}"), &msgs(i)).await);
    }
    let list: Value = reqwest::get(format!("{}/v1/sessions", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        list["resident_bytes"].as_u64().unwrap() <= list["budget_bytes"].as_u64().unwrap(),
        "{list}"
    );
    let tiers: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["tier"].as_str().unwrap())
        .collect();
    assert!(tiers.contains(&"disk"), "{list}");
    // The oldest, spilled session serves its next turn from disk.
    let again = chat(&s.url, "spill-0", &msgs(0)).await;
    let p = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        p - 1
    );
    assert_eq!(again["choices"], first[0]["choices"]);
    // The metrics saw the evictions, the spill and the restore (the engine reports its
    // store before it sends a request's last event).
    let m = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let val = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert!(val("candela_kv_evictions_total{reason=\"lru\"}") >= 1.0);
    assert!(val("candela_kv_spill_bytes_total") > 0.0);
    assert!(val("candela_kv_restore_bytes_total") > 0.0, "{m}");
    assert!(val("candela_kv_session_tokens_count") >= 4.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_host_memory_moves_idle_sessions_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    // Ask for more free memory than the machine has: every idle cache must yield.
    let s = start_with(dir.path(), 256 << 20, usize::MAX / 4).await;
    let m = json!([{"role": "user", "content": "Tell me about rivers."}]);
    chat(&s.url, "pressure-0", &m).await;
    let mut tier = String::new();
    for i in 0..40 {
        // The worker looks at host memory about once a second while it works.
        chat(&s.url, &format!("pressure-other-{i}"), &m).await;
        let v: Value = reqwest::get(format!("{}/v1/sessions/pressure-0", s.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tier = v["tier"].as_str().unwrap_or_default().to_string();
        if tier == "disk" {
            break;
        }
    }
    assert_eq!(tier, "disk");
    let back = chat(&s.url, "pressure-0", &m).await;
    assert!(
        back["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    s.stop().await;
}

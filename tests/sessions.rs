//! Per-session KV caches against the real server: reuse, exact accounting, the sessions
//! API, busy sessions.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{json, Value};

fn base() -> String {
    common::server()
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    common::post_json(&format!("{}{path}", base()), &body).await
}

async fn tokens(messages: &Value) -> usize {
    let (_, t) = post("/tokenize", json!({"messages": messages})).await;
    t["count"].as_u64().unwrap() as usize
}

#[tokio::test]
async fn second_turn_reuses_the_first_and_reports_it() {
    let key = "agent-reuse";
    let m1 = json!([{"role": "user", "content": "Name a fruit."}]);
    let (st, r1) = post(
        "/v1/chat/completions",
        json!({"messages": m1, "max_tokens": 8, "temperature": 0, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(st, 200, "{r1}");
    assert_eq!(r1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let reply = r1["choices"][0]["message"]["content"].as_str().unwrap();
    let m2 = json!([
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And a vegetable?"}
    ]);
    let (st, r2) = post(
        "/v1/chat/completions",
        json!({"messages": m2, "max_tokens": 8, "temperature": 0, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(st, 200, "{r2}");
    let cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as usize;
    let p1 = tokens(&m1).await;
    let p2 = tokens(&m2).await;
    assert_eq!(r2["usage"]["prompt_tokens"].as_u64().unwrap() as usize, p2);
    assert!(
        cached >= p1 && cached < p2,
        "cached {cached}, first prompt {p1}, second {p2}"
    );
    // The session now holds the second prompt and its reply (minus the last token).
    let s: Value = reqwest::get(format!("{}/v1/sessions/{key}", base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let completion = r2["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(
        s["tokens"].as_u64().unwrap() as usize,
        p2 + completion - 1,
        "{s}"
    );
    assert!(s["bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["hits"], 1);
    // Same request again: everything but the last prompt token comes from the cache.
    let (_, r3) = post(
        "/v1/chat/completions",
        json!({"messages": m2, "max_tokens": 8, "temperature": 0, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(
        r3["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap() as usize,
        p2 - 1
    );
    assert_eq!(
        r3["choices"][0]["message"]["content"],
        r2["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn header_session_id_and_anonymous_prefix_reuse() {
    let long = "You are a careful assistant. ".repeat(8);
    let body = |q: &str| json!({"messages": [{"role": "system", "content": long}, {"role": "user", "content": q}], "max_tokens": 4, "temperature": 0});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", base()))
        .header("X-Session-Id", "hdr-session")
        .json(&body("one"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s: Value = reqwest::get(format!("{}/v1/sessions/hdr-session", base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(s["tokens"].as_u64().unwrap() > 0, "{s}");
    // Without any key, a second request sharing the long system prompt reuses it.
    let (_, a) = post("/v1/chat/completions", body("first question")).await;
    let (_, b) = post("/v1/chat/completions", body("second question")).await;
    let _ = a;
    assert!(
        b["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 50,
        "{b}"
    );
}

#[tokio::test]
async fn sessions_api_lists_pins_deletes_and_404s() {
    let key = "agent-api";
    let (st, _) = post(
        "/v1/completions",
        json!({"prompt": "Hello there", "max_tokens": 3, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(st, 200);
    let c = reqwest::Client::new();
    let list: Value = c
        .get(format!("{}/v1/sessions", base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == key),
        "{list}"
    );
    assert!(list["resident_bytes"].as_u64().unwrap() <= list["budget_bytes"].as_u64().unwrap());
    let p: Value = c
        .patch(format!("{}/v1/sessions/{key}", base()))
        .json(&json!({"pinned": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["pinned"], true);
    let d = c
        .delete(format!("{}/v1/sessions/{key}", base()))
        .send()
        .await
        .unwrap();
    assert_eq!(d.status().as_u16(), 200);
    for r in [
        c.get(format!("{}/v1/sessions/{key}", base()))
            .send()
            .await
            .unwrap(),
        c.delete(format!("{}/v1/sessions/nope", base()))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status().as_u16(), 404);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["code"], "not_found");
    }
    let (st, e) = post(
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 1, "prompt_cache_key": "bad key!"}),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(e["error"]["param"], "prompt_cache_key");
}

#[tokio::test]
async fn a_busy_session_is_refused_not_corrupted() {
    let key = "agent-busy";
    let c = reqwest::Client::new();
    let mut long = c
        .post(format!("{}/v1/completions", base()))
        .json(&json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 200, "temperature": 0, "stream": true, "prompt_cache_key": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status().as_u16(), 200);
    let _first = long.chunk().await.unwrap();
    let (st, e) = post(
        "/v1/completions",
        json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 2, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"]["code"], "session_busy");
    assert_eq!(e["error"]["param"], "prompt_cache_key");
    // Hang up mid-stream: the session keeps exactly what was computed and is usable.
    drop(long);
    let mut ok = false;
    for _ in 0..50 {
        let (st, r) = post("/v1/completions", json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 2, "temperature": 0, "prompt_cache_key": key})).await;
        if st == 200 {
            assert!(
                r["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "session stayed busy after the client left");
}

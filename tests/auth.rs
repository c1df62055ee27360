//! API keys and per-key session isolation against a real server.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{json, Value};

fn base() -> String {
    common::server_with("auth", |c| {
        c.api_keys = vec!["key-a".into(), "key-b".into()];
    })
}

async fn call(
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, format!("{}{path}", base()));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn v1_needs_a_valid_key_health_and_metrics_do_not() {
    use reqwest::Method;
    for key in [None, Some("wrong"), Some("key-a ")] {
        for (m, path) in [
            (Method::GET, "/v1/models"),
            (Method::POST, "/v1/chat/completions"),
            (Method::GET, "/v1/sessions"),
            (Method::POST, "/tokenize"),
        ] {
            let (st, e) = call(m.clone(), path, key, Some(json!({}))).await;
            if key == Some("key-a ") {
                // Surrounding whitespace in the header is trimmed: this one is valid.
                assert_ne!(st, 401, "{path}");
                continue;
            }
            assert_eq!(st, 401, "{path} with {key:?}");
            assert_eq!(e["error"]["code"], "invalid_api_key");
            assert_eq!(e["error"]["type"], "invalid_request_error");
        }
    }
    let (st, _) = call(Method::GET, "/v1/models", Some("key-b"), None).await;
    assert_eq!(st, 200);
    let h = reqwest::get(format!("{}/health", base())).await.unwrap();
    assert_eq!(h.status().as_u16(), 200);
    let m = reqwest::get(format!("{}/metrics", base())).await.unwrap();
    assert_eq!(m.status().as_u16(), 200);
}

#[tokio::test]
async fn sessions_are_scoped_to_the_key_that_made_them() {
    use reqwest::Method;
    let body = json!({"prompt": "Shared secrets are", "max_tokens": 3, "temperature": 0, "prompt_cache_key": "same-name"});
    let (st, a) = call(
        Method::POST,
        "/v1/completions",
        Some("key-a"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(st, 200, "{a}");
    // Key A sees it under the id it chose.
    let (st, s) = call(Method::GET, "/v1/sessions/same-name", Some("key-a"), None).await;
    assert_eq!(st, 200);
    assert_eq!(s["id"], "same-name");
    let (_, list_a) = call(Method::GET, "/v1/sessions", Some("key-a"), None).await;
    assert!(list_a["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == "same-name"));
    // Key B can neither see, list, pin nor delete it: 404, as if it did not exist.
    let (st, e) = call(Method::GET, "/v1/sessions/same-name", Some("key-b"), None).await;
    assert_eq!(st, 404, "{e}");
    let (st, _) = call(
        Method::DELETE,
        "/v1/sessions/same-name",
        Some("key-b"),
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = call(
        Method::PATCH,
        "/v1/sessions/same-name",
        Some("key-b"),
        Some(json!({"pinned": true})),
    )
    .await;
    assert_eq!(st, 404);
    let (_, list_b) = call(Method::GET, "/v1/sessions", Some("key-b"), None).await;
    assert!(
        list_b["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != "same-name"),
        "{list_b}"
    );
    // Key B using the same name gets its own, empty cache.
    let (st, b) = call(
        Method::POST,
        "/v1/completions",
        Some("key-b"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // A's session is untouched and still reused by A.
    let (_, a2) = call(Method::POST, "/v1/completions", Some("key-a"), Some(body)).await;
    assert!(
        a2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn config_debug_never_prints_keys() {
    let mut args = candela::config::ServeArgs {
        api_keys: vec!["super-secret-key".into()],
        config: Some(std::path::PathBuf::from("/nonexistent/none.toml")),
        ..Default::default()
    };
    assert!(
        candela::Config::load(&args).is_err(),
        "a missing config file is an error"
    );
    args.config = None;
    let cfg = candela::Config::load(&args).unwrap();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("super-secret-key"), "{shown}");
    assert!(shown.contains("1 hidden"));
}

fn limited() -> String {
    common::server_with("limited", |c| {
        c.api_keys = vec!["lim-a".into(), "lim-b".into()];
        c.max_concurrent_per_key = 1;
    })
}

#[tokio::test]
async fn concurrent_requests_per_key_are_limited_with_429() {
    let base = limited();
    let c = reqwest::Client::new();
    let body = json!({"prompt": "Count: 1, 2, 3,", "max_tokens": 200, "stream": true});
    let mut long = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth("lim-a")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(long.status().as_u16(), 200);
    let _ = long.chunk().await.unwrap();
    let short = json!({"prompt": "hi", "max_tokens": 2});
    let r = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth("lim-a")
        .json(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    // Another key is not held back.
    let r = c
        .post(format!("{base}/v1/completions"))
        .bearer_auth("lim-b")
        .json(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Hanging up frees the permit.
    drop(long);
    let mut ok = false;
    for _ in 0..50 {
        let r = c
            .post(format!("{base}/v1/completions"))
            .bearer_auth("lim-a")
            .json(&short)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "permit not released after the client left");
}

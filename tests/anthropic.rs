//! Anthropic's Messages API against a real server and model: the official `anthropic`
//! Python package, unmodified (`tests/sdk/anthropic_sdk_check.py`; `.ci/run` installs
//! it, a missing package is a failure, not a skip), and over raw HTTP the error shapes
//! of bad input, `x-api-key` auth, and sessions that stay whole through errors.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{json, Value};

#[test]
fn official_anthropic_python_client_works() {
    let base = common::server();
    let stdout = common::run_sdk_script("anthropic_sdk_check.py", &[&base]);
    assert!(stdout.contains("anthropic sdk ok"), "{stdout}");
}

/// POST `body` (JSON text, sent as is) to `path` with `headers`: status, content type
/// and the answer as JSON.
async fn post(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, String, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ctype, r.json().await.unwrap_or(Value::Null))
}

fn total_input(u: &Value) -> u64 {
    [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
    .iter()
    .map(|k| u[k].as_u64().unwrap())
    .sum()
}

/// Anthropic's error body of `kind` whose message mentions `says`.
#[track_caller]
fn assert_error(got: &(u16, String, Value), status: u16, kind: &str, says: &str) {
    let (st, ctype, body) = got;
    assert_eq!(*st, status, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(says), "{msg:?} should mention {says:?}");
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
}

const SYSTEM: &str = "You are the assistant of a small library. It opens at 9am and closes at \
    6pm on weekdays, and at 1pm on Saturdays. Loans last three weeks and can be renewed twice.";

#[tokio::test]
async fn bad_input_gets_anthropic_errors_and_the_session_survives() {
    let base = common::server();
    // Claude Code's newer metadata form: its session id names the session.
    let sid = "3f1c9a52-7d4e-4b8a-9c61-0e2f5d7a8b90";
    let user_id = format!(
        r#"{{"device_id":"{}","account_uuid":"","session_id":"{sid}"}}"#,
        "a".repeat(64)
    );
    let turn1 = json!([{"role": "user", "content": "When do you close on Saturday?"}]);
    let req = |messages: &Value| {
        json!({"max_tokens": 12, "temperature": 0, "system": SYSTEM, "messages": messages,
               "metadata": {"user_id": user_id}})
    };
    let first = post(&base, "/v1/messages", &[], req(&turn1).to_string()).await;
    assert_eq!(first.0, 200, "{}", first.2);
    let u1 = &first.2["usage"];
    assert_eq!(u1["cache_read_input_tokens"], 0, "{u1}");
    assert_eq!(
        u1["cache_creation_input_tokens"].as_u64(),
        Some(total_input(u1)),
        "{u1}"
    );
    let session = format!("{base}/v1/sessions/{sid}");
    let before: Value = reqwest::get(&session).await.unwrap().json().await.unwrap();
    assert!(
        before["tokens"].as_u64().unwrap() >= total_input(u1),
        "{before}"
    );

    let with = |messages: Value| req(&messages).to_string();
    let bad = [
        ("malformed JSON", r#"{"max_tokens": 12, "messages": ["#.to_string(), "malformed JSON"),
        (
            "unknown block type",
            with(json!([{"role": "user", "content": [{"type": "hologram", "text": "hi"}]}])),
            "unknown or unsupported content block type `hologram`",
        ),
        (
            "tool_result for an unknown tool_use_id",
            with(json!([
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_known", "name": "w", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_unknown", "content": "sunny"}]}
            ])),
            "toolu_unknown",
        ),
        (
            "malformed block",
            with(json!([{"role": "user", "content": [{"type": "text"}]}])),
            "messages[0].content[0].text: field required",
        ),
        (
            "image block",
            with(json!([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}])),
            "`image` are not supported",
        ),
        (
            "missing max_tokens",
            json!({"messages": turn1, "metadata": {"user_id": user_id}}).to_string(),
            "max_tokens: field required",
        ),
        (
            "temperature out of range",
            json!({"max_tokens": 4, "temperature": 7, "messages": turn1, "metadata": {"user_id": user_id}}).to_string(),
            "temperature",
        ),
        (
            "tool_choice naming no tool",
            json!({"max_tokens": 4, "messages": turn1, "metadata": {"user_id": user_id},
                   "tools": [{"name": "w", "input_schema": {"type": "object"}}],
                   "tool_choice": {"type": "tool", "name": "v"}}).to_string(),
            "`v`",
        ),
    ];
    for (what, body, says) in bad {
        let got = post(&base, "/v1/messages", &[], body).await;
        assert_error(&got, 400, "invalid_request_error", says);
        eprintln!("{what}: {}", got.2["error"]["message"]);
    }
    let got = post(
        &base,
        "/v1/messages/count_tokens",
        &[],
        json!({"messages": "hi"}).to_string(),
    )
    .await;
    assert_error(&got, 400, "invalid_request_error", "messages");
    let got = post(
        &base,
        "/v1/messages",
        &[],
        json!({"model": "nope", "max_tokens": 4, "messages": turn1}).to_string(),
    )
    .await;
    assert_error(&got, 404, "not_found_error", "nope");

    // The session is as it was, and its next turn reads the whole first prompt back.
    let after: Value = reqwest::get(&session).await.unwrap().json().await.unwrap();
    assert_eq!(after["tokens"], before["tokens"], "{after}");
    let reply = first.2["content"][0]["text"].as_str().unwrap();
    let turn2 = json!([
        turn1[0],
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And how long is a loan?"}
    ]);
    let second = post(&base, "/v1/messages", &[], req(&turn2).to_string()).await;
    assert_eq!(second.0, 200, "{}", second.2);
    let u2 = &second.2["usage"];
    assert!(
        u2["cache_read_input_tokens"].as_u64().unwrap() >= total_input(u1),
        "{u1} then {u2}"
    );
    assert_eq!(u2["input_tokens"], 0, "{u2}");

    // Claude Code's header names the same session; another id is another session.
    let third = post(
        &base,
        "/v1/messages",
        &[("x-claude-code-session-id", sid)],
        {
            let mut b = req(&turn2);
            b["metadata"] = json!({});
            b.to_string()
        },
    )
    .await;
    assert!(
        third.2["usage"]["cache_read_input_tokens"]
            .as_u64()
            .unwrap()
            >= total_input(u1),
        "{}",
        third.2
    );
    let other = post(
        &base,
        "/v1/messages",
        &[("x-claude-code-session-id", "another-session")],
        req(&turn1).to_string(),
    )
    .await;
    assert_eq!(
        other.2["usage"]["cache_read_input_tokens"], 0,
        "{}",
        other.2
    );
}

#[tokio::test]
async fn streams_are_named_events_and_end_with_message_stop() {
    let base = common::server();
    let body = json!({"max_tokens": 6, "temperature": 0, "stream": true,
                      "messages": [{"role": "user", "content": "Say hello."}]});
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/messages"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    let mut names = Vec::new();
    let mut last_name = "";
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            last_name = n;
            names.push(n.to_string());
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(
                v["type"], last_name,
                "the event is named by its type: {line}"
            );
        }
    }
    assert_eq!(
        names.first().map(String::as_str),
        Some("message_start"),
        "{text}"
    );
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{text}"
    );
    assert!(names.contains(&"content_block_delta".to_string()), "{text}");
    assert_eq!(
        names.iter().filter(|n| *n == "message_delta").count(),
        1,
        "{text}"
    );
}

#[tokio::test]
async fn x_api_key_is_accepted_and_sessions_stay_per_key() {
    let base = common::server_with("anthropic-keys", |c| {
        c.api_keys = vec!["key-a".into(), "key-b".into()];
    });
    let body = json!({"max_tokens": 4, "temperature": 0, "system": SYSTEM,
                      "metadata": {"user_id": "shared-name"},
                      "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    for headers in [
        vec![],
        vec![("x-api-key", "wrong")],
        vec![("authorization", "Bearer wrong")],
    ] {
        let got = post(&base, "/v1/messages", &headers, body.clone()).await;
        assert_error(&got, 401, "authentication_error", "x-api-key");
        let got = post(&base, "/v1/messages/count_tokens", &headers, body.clone()).await;
        assert_error(&got, 401, "authentication_error", "API key");
    }
    // The OpenAI routes keep OpenAI's shape.
    let (st, _, e) = post(
        &base,
        "/v1/chat/completions",
        &[("x-api-key", "wrong")],
        "{}".into(),
    )
    .await;
    assert_eq!(
        (st, &e["error"]["code"]),
        (401, &json!("invalid_api_key")),
        "{e}"
    );

    let a1 = post(
        &base,
        "/v1/messages",
        &[("x-api-key", "key-a")],
        body.clone(),
    )
    .await;
    assert_eq!(a1.0, 200, "{}", a1.2);
    let a2 = post(
        &base,
        "/v1/messages",
        &[("x-api-key", "key-a")],
        body.clone(),
    )
    .await;
    assert!(
        a2.2["usage"]["cache_read_input_tokens"].as_u64().unwrap() > 0,
        "{}",
        a2.2
    );
    // The same user_id under another key is another session.
    let b1 = post(
        &base,
        "/v1/messages",
        &[("authorization", "Bearer key-b")],
        body.clone(),
    )
    .await;
    assert_eq!(b1.0, 200, "{}", b1.2);
    assert_eq!(b1.2["usage"]["cache_read_input_tokens"], 0, "{}", b1.2);
}

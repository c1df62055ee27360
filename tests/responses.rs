//! The Responses API against a real server and the default model: the official
//! `openai` package and the OpenAI Agents SDK, unmodified (`.ci/run` installs both; a
//! missing package is a failure, not a skip), and over plain HTTP what the clients
//! do not show: bad input in OpenAI's error shape with the session unharmed,
//! branches, scoping by API key, and stored responses surviving a restart with their
//! session (and leaving with it).

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use reqwest::Method;
use serde_json::{json, Value};

use common::Running;

const INSTRUCTIONS: &str = "You are a helpful assistant. Answer briefly.";

#[test]
fn official_openai_client_runs_the_responses_api() {
    let base = common::server();
    let stdout = common::run_sdk_script("openai_responses.py", &[&base]);
    assert!(stdout.contains("openai responses ok"), "{stdout}");
}

#[test]
fn openai_agents_sdk_runs_an_agent_with_a_function_tool() {
    let base = common::server();
    let stdout = common::run_sdk_script("openai_agents.py", &[&base]);
    assert!(stdout.contains("called get_weather("), "{stdout}");
    assert!(stdout.contains("openai agents ok"), "{stdout}");
}

async fn call(
    base: &str,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn create(base: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    call(base, Method::POST, "/v1/responses", key, Some(body)).await
}

/// A greedy turn: `input` after `previous` (if any).
fn turn(input: Value, previous: Option<&str>) -> Value {
    json!({
        "instructions": INSTRUCTIONS, "input": input, "previous_response_id": previous,
        "max_output_tokens": 12, "temperature": 0,
    })
}

fn text(r: &Value) -> &str {
    r["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
}

fn usage(r: &Value, field: &str) -> u64 {
    match field {
        "cached" => r["usage"]["input_tokens_details"]["cached_tokens"].as_u64(),
        f => r["usage"][f].as_u64(),
    }
    .unwrap()
}

/// The OpenAI error shape, naming `param`, with status `status`.
fn assert_error(got: &(u16, Value), status: u16, param: Option<&str>) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    assert!(e.get("code").is_some(), "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
}

/// The conversation of a chain, sent whole and unstored: what a chained turn must
/// answer.
async fn control(base: &str, key: Option<&str>, items: Value) -> Value {
    let mut body = turn(items, None);
    body["store"] = json!(false);
    let (s, r) = create(base, key, body).await;
    assert_eq!(s, 200, "{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_4xx_and_the_chain_goes_on_with_branches() {
    let base = common::server();
    let q1 = "Name a fruit that is red.";
    let (s, r1) = create(&base, None, turn(json!(q1), None)).await;
    assert_eq!(s, 200, "{r1}");
    let id = r1["id"].as_str().unwrap();
    let bad = [
        (
            json!([{"type": "computer_call", "id": "x"}]),
            "input[0].type",
        ),
        (
            json!([{"type": "function_call", "name": "f", "arguments": "{}"}]),
            "input[0].call_id",
        ),
        (
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            "input[0].content[0]",
        ),
        (
            json!([{"role": "wizard", "content": "hi"}]),
            "input[0].role",
        ),
        (json!([42]), "input[0]"),
        (json!(7), "input"),
    ];
    for (input, param) in bad {
        let got = create(&base, None, turn(input.clone(), Some(id))).await;
        assert_error(&got, 400, Some(param));
    }
    let missing = create(&base, None, turn(json!("hi"), Some("resp_nope"))).await;
    assert_error(&missing, 404, Some("previous_response_id"));
    assert_eq!(missing.1["error"]["code"], "not_found");
    let mut tools = turn(json!("hi"), Some(id));
    tools["tools"] = json!([{"type": "web_search"}]);
    assert_error(
        &create(&base, None, tools).await,
        400,
        Some("tools[0].type"),
    );
    let mut meta = turn(json!("hi"), Some(id));
    meta["metadata"] = json!({"k": 1});
    assert_error(&create(&base, None, meta).await, 400, Some("metadata"));
    assert_error(
        &call(&base, Method::GET, "/v1/responses/resp_nope", None, None).await,
        404,
        None,
    );
    assert_error(
        &call(&base, Method::DELETE, "/v1/responses/resp_nope", None, None).await,
        404,
        None,
    );

    // After all that the chain continues, warm, as if nothing had happened; and a
    // second branch off the same response gets its own conversation right.
    let history = |q2: &str| {
        json!([
            {"role": "user", "content": q1},
            {"role": "assistant", "content": text(&r1)},
            {"role": "user", "content": q2},
        ])
    };
    for q2 in ["And one that is yellow?", "What colour is the sky?"] {
        let (s, r2) = create(&base, None, turn(json!(q2), Some(id))).await;
        assert_eq!(s, 200, "{r2}");
        assert!(
            usage(&r2, "cached") >= usage(&r1, "input_tokens"),
            "{r1}\n{r2}"
        );
        let whole = control(&base, None, history(q2)).await;
        assert_eq!(text(&r2), text(&whole), "{q2}");
        assert_eq!(usage(&r2, "input_tokens"), usage(&whole, "input_tokens"));
        assert_eq!(r2["previous_response_id"], id);
    }
    // The response's session is an ordinary session.
    let (s, sess) = call(
        &base,
        Method::GET,
        &format!("/v1/sessions/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{sess}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cannot_see_or_continue_another_keys_responses() {
    let base = common::server_with("responses-auth", |c| {
        c.api_keys = vec!["key-a".into(), "key-b".into()];
    });
    let (s, r) = create(&base, Some("key-a"), turn(json!("Hello!"), None)).await;
    assert_eq!(s, 200, "{r}");
    let id = r["id"].as_str().unwrap();
    let path = format!("/v1/responses/{id}");
    assert_eq!(call(&base, Method::GET, &path, None, None).await.0, 401);
    assert_error(
        &call(&base, Method::GET, &path, Some("key-b"), None).await,
        404,
        None,
    );
    assert_error(
        &call(&base, Method::DELETE, &path, Some("key-b"), None).await,
        404,
        None,
    );
    let chain = create(&base, Some("key-b"), turn(json!("More?"), Some(id))).await;
    assert_error(&chain, 404, Some("previous_response_id"));
    // Key A still has it, whole, and continues it warm.
    let (s, got) = call(&base, Method::GET, &path, Some("key-a"), None).await;
    assert_eq!((s, &got), (200, &r));
    let (s, r2) = create(&base, Some("key-a"), turn(json!("More?"), Some(id))).await;
    assert_eq!(s, 200, "{r2}");
    assert!(usage(&r2, "cached") >= usage(&r, "input_tokens"), "{r2}");
    // Key B's session list does not show A's conversation.
    let (_, list) = call(&base, Method::GET, "/v1/sessions", Some("key-b"), None).await;
    assert!(!list.to_string().contains(id), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_survive_a_restart_and_leave_with_their_session() {
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().to_path_buf();
    let start = || {
        let mut cfg = common::test_config(spill.clone());
        cfg.queue_size = 16;
        cfg.max_batch = 4;
        Running::start(cfg)
    };
    let a = start().await;
    let (s, r1) = create(&a.url, None, turn(json!("Name a big animal."), None)).await;
    assert_eq!(s, 200, "{r1}");
    let id = r1["id"].as_str().unwrap().to_string();
    // A second conversation whose response is deleted: it stays deleted.
    let (_, other) = create(&a.url, None, turn(json!("Name a small animal."), None)).await;
    let other_id = other["id"].as_str().unwrap().to_string();
    let other_path = format!("/v1/responses/{other_id}");
    let (s, del) = call(&a.url, Method::DELETE, &other_path, None, None).await;
    assert_eq!(s, 200, "{del}");
    assert_eq!(
        del,
        json!({"id": other_id, "object": "response", "deleted": true})
    );
    a.stop().await;

    let b = start().await;
    let path = format!("/v1/responses/{id}");
    let (s, got) = call(&b.url, Method::GET, &path, None, None).await;
    assert_eq!((s, &got), (200, &r1), "the stored response came back");
    assert_eq!(
        call(&b.url, Method::GET, &other_path, None, None).await.0,
        404
    );
    let (_, sess) = call(
        &b.url,
        Method::GET,
        &format!("/v1/sessions/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(sess["tier"], "disk", "{sess}");
    // Chaining reads the first turn from the restored cache.
    let (s, r2) = create(&b.url, None, turn(json!("And a fast one?"), Some(&id))).await;
    assert_eq!(s, 200, "{r2}");
    assert!(usage(&r2, "cached") >= usage(&r1, "input_tokens"), "{r2}");
    let r2_id = r2["id"].as_str().unwrap().to_string();
    // Evicting the session (here: deleting it) takes its responses along.
    let (s, _) = call(
        &b.url,
        Method::DELETE,
        &format!("/v1/sessions/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    for gone in [&id, &r2_id] {
        let got = call(
            &b.url,
            Method::GET,
            &format!("/v1/responses/{gone}"),
            None,
            None,
        )
        .await;
        assert_error(&got, 404, None);
    }
    let chain = create(&b.url, None, turn(json!("More?"), Some(&r2_id))).await;
    assert_error(&chain, 404, Some("previous_response_id"));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_style_turns_are_warm_through_its_session_header() {
    let base = common::server();
    let session = format!("codex-{}", std::process::id());
    // What Codex sends: the whole history every turn, unstored, its conversation id
    // in the `session_id` header.
    let send = |input: Value| {
        let (base, session) = (base.clone(), session.clone());
        async move {
            let r = reqwest::Client::new()
                .post(format!("{base}/v1/responses"))
                .header("session_id", session)
                .json(&json!({
                    "instructions": INSTRUCTIONS, "input": input, "store": false,
                    "max_output_tokens": 10, "temperature": 0,
                    "include": ["reasoning.encrypted_content"], "reasoning": null,
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let q1 = json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List two colours."}]});
    let r1 = send(json!([q1])).await;
    assert_eq!(usage(&r1, "cached"), 0, "{r1}");
    let mut history = vec![q1];
    history.extend(r1["output"].as_array().unwrap().iter().cloned());
    history.push(json!({"role": "user", "content": "And two more?"}));
    let r2 = send(Value::Array(history)).await;
    assert!(usage(&r2, "cached") >= usage(&r1, "input_tokens"), "{r2}");
    let (s, sess) = call(
        &base,
        Method::GET,
        &format!("/v1/sessions/{session}"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{sess}");
    // Unstored: neither retrievable nor chainable.
    let id = r2["id"].as_str().unwrap();
    let got = call(
        &base,
        Method::GET,
        &format!("/v1/responses/{id}"),
        None,
        None,
    )
    .await;
    assert_error(&got, 404, None);
    let chain = create(&base, None, turn(json!("More?"), Some(id))).await;
    assert_error(&chain, 404, Some("previous_response_id"));
}

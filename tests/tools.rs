//! Tool calls and structured output against the real default model: constrained
//! outputs validate with a JSON Schema validator (Python `jsonschema`, Draft 2020-12)
//! over many seeds and temperatures, streamed calls equal whole ones, bad inputs get
//! 400, and a multi-turn tool loop runs through the official `openai` SDK.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::{json, Value};

fn url() -> String {
    format!("{}/v1/chat/completions", common::server())
}

/// Validate (schema, instance) pairs with Python's `jsonschema`; panics on any failure.
fn validate_all(cases: &[(Value, Value)]) {
    use std::io::Write;
    let list: Vec<Value> = cases
        .iter()
        .map(|(s, i)| json!({"schema": s, "instance": i}))
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/validate_json.py");
    let mut child = std::process::Command::new(common::python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::Array(list).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "schema validation failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer"},
            "email": {"type": ["string", "null"], "maxLength": 40},
            "role": {"enum": ["admin", "user", "guest"]},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": false
            },
            "active": {"type": "boolean"},
            "score": {"type": "number"}
        },
        "required": ["name", "age", "role", "skills", "address", "active"],
        "additionalProperties": false
    })
}

#[tokio::test]
async fn json_schema_outputs_validate_over_seeds_and_temperatures() {
    let schema = person_schema();
    let mut cases = Vec::new();
    for (i, temp) in [0.0, 0.5, 0.9, 1.3].iter().enumerate() {
        for seed in 0..3u64 {
            if *temp == 0.0 && seed > 0 {
                continue; // greedy: one is enough
            }
            let (status, v) = common::post_json(
                &url(),
                &json!({
                    "messages": [{"role": "user", "content": "Make up a user profile for a software engineer."}],
                    "max_tokens": 300, "temperature": temp, "seed": seed * 7 + i as u64,
                    "response_format": {"type": "json_schema",
                        "json_schema": {"name": "profile", "schema": schema, "strict": true}}
                }),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            let choice = &v["choices"][0];
            assert_eq!(choice["finish_reason"], "stop", "{v}");
            let text = choice["message"]["content"].as_str().unwrap();
            let inst: Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
            cases.push((schema.clone(), inst));
        }
    }
    assert_eq!(cases.len(), 10);
    validate_all(&cases);
}

#[tokio::test]
async fn json_object_mode_gives_an_object_and_length_cuts_say_length() {
    for seed in 0..3 {
        let (status, v) = common::post_json(
            &url(),
            &json!({
                "messages": [{"role": "user", "content": "Describe a cat in JSON."}],
                "max_tokens": 200, "temperature": 0.8, "seed": seed,
                "response_format": {"type": "json_object"}
            }),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        if v["choices"][0]["finish_reason"] == "stop" {
            let o: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(o.is_object(), "{o}");
        } else {
            assert_eq!(v["choices"][0]["finish_reason"], "length");
        }
    }
    let (status, v) = common::post_json(
        &url(),
        &json!({
            "messages": [{"role": "user", "content": "Make up a user profile."}],
            "max_tokens": 4, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}}
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert!(
        serde_json::from_str::<Value>(v["choices"][0]["message"]["content"].as_str().unwrap())
            .is_err()
    );
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "search_flights", "description": "Find flights between two airports on a date",
            "parameters": {"type": "object", "properties": {
                "from": {"type": "string", "maxLength": 3, "minLength": 3},
                "to": {"type": "string", "maxLength": 3, "minLength": 3},
                "passengers": {"type": "integer"},
                "nonstop": {"type": "boolean"}},
                "required": ["from", "to", "passengers"], "additionalProperties": false}}}
    ])
}

fn params_of(name: &str) -> Value {
    tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap()["function"]["parameters"]
        .clone()
}

#[tokio::test]
async fn forced_tool_calls_have_schema_valid_arguments() {
    let prompts = [
        "What's the weather like in Lisbon?",
        "Book me a flight from JFK to SFO for 2 people.",
    ];
    let choices = [
        json!("required"),
        json!({"type": "function", "function": {"name": "search_flights"}}),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ];
    let mut cases = Vec::new();
    let mut n = 0u64;
    for choice in &choices {
        for (k, temp) in [0.0, 0.7, 1.2].iter().enumerate() {
            n += 1;
            let (status, v) = common::post_json(
                &url(),
                &json!({
                    "messages": [{"role": "user", "content": prompts[k % 2]}],
                    "tools": tools(), "tool_choice": choice, "parallel_tool_calls": false,
                    "max_tokens": 200, "temperature": temp, "seed": n
                }),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            let c = &v["choices"][0];
            assert_eq!(c["finish_reason"], "tool_calls", "{v}");
            assert!(c["message"]["content"].is_null(), "{v}");
            let calls = c["message"]["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{v}");
            let call = &calls[0];
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
            assert_eq!(call["type"], "function");
            let name = call["function"]["name"].as_str().unwrap();
            if let Some(want) = choice.get("function") {
                assert_eq!(name, want["name"], "{v}");
            }
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            cases.push((params_of(name), args));
        }
    }
    validate_all(&cases);
}

/// One streamed call: id, name, the argument fragments as they came.
struct Streamed {
    name: String,
    frags: Vec<String>,
}

/// Reassemble streamed tool-call deltas the way an OpenAI client does, checking their
/// shape: a call's first delta carries id, type, name and `arguments: ""`; later ones
/// only its index and a piece of the arguments.
async fn stream_calls(url: &str, body: &Value) -> (Vec<Streamed>, String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut calls: Vec<Streamed> = Vec::new();
    let mut finish = String::new();
    let mut content = String::new();
    for line in text.lines() {
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).unwrap();
        let c = &v["choices"][0];
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        let tcs = c["delta"]["tool_calls"].as_array();
        assert!(tcs.is_none_or(|a| a.len() == 1), "one call per delta: {v}");
        for tc in tcs.into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert!(tc["id"].as_str().unwrap().starts_with("call_"), "{tc}");
                assert_eq!(tc["type"], "function");
                assert_eq!(tc["function"]["arguments"], "", "{tc}");
                calls.push(Streamed {
                    name: tc["function"]["name"].as_str().unwrap().into(),
                    frags: Vec::new(),
                });
                continue;
            }
            assert!(i + 1 == calls.len(), "call index {i} out of order");
            assert!(
                tc.get("id").is_none() && tc["function"].get("name").is_none(),
                "{tc}"
            );
            let a = tc["function"]["arguments"].as_str().unwrap();
            assert!(!a.is_empty(), "{tc}");
            calls[i].frags.push(a.into());
        }
    }
    (calls, finish, content)
}

/// Whole and streamed responses for `(seed, tool_choice, parallel)` cases agree call for
/// call; forced calls stream their arguments in several pieces.
async fn streams_match_whole(url: &str, cases: &[(u64, Value, bool)]) {
    let mut pieces = 0usize;
    let mut forced_calls = 0usize;
    for (seed, choice, parallel) in cases {
        let body = json!({
            "messages": [{"role": "user", "content": "What's the weather in Oslo, in celsius?"}],
            "tools": tools(), "tool_choice": choice, "parallel_tool_calls": parallel,
            "max_tokens": 160, "temperature": 0.8, "seed": seed
        });
        let (status, whole) = common::post_json(url, &body).await;
        assert_eq!(status, 200, "{whole}");
        let (streamed, finish, content) = stream_calls(url, &body).await;
        let c = &whole["choices"][0];
        assert_eq!(finish, c["finish_reason"].as_str().unwrap(), "{whole}");
        let want: Vec<(String, String)> = c["message"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["function"]["name"].as_str().unwrap().into(),
                    t["function"]["arguments"].as_str().unwrap().into(),
                )
            })
            .collect();
        let got: Vec<(String, String)> = streamed
            .iter()
            .map(|s| (s.name.clone(), s.frags.concat()))
            .collect();
        assert_eq!(got, want, "seed {seed} {choice}");
        if want.is_empty() {
            assert_eq!(
                content,
                c["message"]["content"].as_str().unwrap(),
                "seed {seed}"
            );
        }
        if *choice != json!("auto") {
            assert!(!want.is_empty(), "{whole}");
            for (k, s) in streamed.iter().enumerate() {
                // A last call cut off by max_tokens keeps what it has so far, maybe
                // nothing yet; every complete one has required string arguments, so
                // many tokens each.
                if finish == "length" && k + 1 == streamed.len() {
                    continue;
                }
                assert!(s.frags.len() > 3, "seed {seed}: {:?} in {whole}", s.frags);
                forced_calls += 1;
                pieces += s.frags.len();
            }
        }
    }
    eprintln!(
        "{forced_calls} forced calls, {:.1} argument deltas per call",
        pieces as f64 / forced_calls.max(1) as f64
    );
}

fn stream_cases() -> Vec<(u64, Value, bool)> {
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let mut cases = Vec::new();
    for seed in 1..=2u64 {
        cases.push((seed, json!("required"), false));
        cases.push((seed + 10, json!("required"), true));
        cases.push((seed + 20, named.clone(), false));
        cases.push((seed + 30, json!("auto"), true));
    }
    cases
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_into_the_whole_response() {
    streams_match_whole(&url(), &stream_cases()).await;
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_on_qwen() {
    let base = common::server_with("qwen", |c| {
        c.models = vec![common::qwen_path().to_string_lossy().into_owned()]
    });
    let url = format!("{base}/v1/chat/completions");
    streams_match_whole(&url, &stream_cases()).await;
}

#[tokio::test]
async fn bad_tool_and_format_inputs_are_400() {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}}}}]}),
            "tools[0].function.parameters/properties/x/pattern",
        ),
        (
            json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "patternProperties": {"^x": {}}}}}]}),
            "tools[0].function.parameters/patternProperties",
        ),
        (
            json!({"messages": msgs, "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": msgs, "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": msgs, "tools": tools(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"messages": msgs, "tools": [{"type": "code_interpreter"}]}),
            "tools[0].type",
        ),
        (
            json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}},
                                            {"type": "function", "function": {"name": "f"}}]}),
            "tools[1].function.name",
        ),
        (
            json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"messages": msgs, "response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}}}}),
            "response_format.json_schema.schema/properties/n/minimum",
        ),
        (
            json!({"messages": msgs, "response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/s.json"}}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"messages": msgs, "response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (
            json!({"messages": msgs, "response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"messages": msgs, "tools": tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}),
            "messages[1].tool_call_id",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]}),
            "messages[0].tool_calls[0]",
        ),
    ];
    for (body, param) in cases {
        let (status, v) = common::post_json(&url(), &body).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // The message names the unsupported keyword.
    let (_, v) = common::post_json(
        &url(),
        &json!({"messages": msgs, "response_format": {"type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "format": "email"}}}}),
    )
    .await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`format`"),
        "{v}"
    );
}

#[test]
fn token_bytes_match_the_decoder() {
    use candle_core::quantized::gguf_file;
    let path = common::model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let tok = candela::engine::Tok::from_gguf(&ct, None).unwrap();
    let bytes = tok.token_bytes();
    assert_eq!(bytes.len(), tok.vocab_size);
    let mut checked = 0;
    for (id, b) in bytes.iter().enumerate() {
        let text = tok.decode(&[id as u32], false).unwrap();
        match b {
            None => assert!(text.is_empty(), "control token {id} decodes to {text:?}"),
            Some(b) => {
                if let Ok(s) = std::str::from_utf8(b) {
                    assert_eq!(s, text, "token {id}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 45_000, "{checked}");
}

#[test]
fn openai_sdk_tool_loop() {
    let base = common::server();
    let stdout = common::run_sdk_script("openai_tool_loop.py", &[&base]);
    assert!(stdout.contains("tool loop ok"), "{stdout}");
}

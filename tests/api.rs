//! The HTTP API against a real server and the real default model.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::ids;

use serde_json::{json, Value};

async fn post(path: &str, body: Value) -> (u16, Value) {
    common::post_json(&format!("{}{path}", common::server()), &body).await
}

async fn post_raw(path: &str, body: &str) -> (u16, Value) {
    let url = format!("{}{path}", common::server());
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn tokenizer_ids_equal_llama_cpp() {
    let fx = common::fixture();
    let cases = fx["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let (st, r) = post("/tokenize", json!({"content": c["text"]})).await;
        assert_eq!(st, 200);
        assert_eq!(ids(&r["tokens"]), ids(&c["ids"]), "text {:?}", c["text"]);
    }
}

#[tokio::test]
async fn detokenize_round_trips() {
    let (_, r) = post("/tokenize", json!({"content": "Hello, wörld! 123"})).await;
    let (st, d) = post("/detokenize", json!({"tokens": r["tokens"]})).await;
    assert_eq!(st, 200);
    assert_eq!(d["content"], "Hello, wörld! 123");
    let (st, e) = post("/detokenize", json!({"tokens": [1, 999999]})).await;
    assert_eq!(st, 400);
    assert_eq!(e["error"]["param"], "tokens");
}

/// Greedy decoding against llama.cpp's (flash-attention path, same GGUF): we count how
/// many leading tokens agree. Token pieces are compared through `logprobs` so that ids,
/// not re-tokenized text, are compared.
///
/// Every prompt agrees all the way: 32 tokens, or up to llama.cpp's end of turn where
/// we stop too (the CPU path reproduces ggml's arithmetic bit for bit; see README,
/// "Correctness"). A prompt is counted when it agrees over 24+ tokens or to its end.
#[tokio::test]
async fn greedy_completions_follow_llama_cpp() {
    let fx = common::fixture();
    let mut full = 0;
    let mut report = Vec::new();
    for g in fx["greedy"].as_array().unwrap() {
        let all = ids(&g["completion_ids"]);
        let want: Vec<u32> = all
            .iter()
            .copied()
            .take_while(|&t| t != 0 && t != 2)
            .collect();
        let (st, r) = post(
            "/v1/completions",
            // A fresh session per run: no prefix reuse, so the prefill is the same every time
            // (this model's logits are sensitive to how the prompt is chunked).
            json!({"prompt": g["prompt_ids"], "max_tokens": 32, "temperature": 0,
                   "prompt_cache_key": format!("greedy-{}", uuid::Uuid::new_v4().simple())}),
        )
        .await;
        assert_eq!(st, 200, "{r}");
        let text = r["choices"][0]["text"].as_str().unwrap().to_string();
        // Leading tokens agree while llama.cpp's text so far is a prefix of ours.
        let mut agree = 0;
        for k in 1..=want.len() {
            let (_, t) = post("/detokenize", json!({"tokens": &want[..k]})).await;
            let t = t["content"].as_str().unwrap();
            if t.contains('\u{FFFD}') {
                continue; // half a character: decide at the next token
            }
            if !text.starts_with(t) {
                break;
            }
            agree = k;
        }
        if want.len() < all.len() && agree == want.len() {
            // llama.cpp ended the turn here; so must we.
            assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
            assert_eq!(text.len(), {
                let (_, t) = post("/detokenize", json!({"tokens": &want})).await;
                t["content"].as_str().unwrap().len()
            });
        }
        report.push(agree);
        assert!(
            agree >= 1,
            "first greedy token differs from llama.cpp for {:?}",
            g["prompt"]
        );
        if agree >= 24 || (agree == want.len() && want.len() < all.len()) {
            full += 1;
        }
    }
    eprintln!("tokens agreeing with llama.cpp per prompt: {report:?}");
    assert!(
        full >= 10,
        "only {full} prompts agree over 24+ tokens (or to the end of turn): {report:?}"
    );
}

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let (st, r) = post(
        "/v1/chat/completions",
        json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert!(!r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    let u = &r["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    // The prompt is the model's chat template: system turn + user turn + generation prompt.
    let (_, t) = post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Say hi"}]}),
    )
    .await;
    assert_eq!(u["prompt_tokens"], t["count"]);
}

async fn sse(path: &str, body: Value) -> Vec<Value> {
    let url = format!("{}{path}", common::server());
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let datas: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        datas.last(),
        Some(&"[DONE]"),
        "stream must end with [DONE]: {text}"
    );
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn streaming_chat_matches_non_streaming() {
    let body = json!({"messages": [{"role": "user", "content": "List three colors."}], "max_tokens": 24, "temperature": 0});
    let (_, whole) = post("/v1/chat/completions", body.clone()).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let chunks = sse("/v1/chat/completions", sbody).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let fin = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(
        fin["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    // cached_tokens may differ (the anonymous prefix pool); the counts may not.
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], whole["usage"][k]);
    }
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn streaming_text_completion() {
    let chunks = sse(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 10, "stream": true, "temperature": 0}),
    )
    .await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let (_, whole) = post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage without include_usage"
    );
}

#[tokio::test]
async fn same_seed_same_output() {
    let body =
        json!({"prompt": "The weather today is", "max_tokens": 24, "temperature": 1.2, "seed": 42});
    let (_, a) = post("/v1/completions", body.clone()).await;
    let (_, b) = post("/v1/completions", body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let outs: std::collections::HashSet<String> = futures::future::join_all((0..4).map(|s| {
        post("/v1/completions", json!({"prompt": "The weather today is", "max_tokens": 24, "temperature": 1.2, "seed": 100 + s}))
    }))
    .await
    .into_iter()
    .map(|(_, r)| r["choices"][0]["text"].as_str().unwrap().to_string())
    .collect();
    assert!(outs.len() > 1, "different seeds should differ: {outs:?}");
}

#[tokio::test]
async fn stop_strings_are_never_emitted() {
    let (_, free) = post("/v1/completions", json!({"prompt": [1, 9690, 198, 19161, 514, 216, 33, 288, 216, 33, 32, 2, 198, 1, 520, 9531, 198], "max_tokens": 32, "temperature": 0})).await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the free-running output.
    let stop: String = text.chars().skip(6).take(3).collect();
    assert!(!stop.is_empty(), "{text}");
    let (_, r) = post("/v1/completions", json!({"prompt": [1, 9690, 198, 19161, 514, 216, 33, 288, 216, 33, 32, 2, 198, 1, 520, 9531, 198], "max_tokens": 32, "temperature": 0, "stop": [stop.clone(), "zzzz"]})).await;
    let got = r["choices"][0]["text"].as_str().unwrap();
    assert!(!got.contains(&stop), "{got:?} contains stop {stop:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(text.starts_with(got), "{text:?} vs {got:?}");
}

#[tokio::test]
async fn logprobs_are_reported() {
    let (st, r) = post("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 3})).await;
    assert_eq!(st, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["logprob"], top[0]["logprob"]);
        assert!(t["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[tokio::test]
async fn concurrent_requests_all_complete_correctly() {
    let prompts = [
        "The quick brown fox",
        "def fibonacci(n):",
        "Once upon a time",
        "1, 2, 3,",
        "Paris is",
        "import numpy",
    ];
    let mut sequential = Vec::new();
    for p in prompts {
        let (_, r) = post(
            "/v1/completions",
            json!({"prompt": p, "max_tokens": 16, "temperature": 0}),
        )
        .await;
        sequential.push(r["choices"][0]["text"].clone());
    }
    let concurrent = futures::future::join_all(prompts.iter().map(|p| {
        post(
            "/v1/completions",
            json!({"prompt": p, "max_tokens": 16, "temperature": 0}),
        )
    }))
    .await;
    for (i, (st, r)) in concurrent.into_iter().enumerate() {
        assert_eq!(st, 200);
        assert_eq!(
            r["choices"][0]["text"], sequential[i],
            "prompt {}",
            prompts[i]
        );
    }
}

/// A long prompt joining while another stream decodes is prefilled in chunks that the
/// running stream's decode steps ride along with (one forward pass for both): the stream
/// keeps getting tokens while the newcomer reads its prompt, instead of waiting for each
/// 512-token prefill pass and a decode pass of its own. Counted in tokens, not timed; and
/// both outputs are what each gives alone (greedy).
#[tokio::test]
async fn running_stream_advances_while_a_long_prompt_is_prefilled() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let url = format!("{}/v1/completions", common::server());
    let a_prompt = "Count with me: 1, 2, 3,";
    let a_body = |stream: bool| {
        json!({"prompt": a_prompt, "max_tokens": 60, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&a_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let tokens = Arc::new(AtomicUsize::new(0));
    let seen = tokens.clone();
    let reader = tokio::spawn(async move {
        let (mut resp, mut body) = (resp, String::new());
        while let Ok(Some(chunk)) = resp.chunk().await {
            let part = String::from_utf8_lossy(&chunk).to_string();
            seen.fetch_add(part.matches("\"text\"").count(), Ordering::SeqCst);
            body.push_str(&part);
        }
        body
    });
    while tokens.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before = tokens.load(Ordering::SeqCst);
    let long = "apple banana cherry ".repeat(400);
    let b_body = json!({"prompt": long, "max_tokens": 4, "temperature": 0});
    let (st, b) = post("/v1/completions", b_body.clone()).await;
    let during = tokens.load(Ordering::SeqCst) - before;
    assert_eq!(st, 200, "{b}");
    let prompt_tokens = b["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens >= 1024, "prompt of {prompt_tokens} tokens");
    // At least 8 chunks of 128 tokens, each with the running stream's next token; the
    // separate passes gave it about one token per 512-token chunk (4 here).
    assert!(
        during >= 6,
        "the running stream got {during} tokens while {prompt_tokens} prompt tokens were read"
    );
    // The streamed text of A, from its chunks, against A alone; B against B alone.
    let body = reader.await.unwrap();
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let (_, a_alone) = post("/v1/completions", a_body(false)).await;
    assert_eq!(streamed, a_alone["choices"][0]["text"].as_str().unwrap());
    let (_, b_alone) = post("/v1/completions", b_body).await;
    assert_eq!(b["choices"][0]["text"], b_alone["choices"][0]["text"]);
}

#[tokio::test]
async fn models_health_and_metrics() {
    let base = common::server();
    let c = reqwest::Client::new();
    let h: Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
    let m: Value = c
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["object"], "model");
    let _ = post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2})).await;
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "candela_http_requests_total",
        "candela_generated_tokens_total",
        "candela_time_to_first_token_seconds_bucket",
        "candela_model_info",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}

async fn expect_error(
    path: &str,
    body: &str,
    status: u16,
    kind: &str,
    param: Option<&str>,
) -> Value {
    let (st, r) = post_raw(path, body).await;
    assert_eq!(st, status, "{body:.200} -> {r}");
    assert_eq!(r["error"]["type"], kind, "{body:.200} -> {r}");
    assert_eq!(r["error"]["param"].as_str(), param, "{body:.200} -> {r}");
    assert!(r["error"]["message"].as_str().unwrap().len() > 5);
    assert!(r["error"].get("code").is_some());
    r
}

#[tokio::test]
async fn error_paths_are_openai_shaped() {
    let chat = "/v1/chat/completions";
    let comp = "/v1/completions";
    let with =
        |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],{extra}}}"#);
    let many: Vec<Value> = (0..5000)
        .map(|_| json!({"role": "user", "content": "x"}))
        .collect();
    let long = "word ".repeat(3000);
    let huge = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(9 << 20));
    let bad = "invalid_request_error";
    // (path, body, status, param, code if the test pins it)
    type Case<'a> = (&'a str, String, u16, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (chat, "{not json".into(), 400, None, Some("invalid_json")),
        (
            chat,
            with(r#""temperature":"hot""#),
            400,
            Some("temperature"),
            None,
        ),
        (
            chat,
            r#"{"messages":"hello"}"#.into(),
            400,
            Some("messages"),
            None,
        ),
        (
            chat,
            r#"{"messages":[]}"#.into(),
            400,
            Some("messages"),
            None,
        ),
        (chat, "{}".into(), 400, None, None),
        (
            chat,
            r#"{"messages":[{"role":"wizard","content":"x"}]}"#.into(),
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            chat,
            with(r#""model":"gpt-9""#),
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            chat,
            with(r#""max_tokens":-1"#),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat,
            with(r#""max_tokens":0"#),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            chat,
            with(r#""max_tokens":100000000"#),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (chat, with(r#""n":3"#), 400, Some("n"), None),
        (chat, with(r#""top_p":1.5"#), 400, Some("top_p"), None),
        (
            chat,
            with(r#""top_logprobs":3"#),
            400,
            Some("top_logprobs"),
            None,
        ),
        (chat, with(r#""stop":[1,2]"#), 400, Some("stop"), None),
        (
            chat,
            json!({"messages": many}).to_string(),
            400,
            Some("messages"),
            None,
        ),
        (
            comp,
            json!({"prompt": long}).to_string(),
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            comp,
            r#"{"prompt":[1, 4000000]}"#.into(),
            400,
            Some("prompt"),
            None,
        ),
        (comp, r#"{"prompt":""}"#.into(), 400, Some("prompt"), None),
        ("/v1/nope", "{}".into(), 404, None, None),
        (comp, huge, 413, None, Some("invalid_body")),
    ];
    for (path, body, status, param, code) in cases {
        let r = expect_error(path, &body, status, bad, param).await;
        if let Some(code) = code {
            assert_eq!(r["error"]["code"], code, "{path} {body:.200}");
        }
    }
    // The server is still healthy and serving after all of that.
    let (st, _) = post("/v1/completions", json!({"prompt": "ok", "max_tokens": 2})).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn dashboard_page_reads_only_metrics_that_exist() {
    let base = common::server();
    let c = reqwest::Client::new();
    let r = c.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(
        page.contains("fetch(\"/metrics\""),
        "the page must poll /metrics"
    );
    assert!(!page.contains("<script src="), "no external scripts");
    let _ = post("/v1/completions", json!({"prompt": "hi", "max_tokens": 2})).await;
    let metrics = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gpu = metrics.contains("candela_collector_up{source=\"nvml\"} 1");
    let mut names: Vec<&str> = page
        .match_indices("candela_")
        .map(|(i, _)| {
            let rest = &page[i..];
            let end = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        if n.starts_with("candela_gpu_") && !gpu {
            continue; // no GPU here: the page shows n/a
        }
        assert!(
            metrics.contains(n),
            "dashboard reads {n}, which /metrics lacks"
        );
    }
}

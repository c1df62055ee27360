//! `POST /v1/chat/completions` and `POST /v1/completions`: extract → validate → engine →
//! map, streamed as OpenAI SSE chunks or collected into one response.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Engine, FinishReason, GenEvent, GenRequest, LogprobEntry, Usage};

use super::auth::Principal;
use super::error::{parse, ApiError, Json};
use super::types::{
    ChatLogprobs, ChatRequest, CommonParams, CompletionLogprobs, CompletionRequest, Prompt,
    TokenLogprobOut, UsageOut,
};
use super::validate::{self, Checked, MAX_TOP_LOGPROBS};
use super::AppState;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fingerprint() -> String {
    format!("candela-{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// A validated request on its way to the engine.
struct Job {
    kind: Kind,
    /// The engine of the model the request named.
    engine: Engine,
    id: String,
    model: String,
    prompt: Vec<u32>,
    checked: Checked,
    max_tokens: usize,
    want_logprobs: bool,
    session: Option<String>,
}

fn header_session(h: &HeaderMap) -> Option<&str> {
    h.get("x-session-id").and_then(|v| v.to_str().ok())
}

pub async fn chat(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    let common: CommonParams = parse(&body)?;
    let engine = st.models.pick(common.model.as_deref())?.engine.clone();
    let loaded = engine.loaded()?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top = match req.top_logprobs {
        None => 0,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
    };
    if req.top_logprobs.is_some() && !want_logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs requires logprobs: true",
        ));
    }
    let checked = validate::check_common(&common, want_logprobs.then_some(top))?;
    let messages = validate::template_messages(&req.messages)?;
    let text = loaded.template.render(&messages, None, true)?;
    let prompt = loaded.tok.encode(&text, true)?;
    let max_tokens = validate::fit_context(
        prompt.len(),
        checked.max_tokens,
        loaded.info.ctx_size,
        "messages",
    )?;
    let job = Job {
        kind: Kind::Chat,
        engine,
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model: loaded.info.id.clone(),
        prompt,
        checked,
        max_tokens,
        want_logprobs,
        session: validate::session_key(
            common.prompt_cache_key.as_deref(),
            header_session(&headers),
        )?
        .map(|k| who.scope(&k)),
    };
    run(st, &who, job).await
}

pub async fn completions(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    let common: CommonParams = parse(&body)?;
    let engine = st.models.pick(common.model.as_deref())?.engine.clone();
    let loaded = engine.loaded()?;
    let top = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
    };
    let checked = validate::check_common(&common, top)?;
    let prompt = match req.prompt {
        Prompt::Text(t) => loaded.tok.encode(&t, true)?,
        Prompt::Texts(v) if v.len() == 1 => loaded.tok.encode(&v[0], true)?,
        Prompt::Texts(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("only one prompt per request is supported, got {}", v.len()),
            ))
        }
        Prompt::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= loaded.info.vocab_size) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "token id {bad} is out of range (vocabulary has {} ids)",
                        loaded.info.vocab_size
                    ),
                ));
            }
            ids
        }
    };
    let max_tokens = validate::fit_context(
        prompt.len(),
        checked.max_tokens,
        loaded.info.ctx_size,
        "prompt",
    )?;
    let job = Job {
        kind: Kind::Text,
        engine,
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        model: loaded.info.id.clone(),
        prompt,
        checked,
        max_tokens,
        want_logprobs: top.is_some(),
        session: validate::session_key(
            common.prompt_cache_key.as_deref(),
            header_session(&headers),
        )?
        .map(|k| who.scope(&k)),
    };
    run(st, &who, job).await
}

async fn run(st: AppState, who: &Principal, job: Job) -> Result<Response, ApiError> {
    let permit = st.limiter.acquire(who)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let span =
        tracing::info_span!("generate", request_id = %job.id, prompt_tokens = job.prompt.len());
    job.engine.submit(GenRequest {
        prompt: job.prompt.clone(),
        max_tokens: job.max_tokens,
        sampling: job.checked.sampling.clone(),
        stop: job.checked.stop.clone(),
        session: job.session.clone(),
        events: tx,
        span,
        enqueued: Instant::now(),
    })?;
    // Wait for the first event before choosing the response: a refusal (busy session)
    // then gets its own status instead of a 200 stream that fails.
    let mut rx = rx;
    let first = match rx.recv().await {
        Some(GenEvent::Rejected(e)) => return Err(e.into()),
        Some(ev) => ev,
        None => return Err(internal("the engine dropped the request".into())),
    };
    let events = Events {
        peek: Some(first),
        rx,
        _permit: permit,
    };
    if job.checked.stream {
        Ok(stream(job, events).into_response())
    } else {
        collect(job, events).await
    }
}

/// The engine's events, with the first one already taken off the channel.
struct Events {
    peek: Option<GenEvent>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    /// Released when the response (or stream) is dropped.
    _permit: super::limits::Permit,
}

impl Events {
    async fn next(&mut self) -> Option<GenEvent> {
        match self.peek.take() {
            Some(e) => Some(e),
            None => self.rx.recv().await,
        }
    }
}

fn finish_json(f: Option<FinishReason>) -> Value {
    f.map(|f| Value::from(f.as_str())).unwrap_or(Value::Null)
}

async fn collect(job: Job, mut rx: Events) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps: Vec<LogprobEntry> = Vec::new();
    let (finish, usage) = loop {
        match rx.next().await {
            Some(GenEvent::Token { text: t, logprob }) => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Some(GenEvent::Done { finish, usage }) => break (finish, usage),
            Some(GenEvent::Error(e)) => return Err(internal(e)),
            Some(GenEvent::Rejected(e)) => return Err(e.into()),
            None => return Err(internal("the engine dropped the request".into())),
        }
    };
    let body = match job.kind {
        Kind::Chat => json!({
            "id": job.id, "object": "chat.completion", "created": now_secs(), "model": job.model,
            "system_fingerprint": fingerprint(),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": job.want_logprobs.then(|| chat_logprobs(&lps)),
                "finish_reason": finish.as_str(),
            }],
            "usage": UsageOut::from(usage),
        }),
        Kind::Text => json!({
            "id": job.id, "object": "text_completion", "created": now_secs(), "model": job.model,
            "system_fingerprint": fingerprint(),
            "choices": [{
                "index": 0, "text": text,
                "logprobs": job.want_logprobs.then(|| completion_logprobs(&lps, 0)),
                "finish_reason": finish.as_str(),
            }],
            "usage": UsageOut::from(usage),
        }),
    };
    Ok(axum::Json(body).into_response())
}

fn internal(msg: String) -> ApiError {
    ApiError {
        status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        message: msg,
        kind: "server_error",
        param: None,
        code: Some("internal_error"),
    }
}

fn chat_logprobs(lps: &[LogprobEntry]) -> Value {
    serde_json::to_value(ChatLogprobs {
        content: lps.iter().map(TokenLogprobOut::from).collect(),
    })
    .unwrap_or(Value::Null)
}

fn completion_logprobs(lps: &[LogprobEntry], start_offset: usize) -> Value {
    let mut out = CompletionLogprobs::default();
    let mut off = start_offset;
    for e in lps {
        out.tokens.push(e.token.clone());
        out.token_logprobs.push(e.logprob);
        out.top_logprobs
            .push(e.top.iter().map(|(t, l)| (t.clone(), json!(l))).collect());
        out.text_offset.push(off);
        off += e.token.len();
    }
    serde_json::to_value(out).unwrap_or(Value::Null)
}

/// One SSE chunk in the endpoint's format.
fn chunk(
    job: &Job,
    created: u64,
    text: Option<&str>,
    lps: &[LogprobEntry],
    finish: Option<FinishReason>,
    first: bool,
    usage: Option<Value>,
) -> Value {
    let choice = match job.kind {
        Kind::Chat => {
            let delta = match (first, text) {
                (true, _) => json!({"role": "assistant", "content": ""}),
                (false, Some(t)) => json!({"content": t}),
                (false, None) => json!({}),
            };
            json!({
                "index": 0, "delta": delta,
                "logprobs": (job.want_logprobs && !lps.is_empty()).then(|| chat_logprobs(lps)),
                "finish_reason": finish_json(finish),
            })
        }
        Kind::Text => json!({
            "index": 0, "text": text.unwrap_or(""),
            "logprobs": (job.want_logprobs && !lps.is_empty()).then(|| completion_logprobs(lps, 0)),
            "finish_reason": finish_json(finish),
        }),
    };
    let object = if job.kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut v = json!({
        "id": job.id, "object": object, "created": created, "model": job.model,
        "system_fingerprint": fingerprint(), "choices": [choice],
    });
    if job.checked.include_usage {
        v["usage"] = usage.unwrap_or(Value::Null);
    }
    v
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn stream(job: Job, mut rx: Events) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let created = now_secs();
    let s = async_stream::stream! {
        if job.kind == Kind::Chat {
            yield data(&chunk(&job, created, None, &[], None, true, None));
        }
        loop {
            match rx.next().await {
                Some(GenEvent::Token { text, logprob }) => {
                    let lps: Vec<LogprobEntry> = logprob.into_iter().collect();
                    if !text.is_empty() || !lps.is_empty() {
                        yield data(&chunk(&job, created, Some(&text), &lps, None, false, None));
                    }
                }
                Some(GenEvent::Done { finish, usage }) => {
                    yield data(&chunk(&job, created, None, &[], Some(finish), false, None));
                    if job.checked.include_usage {
                        let mut v = chunk(&job, created, None, &[], None, false, Some(usage_json(usage)));
                        v["choices"] = json!([]);
                        yield data(&v);
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    break;
                }
                Some(GenEvent::Error(e)) => {
                    yield data(&json!({"error": {"message": e, "type": "server_error", "param": null, "code": "internal_error"}}));
                    break;
                }
                Some(GenEvent::Rejected(e)) => {
                    yield data(&json!({"error": {"message": e.to_string(), "type": "invalid_request_error", "param": null, "code": "rejected"}}));
                    break;
                }
                None => {
                    yield data(&json!({"error": {"message": "the engine dropped the request", "type": "server_error", "param": null, "code": "internal_error"}}));
                    break;
                }
            }
        }
    };
    Sse::new(s).keep_alive(KeepAlive::default())
}

fn usage_json(u: Usage) -> Value {
    serde_json::to_value(UsageOut::from(u)).unwrap_or(Value::Null)
}

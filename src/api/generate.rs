//! `POST /v1/chat/completions` and `POST /v1/completions`: extract → validate → engine →
//! map, streamed as OpenAI SSE chunks or collected into one response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::decode::grammar::Grammar;
use crate::engine::{Engine, FinishReason, GenEvent, GenRequest, LogprobEntry, Usage};

use super::auth::Principal;
use super::error::{parse, ApiError, Json};
use super::tools::{self, CallParser, Piece, ToolPlan};
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
    grammar: Option<Arc<Grammar>>,
    /// Tools whose calls are parsed out of the output (tool_choice other than none).
    tools: Option<ToolPlan>,
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
    let checked = validate::check_common(
        &common,
        want_logprobs.then_some(top),
        loaded.info.vocab_size,
    )?;
    let plan = tools::plan(&body)?;
    tools::check_messages(&req.messages)?;
    let mut grammar = tools::response_grammar(&body)?;
    if let Some(p) = plan.as_ref().filter(|p| p.active()) {
        if grammar.is_some() {
            return Err(ApiError::invalid(
                "response_format",
                "response_format cannot be combined with tools unless tool_choice is `none`",
            ));
        }
        grammar = p.grammar()?;
    }
    let messages = validate::template_messages(&req.messages)?;
    let (messages, tool_list) =
        tools::prompt_messages(messages, plan.as_ref(), loaded.template.handles_tools());
    let text = loaded
        .template
        .render(&messages, tool_list.as_ref(), true)?;
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
        grammar,
        tools: plan.filter(|p| p.active()),
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
    let checked = validate::check_common(&common, top, loaded.info.vocab_size)?;
    let grammar = tools::response_grammar(&body)?;
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
        grammar,
        tools: None,
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
        grammar: job.grammar.clone(),
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
        Ok(stream(job, events, st.stream_idle_timeout).into_response())
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
    let (message, finish) = match &job.tools {
        None => (
            json!({"role": "assistant", "content": text}),
            finish.as_str(),
        ),
        Some(plan) => {
            let mut p = CallParser::new(plan, &job.id);
            let mut pieces = p.push(&text);
            pieces.extend(p.finish());
            let (content, calls) = tools::assemble(pieces);
            (
                tools::message(content, &calls),
                finish_str(finish, p.calls()),
            )
        }
    };
    let body = match job.kind {
        Kind::Chat => json!({
            "id": job.id, "object": "chat.completion", "created": now_secs(), "model": job.model,
            "system_fingerprint": fingerprint(),
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": job.want_logprobs.then(|| chat_logprobs(&lps)),
                "finish_reason": finish,
            }],
            "usage": UsageOut::from(usage),
        }),
        Kind::Text => json!({
            "id": job.id, "object": "text_completion", "created": now_secs(), "model": job.model,
            "system_fingerprint": fingerprint(),
            "choices": [{
                "index": 0, "text": text,
                "logprobs": job.want_logprobs.then(|| completion_logprobs(&lps, 0)),
                "finish_reason": finish,
            }],
            "usage": UsageOut::from(usage),
        }),
    };
    Ok(axum::Json(body).into_response())
}

/// `tool_calls` when a turn that ended normally produced calls.
fn finish_str(f: FinishReason, calls: usize) -> &'static str {
    if f == FinishReason::Stop && calls > 0 {
        "tool_calls"
    } else {
        f.as_str()
    }
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
#[allow(clippy::too_many_arguments)]
fn chunk(
    job: &Job,
    created: u64,
    text: Option<&str>,
    lps: &[LogprobEntry],
    finish: Option<Value>,
    first: bool,
    usage: Option<Value>,
    delta: Option<Value>,
) -> Value {
    let finish = finish.unwrap_or(Value::Null);
    let choice = match job.kind {
        Kind::Chat => {
            let delta = match (first, text, delta) {
                (true, _, _) => json!({"role": "assistant", "content": ""}),
                (false, _, Some(d)) => d,
                (false, Some(t), None) => json!({"content": t}),
                (false, None, None) => json!({}),
            };
            json!({
                "index": 0, "delta": delta,
                "logprobs": (job.want_logprobs && !lps.is_empty()).then(|| chat_logprobs(lps)),
                "finish_reason": finish,
            })
        }
        Kind::Text => json!({
            "index": 0, "text": text.unwrap_or(""),
            "logprobs": (job.want_logprobs && !lps.is_empty()).then(|| completion_logprobs(lps, 0)),
            "finish_reason": finish,
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

/// Events buffered between the generation and a slow client before back-pressure.
const STREAM_BUFFER: usize = 64;

fn stream(
    job: Job,
    rx: Events,
    idle: Option<Duration>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let (tx, out) = mpsc::channel(STREAM_BUFFER);
    let id = job.id.clone();
    tokio::spawn(async move {
        if forward(sse_events(job, rx), tx, idle).await == Forwarded::IdleTimeout {
            tracing::warn!(request_id = %id, "stream left unread past the idle timeout; generation cancelled");
            crate::metrics::stream_idle_timeout();
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}

#[derive(Debug, PartialEq)]
enum Forwarded {
    /// The source ended.
    Done,
    /// The client went away (its receiver was dropped).
    Gone,
    /// The client kept the connection but read nothing for `idle`.
    IdleTimeout,
}

/// Move `src` into `tx` until it ends, the receiver is dropped, or one event waits
/// longer than `idle` for room. Dropping `src` on return cancels the generation
/// behind it (the engine sees its channel closed at the next step).
async fn forward<S, T>(src: S, tx: mpsc::Sender<T>, idle: Option<Duration>) -> Forwarded
where
    S: futures::Stream<Item = T>,
{
    use futures::StreamExt;
    let mut src = std::pin::pin!(src);
    while let Some(item) = src.next().await {
        let sent = match idle {
            Some(d) => tx.send_timeout(item, d).await.map_err(|e| match e {
                mpsc::error::SendTimeoutError::Timeout(_) => Forwarded::IdleTimeout,
                mpsc::error::SendTimeoutError::Closed(_) => Forwarded::Gone,
            }),
            None => tx.send(item).await.map_err(|_| Forwarded::Gone),
        };
        if let Err(why) = sent {
            return why;
        }
    }
    Forwarded::Done
}

/// Stream deltas for parsed pieces (a call's first delta names it; later ones carry
/// pieces of its arguments as they were generated).
fn piece_deltas(pieces: Vec<Piece>) -> Vec<Value> {
    pieces
        .iter()
        .filter(|p| !matches!(p, Piece::Content(t) | Piece::Args { text: t, .. } if t.is_empty()))
        .map(Piece::delta)
        .collect()
}

fn sse_events(job: Job, mut rx: Events) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let created = now_secs();
    let mut parser = job.tools.as_ref().map(|p| CallParser::new(p, &job.id));
    async_stream::stream! {
        if job.kind == Kind::Chat {
            yield data(&chunk(&job, created, None, &[], None, true, None, None));
        }
        loop {
            match rx.next().await {
                Some(GenEvent::Token { text, logprob }) => {
                    let lps: Vec<LogprobEntry> = logprob.into_iter().collect();
                    match parser.as_mut() {
                        None => {
                            if !text.is_empty() || !lps.is_empty() {
                                yield data(&chunk(&job, created, Some(&text), &lps, None, false, None, None));
                            }
                        }
                        Some(p) => {
                            let deltas = piece_deltas(p.push(&text));
                            if deltas.is_empty() && !lps.is_empty() {
                                yield data(&chunk(&job, created, None, &lps, None, false, None, Some(json!({}))));
                            }
                            for (i, d) in deltas.into_iter().enumerate() {
                                let l: &[LogprobEntry] = if i == 0 { &lps } else { &[] };
                                yield data(&chunk(&job, created, None, l, None, false, None, Some(d)));
                            }
                        }
                    }
                }
                Some(GenEvent::Done { finish, usage }) => {
                    let mut reason = finish.as_str();
                    if let Some(p) = parser.as_mut() {
                        for d in piece_deltas(p.finish()) {
                            yield data(&chunk(&job, created, None, &[], None, false, None, Some(d)));
                        }
                        reason = finish_str(finish, p.calls());
                    }
                    yield data(&chunk(&job, created, None, &[], Some(json!(reason)), false, None, None));
                    if job.checked.include_usage {
                        let mut v = chunk(&job, created, None, &[], None, false, Some(usage_json(usage)), None);
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
    }
}

fn usage_json(u: Usage) -> Value {
    serde_json::to_value(UsageOut::from(u)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// An endless source that records when it is dropped.
    fn endless(dropped: Arc<AtomicBool>) -> impl futures::Stream<Item = u32> {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped);
        async_stream::stream! {
            let _flag = flag;
            let mut i = 0u32;
            loop {
                i += 1;
                yield i;
            }
        }
    }

    #[tokio::test]
    async fn unread_stream_is_cut_after_idle_and_source_dropped() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, _rx_kept_but_unread) = mpsc::channel(4);
        let t0 = Instant::now();
        let why = forward(
            endless(dropped.clone()),
            tx,
            Some(Duration::from_millis(100)),
        )
        .await;
        assert_eq!(why, Forwarded::IdleTimeout);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(dropped.load(Ordering::SeqCst), "generation not released");
    }

    #[tokio::test]
    async fn gone_client_stops_forwarding_and_reader_gets_everything_else() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let why = forward(endless(dropped.clone()), tx, Some(Duration::from_secs(60))).await;
        assert_eq!(why, Forwarded::Gone);
        assert!(dropped.load(Ordering::SeqCst));

        let (tx, mut rx) = mpsc::channel(1);
        let src = futures::stream::iter(0..100u32);
        let fwd = tokio::spawn(forward(src, tx, Some(Duration::from_secs(5))));
        let mut got = Vec::new();
        while let Some(x) = rx.recv().await {
            tokio::time::sleep(Duration::from_millis(1)).await;
            got.push(x);
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(fwd.await.unwrap(), Forwarded::Done);
    }
}

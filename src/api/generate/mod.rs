//! `POST /v1/chat/completions` and `POST /v1/completions`: extract → validate (the costly
//! part on the blocking pool) → engine → map, collected into one response here or
//! streamed as OpenAI SSE chunks by [`stream`]. Every way a generation can fail becomes
//! one [`ApiError`] in [`Events::next`]: the response status and body before the first
//! byte, the same body as the stream's last event after it.

mod stream;

pub(super) use stream::sse_response;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::engine::decode::grammar::Grammar;
use crate::engine::{self, Engine, GenEvent, GenRequest, LogprobEntry, Usage};

use super::auth::Principal;
use super::error::{parse, ApiError, Json};
use super::models::Models;
use super::tools::{self, CallParser, ToolPlan};
use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, ChatRequest, CommonParams,
    CompletionLogprobs, CompletionRequest, FinishReason, Prompt, TextChoice, TextCompletion,
    UsageOut,
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

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Chat,
    Text,
}

/// A validated request on its way to the engine. Other protocols (Anthropic messages,
/// responses) build theirs with [`chat_job`] from a chat body, may adjust its session,
/// and map the [`Events`] themselves.
pub(super) struct Job {
    /// The engine of the model the request named.
    pub(super) engine: Engine,
    pub(super) prompt: Vec<u32>,
    checked: Checked,
    max_tokens: usize,
    /// The internal (scoped) session id.
    pub(super) session: Option<String>,
    grammar: Option<Arc<Grammar>>,
    pub(super) reply: Reply,
}

/// What shapes the response: everything the mapping needs, nothing of the engine.
pub(super) struct Reply {
    kind: Kind,
    /// The response's id (also the tracing span's `request_id`).
    pub(super) id: String,
    pub(super) model: String,
    want_logprobs: bool,
    pub(super) stream: bool,
    include_usage: bool,
    /// Tools whose calls are parsed out of the output (tool_choice other than none).
    pub(super) tools: Option<ToolPlan>,
}

/// Session headers clients send, in order of precedence: candela's own, then Codex's
/// (`session_id`, and `conversation_id` from its older releases).
const SESSION_HEADERS: &[&str] = &["x-session-id", "session_id", "conversation_id"];

pub(super) fn header_session(h: &HeaderMap) -> Option<String> {
    SESSION_HEADERS
        .iter()
        .find_map(|name| h.get(*name).and_then(|v| v.to_str().ok()))
        .map(str::to_string)
}

pub async fn chat(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    serve(st, who, &headers, body, chat_job).await
}

pub async fn completions(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    serve(st, who, &headers, body, text_job).await
}

/// Build the job off the async executor with `build` (validation, template, tokenizer,
/// grammar), then run it.
async fn serve(
    st: AppState,
    who: Principal,
    headers: &HeaderMap,
    body: Value,
    build: fn(&Models, &Principal, Option<&str>, &Value) -> Result<Job, ApiError>,
) -> Result<Response, ApiError> {
    let header = header_session(headers);
    let (models, scope) = (st.models.clone(), who.clone());
    let job =
        validate::off_executor(move || build(&models, &scope, header.as_deref(), &body)).await?;
    run(st, &who, job).await
}

/// Check a chat request, render its messages and tokenize them (blocking).
pub(super) fn chat_job(
    models: &Models,
    who: &Principal,
    header_session: Option<&str>,
    body: &Value,
) -> Result<Job, ApiError> {
    let req: ChatRequest = parse(body)?;
    let common: CommonParams = parse(body)?;
    let engine = models.pick(common.model.as_deref())?.engine.clone();
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
    let ChatPrompt {
        prompt,
        plan,
        grammar,
    } = chat_prompt(&loaded, &req, body)?;
    let max_tokens = validate::fit_context(
        prompt.len(),
        checked.max_tokens,
        loaded.info.ctx_size,
        "messages",
    )?;
    let session = validate::session_key(common.prompt_cache_key.as_deref(), header_session)?
        .map(|k| who.scope(&k));
    let reply = Reply {
        kind: Kind::Chat,
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        model: loaded.info.id.clone(),
        want_logprobs,
        stream: checked.stream,
        include_usage: checked.include_usage,
        tools: plan.filter(|p| p.active()),
    };
    Ok(Job {
        engine,
        prompt,
        checked,
        max_tokens,
        session,
        grammar,
        reply,
    })
}

/// A chat body's prompt, as the model reads it, with its tools and output grammar.
pub(super) struct ChatPrompt {
    pub(super) prompt: Vec<u32>,
    pub(super) plan: Option<ToolPlan>,
    pub(super) grammar: Option<Arc<Grammar>>,
}

/// Check the messages, tools and `response_format` of a chat body, render the messages
/// through the model's template and tokenize them (blocking).
pub(super) fn chat_prompt(
    loaded: &engine::Loaded,
    req: &ChatRequest,
    body: &Value,
) -> Result<ChatPrompt, ApiError> {
    let plan = tools::plan(body)?;
    tools::check_messages(&req.messages)?;
    let mut grammar = tools::response_grammar(body)?;
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
    Ok(ChatPrompt {
        prompt,
        plan,
        grammar,
    })
}

/// Check a text completion request and tokenize its prompt (blocking).
fn text_job(
    models: &Models,
    who: &Principal,
    header_session: Option<&str>,
    body: &Value,
) -> Result<Job, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let common: CommonParams = parse(body)?;
    let engine = models.pick(common.model.as_deref())?.engine.clone();
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
    let grammar = tools::response_grammar(body)?;
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
    let session = validate::session_key(common.prompt_cache_key.as_deref(), header_session)?
        .map(|k| who.scope(&k));
    let reply = Reply {
        kind: Kind::Text,
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        model: loaded.info.id.clone(),
        want_logprobs: top.is_some(),
        stream: checked.stream,
        include_usage: checked.include_usage,
        tools: None,
    };
    Ok(Job {
        engine,
        prompt,
        checked,
        max_tokens,
        session,
        grammar,
        reply,
    })
}

async fn run(st: AppState, who: &Principal, job: Job) -> Result<Response, ApiError> {
    let (reply, events) = start(&st, who, job).await?;
    if reply.stream {
        Ok(stream::sse(reply, events, st.stream_idle_timeout).into_response())
    } else {
        collect(reply, events).await
    }
}

/// Admit `job` (per-key limit), hand it to its engine and wait for the first event, so a
/// refusal (busy session) gets its own status instead of a 200 stream that fails.
pub(super) async fn start(
    st: &AppState,
    who: &Principal,
    job: Job,
) -> Result<(Reply, Events), ApiError> {
    let permit = st.limiter.acquire(who)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let Job {
        engine,
        prompt,
        checked,
        max_tokens,
        session,
        grammar,
        reply,
    } = job;
    let span =
        tracing::info_span!("generate", request_id = %reply.id, prompt_tokens = prompt.len());
    engine.submit(GenRequest {
        prompt,
        max_tokens,
        sampling: checked.sampling,
        stop: checked.stop,
        grammar,
        session,
        events: tx,
        span,
        enqueued: Instant::now(),
    })?;
    let first = match rx.recv().await {
        Some(GenEvent::Rejected(e)) => return Err(e.into()),
        None => return Err(engine_dropped()),
        Some(ev) => ev,
    };
    let events = Events {
        peek: Some(first),
        rx,
        _permit: permit,
    };
    Ok((reply, events))
}

/// The error of a generation whose engine let go of it without a word.
fn engine_dropped() -> ApiError {
    ApiError::internal("the engine dropped the request")
}

/// What a generation has to say next.
pub(super) enum Step {
    Token {
        text: String,
        logprob: Option<LogprobEntry>,
    },
    Done {
        finish: engine::FinishReason,
        usage: Usage,
        /// The stop string that ended it, if one did.
        stop_sequence: Option<String>,
    },
    /// It ended without finishing.
    Failed(ApiError),
}

/// The engine's events, with the first one already taken off the channel.
pub(super) struct Events {
    peek: Option<GenEvent>,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    /// Released when the response (or stream) is dropped.
    _permit: super::limits::Permit,
}

impl Events {
    pub(super) async fn next(&mut self) -> Step {
        let event = match self.peek.take() {
            Some(e) => Some(e),
            None => self.rx.recv().await,
        };
        match event {
            Some(GenEvent::Token { text, logprob }) => Step::Token { text, logprob },
            Some(GenEvent::Done {
                finish,
                usage,
                stop_sequence,
            }) => Step::Done {
                finish,
                usage,
                stop_sequence,
            },
            Some(GenEvent::Error(message)) => Step::Failed(ApiError::internal(message)),
            Some(GenEvent::Rejected(e)) => Step::Failed(e.into()),
            None => Step::Failed(engine_dropped()),
        }
    }
}

#[cfg(test)]
impl Events {
    /// `sent` as the engine's events, the channel closed after them.
    pub(super) fn from_sent(sent: Vec<GenEvent>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in sent {
            let _ = tx.send(e);
        }
        Self {
            peek: None,
            rx,
            _permit: super::limits::Limiter::new(0)
                .acquire(&Principal::default())
                .expect("no limit"),
        }
    }
}

async fn collect(reply: Reply, mut events: Events) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps: Vec<LogprobEntry> = Vec::new();
    let (finish, usage) = loop {
        match events.next().await {
            Step::Token { text: t, logprob } => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Step::Done { finish, usage, .. } => break (finish, usage),
            Step::Failed(e) => return Err(e),
        }
    };
    let (created, usage) = (now_secs(), UsageOut::from(usage));
    if reply.kind == Kind::Text {
        return Ok(axum::Json(TextCompletion {
            id: reply.id,
            object: "text_completion",
            created,
            model: reply.model,
            system_fingerprint: fingerprint(),
            choices: vec![TextChoice {
                index: 0,
                text,
                logprobs: reply.want_logprobs.then(|| CompletionLogprobs::of(&lps)),
                finish_reason: FinishReason::of(finish, 0),
            }],
            usage,
        })
        .into_response());
    }
    let (message, calls) = match &reply.tools {
        None => (AssistantMessage::text(text), 0),
        Some(plan) => {
            let mut p = CallParser::new(plan, &reply.id);
            let mut pieces = p.push(&text);
            pieces.extend(p.finish());
            let (content, calls) = tools::assemble(pieces);
            (tools::message(content, calls), p.calls())
        }
    };
    Ok(axum::Json(ChatCompletion {
        id: reply.id,
        object: "chat.completion",
        created,
        model: reply.model,
        system_fingerprint: fingerprint(),
        choices: vec![ChatChoice {
            index: 0,
            message,
            logprobs: reply.want_logprobs.then(|| ChatLogprobs::of(&lps)),
            finish_reason: FinishReason::of(finish, calls),
        }],
        usage,
    })
    .into_response())
}

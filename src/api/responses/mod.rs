//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`. A request becomes the chat pipeline's request ([`convert`]),
//! runs through the same validation, template, grammar and engine
//! (`generate::chat_job`, `generate::start`), and its events become `output` items
//! ([`output`]), whole or streamed ([`stream`]).
//!
//! A chain of responses is a session: a fresh conversation runs in the client's
//! session (`prompt_cache_key`, `X-Session-Id`, Codex's `session_id`) or, when stored,
//! in a new session named after its first response; a turn given
//! `previous_response_id` runs in that response's session with the stored
//! conversation in front of its input, so the cached prefix covers all of it. Stored
//! responses are notes on their session ([`record`]): scoped by API key, spilled and
//! restored with it, gone when it goes.

mod convert;
mod output;
mod record;
mod stream;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::engine::{self, Engine, Usage};

use super::auth::Principal;
use super::error::{parse, ApiError, Json};
use super::generate::{self, Events, Step};
use super::tools::ToolPlan;
use super::validate;
use super::AppState;
use output::Output;
use record::Record;
use types::{CreateRequest, IncompleteDetails, ResponseDeleted, ResponseObject, ResponseUsage};

/// Longest response id looked up (ours are 37 characters).
const MAX_ID_LEN: usize = 128;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One turn: what the response echoes of its request, and where it is stored.
struct Turn {
    id: String,
    created_at: u64,
    model: String,
    req: CreateRequest,
    metadata: Value,
    store: bool,
    /// The engine and internal session the turn runs in (None: anonymous).
    engine: Engine,
    session: Option<String>,
    /// This turn's own input messages (kept in the record).
    input: Vec<Value>,
    tools: Option<ToolPlan>,
}

impl Turn {
    /// The response object in `status` with `output` and `usage`.
    fn object(
        &self,
        status: &'static str,
        output: Vec<types::OutputItem>,
        usage: Option<Usage>,
    ) -> ResponseObject {
        let r = &self.req;
        ResponseObject {
            id: self.id.clone(),
            object: "response",
            created_at: self.created_at,
            status,
            error: None,
            incomplete_details: (status == "incomplete").then_some(IncompleteDetails {
                reason: "max_output_tokens",
            }),
            instructions: r.instructions.clone(),
            max_output_tokens: r.max_output_tokens,
            model: self.model.clone(),
            output,
            parallel_tool_calls: r.parallel_tool_calls.unwrap_or(true),
            previous_response_id: r.previous_response_id.clone(),
            temperature: r.temperature,
            top_p: r.top_p,
            tool_choice: r
                .tool_choice
                .clone()
                .filter(|c| !c.is_null())
                .unwrap_or_else(|| json!("auto")),
            tools: r
                .tools
                .as_ref()
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            text: match r.text.as_ref().and_then(|t| t.get("format")) {
                Some(f) if !f.is_null() => json!({"format": f}),
                _ => json!({"format": {"type": "text"}}),
            },
            truncation: "disabled",
            store: self.store,
            metadata: self.metadata.clone(),
            usage: usage.map(ResponseUsage::from),
        }
    }

    /// The finished response; stored (when asked) before anyone can see it, so a
    /// client may chain onto it the moment it has the id.
    async fn finish(
        &self,
        out: &Output,
        finish: engine::FinishReason,
        usage: Usage,
    ) -> ResponseObject {
        let status = match finish {
            engine::FinishReason::Length => "incomplete",
            engine::FinishReason::Stop => "completed",
        };
        let resp = self.object(status, out.items().to_vec(), Some(usage));
        if let (true, Some(session)) = (self.store, &self.session) {
            let items = serde_json::to_value(out.items())
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            match convert::items_to_messages(&items, "output") {
                Ok(said) => {
                    let record = Record {
                        parent: self.req.previous_response_id.clone(),
                        messages: self.input.iter().cloned().chain(said).collect(),
                        response: serde_json::to_value(&resp).ok(),
                    };
                    record::store(&self.engine, session, &self.id, &record).await;
                }
                Err(e) => tracing::warn!(response = %self.id, "response not stored: {}", e.message),
            }
        }
        resp
    }
}

/// `POST /v1/responses`.
pub async fn create(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    let req: CreateRequest = parse(&body)?;
    let uid = uuid::Uuid::new_v4().simple().to_string();
    let id = format!("resp_{uid}");
    let store = req.store.unwrap_or(true);
    let metadata = convert::check_metadata(req.metadata.as_ref())?;
    let engine = st.models.pick(req.model.as_deref())?.engine.clone();
    let (earlier, session) = match req.previous_response_id.as_deref() {
        Some(prev) => {
            if prev.len() > MAX_ID_LEN {
                return Err(ApiError::invalid(
                    "previous_response_id",
                    format!("previous_response_id must be at most {MAX_ID_LEN} characters"),
                ));
            }
            let found =
                record::find([engine.clone()], &who, prev, Some("previous_response_id")).await?;
            (record::chain(&found.notes, prev)?, Some(found.session))
        }
        None => {
            let header = generate::header_session(&headers);
            let client = validate::session_key(req.prompt_cache_key.as_deref(), header.as_deref())?;
            let session = match client {
                Some(k) => Some(who.scope(&k)),
                None => match continued(&engine, &who, &req).await? {
                    Some(s) => Some(s),
                    None => store.then(|| who.scope(&id)),
                },
            };
            (Vec::new(), session)
        }
    };
    let input = convert::input_messages(&req)?;
    if earlier.is_empty() && input.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "input must be a non-empty string or list of items",
        ));
    }
    let mut messages = Vec::with_capacity(earlier.len() + input.len() + 1);
    if let Some(sys) = req.instructions.as_deref() {
        messages.push(json!({"role": "system", "content": sys}));
    }
    messages.extend(earlier);
    messages.extend(input.iter().cloned());
    let chat = convert::chat_body(&req, messages)?;
    let (models, scope) = (st.models.clone(), who.clone());
    let mut job = validate::off_executor(move || {
        generate::chat_job(&models, &scope, None, &chat).map_err(convert::rename_error)
    })
    .await?;
    job.session = session.clone();
    job.reply.id = id.clone();
    let chained = req.previous_response_id.is_some();
    let (reply, events) = generate::start(&st, &who, job).await.map_err(|mut e| {
        if chained && e.code == Some("session_busy") {
            e.param = Some("previous_response_id".into());
        }
        e
    })?;
    let turn = Turn {
        id,
        created_at: now_secs(),
        model: reply.model.clone(),
        req,
        metadata,
        store,
        engine,
        session,
        input,
        tools: reply.tools.clone(),
    };
    if turn.req.stream.unwrap_or(false) {
        Ok(stream::sse(turn, uid, events, st.stream_idle_timeout).into_response())
    } else {
        collect(turn, &uid, events).await
    }
}

/// The session of a conversation sent whole again: the newest output item in `input`
/// that one of the caller's stored responses made names it (Agents SDK style, no
/// `previous_response_id` and no session key).
async fn continued(
    engine: &Engine,
    who: &Principal,
    req: &CreateRequest,
) -> Result<Option<String>, ApiError> {
    let Some(types::Input::Items(items)) = &req.input else {
        return Ok(None);
    };
    let newest = items.iter().rev().find_map(|i| {
        i.get("id")
            .and_then(Value::as_str)
            .and_then(output::response_of_item)
    });
    let Some(resp) = newest else {
        return Ok(None);
    };
    match engine.find_note(&resp).await? {
        Some((session, _)) if who.unscope(&session).is_some() => Ok(Some(session)),
        _ => Ok(None),
    }
}

async fn collect(turn: Turn, uid: &str, mut events: Events) -> Result<Response, ApiError> {
    let mut out = Output::new(turn.tools.as_ref(), uid);
    let (finish, usage) = loop {
        match events.next().await {
            Step::Token { text, .. } => {
                out.text(&text);
            }
            Step::Done { finish, usage, .. } => break (finish, usage),
            Step::Failed(e) => return Err(e),
        }
    };
    out.finish(finish == engine::FinishReason::Length);
    Ok(axum::Json(turn.finish(&out, finish, usage).await).into_response())
}

/// `GET /v1/responses/{id}`.
pub async fn get(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let engines: Vec<Engine> = st.models.all().iter().map(|s| s.engine.clone()).collect();
    let found = record::find(engines, &who, &id, None).await?;
    Ok(axum::Json(found.record.response).into_response())
}

/// `DELETE /v1/responses/{id}`: the response goes; the responses that continued it
/// keep their conversation.
pub async fn delete(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let engines: Vec<Engine> = st.models.all().iter().map(|s| s.engine.clone()).collect();
    let mut found = record::find(engines, &who, &id, None).await?;
    found.record.response = None;
    if !record::store(&found.engine, &found.session, &id, &found.record).await {
        return Err(ApiError::not_found(format!(
            "No response found with id '{id}'."
        )));
    }
    Ok(axum::Json(ResponseDeleted {
        id,
        object: "response",
        deleted: true,
    })
    .into_response())
}

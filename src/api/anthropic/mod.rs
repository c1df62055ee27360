//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//! A request is converted into a chat completions body ([`convert`]) and goes through
//! the chat pipeline unchanged (validation, template, tools and their grammar, engine,
//! session cache); only the way in and the way out are Anthropic's: the session a
//! request continues ([`session`]), the `message` or its event stream ([`turn`],
//! [`stream`]), and errors in Anthropic's shape ([`AnthropicError`]). Depends on
//! `generate` and `tools`; nothing depends on it but the router and the error mapping.

mod convert;
mod session;
mod stream;
mod turn;
pub mod types;

use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::auth::Principal;
use super::error::{parse, AnthropicError, AnthropicJson, ApiError};
use super::generate::{self, chat_job, chat_prompt};
use super::types::ChatRequest;
use super::validate;
use super::AppState;
use turn::Turn;
use types::CountTokensResponse;

/// The chat pipeline's names for fields that an Anthropic request calls otherwise.
fn anthropic_names(mut e: ApiError) -> ApiError {
    let rename = |s: &str| {
        s.replace(".function.parameters", ".input_schema")
            .replace(".function.name", ".name")
    };
    e.message = rename(&e.message);
    e.param = e.param.map(|p| match p.as_str() {
        "stop" => "stop_sequences".to_string(),
        _ => rename(&p),
    });
    e
}

pub async fn messages(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    AnthropicJson(body): AnthropicJson<Value>,
) -> Result<Response, AnthropicError> {
    let session = session::key(&headers, &body)?;
    let has_session = session.is_some();
    let (models, scope) = (st.models.clone(), who.clone());
    let mut job = validate::off_executor(move || {
        let chat = convert::to_chat(&body, session.as_deref(), false)?;
        chat_job(&models, &scope, None, &chat).map_err(anthropic_names)
    })
    .await?;
    let uuid = uuid::Uuid::new_v4().simple().to_string();
    job.reply.id = format!("msg_{uuid}");
    let prompt_tokens = job.prompt.len();
    let (reply, events) = generate::start(&st, &who, job).await?;
    let turn = Turn::new(
        reply.id,
        reply.model,
        reply.tools,
        &uuid,
        prompt_tokens,
        has_session,
    );
    if reply.stream {
        Ok(stream::sse(turn, events, st.stream_idle_timeout).into_response())
    } else {
        Ok(axum::Json(turn.collect(events).await?).into_response())
    }
}

pub async fn count_tokens(
    State(st): State<AppState>,
    AnthropicJson(body): AnthropicJson<Value>,
) -> Result<axum::Json<CountTokensResponse>, AnthropicError> {
    let models = st.models.clone();
    let input_tokens = validate::off_executor(move || {
        let chat = convert::to_chat(&body, None, true)?;
        let req: ChatRequest = parse(&chat)?;
        let model = chat.get("model").and_then(Value::as_str);
        let loaded = models.pick(model)?.engine.loaded()?;
        chat_prompt(&loaded, &req, &chat)
            .map(|p| p.prompt.len())
            .map_err(anthropic_names)
    })
    .await?;
    Ok(axum::Json(CountTokensResponse { input_tokens }))
}

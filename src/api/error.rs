//! The one place where errors become HTTP: status + OpenAI error JSON
//! `{"error":{"message","type","param","code"}}` ([`ErrorBody`]), as a response or, once
//! a stream has begun, as its last SSE event — the same body either way. The Anthropic
//! routes speak Anthropic's shape instead, `{"type":"error","error":{"type","message"}}`
//! ([`Shape`], [`AnthropicError`]), from the same [`ApiError`]. Also the JSON extractors
//! that make malformed bodies come back in the route's shape, naming the offending field.

use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::engine::EngineError;

use super::anthropic::types::{AnthropicErrorBody, AnthropicErrorDetail};
use super::types::{ErrorBody, ErrorDetail};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` naming a parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 500 `server_error` / `internal_error`: the engine failed in a way the client
    /// cannot fix.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message.into(),
        )
    }

    fn server(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            param: None,
            code: Some(code),
        }
    }

    /// The JSON body, as a response and as an SSE error event carry it.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }

    /// The event that ends a stream which fails after its first byte (when the status
    /// can no longer change): `data: {"error": {...}}`, the body this error has as a
    /// response.
    pub fn sse_event(&self) -> Event {
        sse_json(&self.body())
    }
}

/// An SSE event whose data is `v` as JSON.
pub fn sse_json<T: serde::Serialize>(v: &T) -> Event {
    sse_json_in(Event::default(), v)
}

/// An SSE event named `name` (its `event:` line first, as Anthropic writes them) whose
/// data is `v` as JSON.
pub fn sse_named<T: serde::Serialize>(name: &'static str, v: &T) -> Event {
    sse_json_in(Event::default().event(name), v)
}

fn sse_json_in<T: serde::Serialize>(event: Event, v: &T) -> Event {
    match serde_json::to_string(v) {
        Ok(text) => event.data(text),
        // Not reached with the API's types (no maps with non-string keys); the
        // client still gets an error in the usual shape rather than a gap.
        Err(e) => {
            tracing::error!("could not encode an SSE event: {e}");
            event.data(
                r#"{"error":{"message":"could not encode an event","type":"server_error","param":null,"code":"internal_error"}}"#,
            )
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::QueueFull(_) => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "queue_full",
                msg,
            ),
            EngineError::Loading => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "model_loading",
                msg,
            ),
            EngineError::Unavailable(_) => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "engine_unavailable",
                msg,
            ),
            EngineError::Session(crate::kv::store::KvError::Busy(_)) => Self {
                status: StatusCode::CONFLICT,
                message: msg,
                kind: "invalid_request_error",
                param: Some("prompt_cache_key".into()),
                code: Some("session_busy"),
            },
            EngineError::Session(crate::kv::store::KvError::NotFound(_)) => Self::not_found(msg),
            EngineError::Session(crate::kv::store::KvError::DeviceFull(..)) => Self::server(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "device_memory_full",
                msg,
            ),
            EngineError::Template(_) => {
                Self::invalid("messages", msg).with_code("invalid_messages")
            }
            EngineError::Tokenizer(_) => Self::invalid("", msg),
            EngineError::Load(_)
            | EngineError::Fetch(_)
            | EngineError::Model(_)
            | EngineError::Constraint(_) => Self::internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let resp = (self.status, axum::Json(self.body())).into_response();
        self.with_retry_after(resp)
    }
}

impl ApiError {
    /// A transient refusal tells the client when to come back.
    fn with_retry_after(&self, mut resp: Response) -> Response {
        if matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS | StatusCode::CONFLICT
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }

    /// Anthropic's `error.type`, by status. A busy session (409) is the client's to
    /// sort out (`invalid_request_error`); a full queue or a loading model keeps its
    /// 503 but is `overloaded_error`, Anthropic's word for it.
    pub fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The body in Anthropic's shape.
    pub fn anthropic_body(&self) -> AnthropicErrorBody {
        AnthropicErrorBody {
            kind: "error",
            error: AnthropicErrorDetail {
                kind: self.anthropic_type(),
                message: self.message.clone(),
            },
        }
    }

    /// The event that ends an Anthropic stream failing after its first byte:
    /// `event: error` with the body the error has as a response.
    pub fn anthropic_sse_event(&self) -> Event {
        sse_named("error", &self.anthropic_body())
    }

    /// The response in the shape the route speaks.
    pub fn into_shaped(self, shape: Shape) -> Response {
        match shape {
            Shape::OpenAi => self.into_response(),
            Shape::Anthropic => AnthropicError(self).into_response(),
        }
    }
}

/// Which error body a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    Anthropic,
}

impl Shape {
    /// Anthropic's under `/v1/messages`, OpenAI's everywhere else.
    pub fn of_path(path: &str) -> Self {
        let messages = super::routes::MESSAGES;
        let under = path
            .strip_prefix(messages)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if under {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }
}

/// An [`ApiError`] answered in Anthropic's shape (the Anthropic handlers' error type).
#[derive(Debug, Clone)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<EngineError> for AnthropicError {
    fn from(e: EngineError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let resp = (self.0.status, axum::Json(self.0.anthropic_body())).into_response();
        self.0.with_retry_after(resp)
    }
}

/// JSON body extractor whose rejections are OpenAI errors naming the bad field.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = json_body(req, state).await?;
        parse(&value).map(Json)
    }
}

/// [`Json`] for the Anthropic routes: the same checks, rejections in Anthropic's shape.
pub struct AnthropicJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AnthropicJson<T> {
    type Rejection = AnthropicError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = json_body(req, state).await?;
        Ok(AnthropicJson(parse(&value)?))
    }
}

/// The request body as JSON, or the error saying why it is not.
async fn json_body<S: Send + Sync>(req: Request, state: &S) -> Result<serde_json::Value, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    let bytes = axum::body::Bytes::from_request(req, state)
        .await
        .map_err(|e| ApiError {
            status: e.status(),
            message: format!("could not read the request body: {}", e.body_text()),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_body"),
        })?;
    if !is_json && bytes.is_empty() {
        return Err(ApiError::invalid(
            "",
            "expected a JSON body (Content-Type: application/json)",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid("", format!("malformed JSON body: {e}")).with_code("invalid_json")
    })
}

/// Deserialize `T` from a parsed body, naming the offending field in the error.
pub fn parse<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." { String::new() } else { path };
        let msg = if param.is_empty() {
            format!("invalid request body: {inner}")
        } else {
            format!("invalid value for `{param}`: {inner}")
        };
        ApiError::invalid(&param, msg).with_code("invalid_type")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::store::KvError;

    #[test]
    fn a_session_that_cannot_come_back_to_the_gpu_is_a_503_to_retry() {
        let e = ApiError::from(EngineError::Session(KvError::DeviceFull(
            "agent-1".into(),
            "out of memory".into(),
        )));
        let body = serde_json::to_value(e.body()).unwrap_or_default();
        assert_eq!(body["error"]["code"], "device_memory_full", "{body}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("agent-1") && msg.contains("host RAM"), "{msg}");
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}

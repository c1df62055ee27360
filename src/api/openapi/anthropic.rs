//! The Anthropic Messages routes in the document: their bodies, the `message`, the
//! stream's events and Anthropic's error shape (`api::anthropic::types`).

use serde::Serialize;
use utoipa::ToSchema;

use super::super::anthropic::types::{
    AnthropicErrorBody, CountTokensBody, CountTokensResponse, MessageResponse, MessagesBody,
};

/// One server-sent event of a streamed message: `event` is the type of the JSON in
/// `data` (`message_start`, `content_block_start`, `content_block_delta`,
/// `content_block_stop`, `message_delta`, `message_stop`, or `error` with an
/// `AnthropicErrorBody` that ends a stream failing part-way; `StreamEvent` describes
/// the others).
#[derive(Serialize, ToSchema)]
pub struct AnthropicSseEvent {
    pub event: String,
    /// A JSON-encoded `StreamEvent` or `AnthropicErrorBody`.
    pub data: String,
    /// Not sent.
    pub id: Option<String>,
    /// Not sent.
    pub retry: Option<u64>,
}

#[utoipa::path(post, path = "/v1/messages", tag = "anthropic",
    request_body(content = MessagesBody, examples(
        ("plain" = (summary = "One user turn", value = json!({
            "max_tokens": 16, "temperature": 0,
            "system": "Answer in one word.",
            "messages": [{"role": "user", "content": "Capital of France?"}]
        }))),
        ("tool use" = (summary = "A forced tool call", value = json!({
            "max_tokens": 60,
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"name": "get_weather", "description": "Current weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}}],
            "tool_choice": {"type": "tool", "name": "get_weather"}
        }))),
    )),
    responses(
        (status = 200, description = "A `message`, or with `stream: true` its SSE events",
            content((MessageResponse = "application/json"), (AnthropicSseEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request (`invalid_request_error`)", body = AnthropicErrorBody),
        (status = 401, description = "Missing or wrong API key (`authentication_error`)", body = AnthropicErrorBody),
        (status = 404, description = "Unknown model (`not_found_error`)", body = AnthropicErrorBody),
        (status = 409, description = "The session is busy with another request", body = AnthropicErrorBody),
        (status = 413, description = "Body too large (`request_too_large`)", body = AnthropicErrorBody),
        (status = 429, description = "Too many requests in flight for this key (`rate_limit_error`)", body = AnthropicErrorBody),
        (status = 500, description = "The engine failed (`api_error`)", body = AnthropicErrorBody),
        (status = 503, description = "Loading, or the queue is full (`overloaded_error`)", body = AnthropicErrorBody),
    ))]
#[allow(dead_code)]
pub fn messages() {}

#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic",
    request_body(content = CountTokensBody, example = json!({
        "system": "Answer in one word.",
        "messages": [{"role": "user", "content": "Capital of France?"}]
    })),
    responses(
        (status = 200, description = "The prompt's length in tokens", body = CountTokensResponse),
        (status = 400, description = "Invalid request (`invalid_request_error`)", body = AnthropicErrorBody),
        (status = 401, description = "Missing or wrong API key (`authentication_error`)", body = AnthropicErrorBody),
        (status = 404, description = "Unknown model (`not_found_error`)", body = AnthropicErrorBody),
        (status = 413, description = "Body too large (`request_too_large`)", body = AnthropicErrorBody),
        (status = 503, description = "Loading (`overloaded_error`)", body = AnthropicErrorBody),
    ))]
#[allow(dead_code)]
pub fn count_tokens() {}

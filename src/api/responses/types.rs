//! The Responses API's bodies, typed once for the handlers and the OpenAPI document:
//! the request ([`CreateRequest`], permissive like every OpenAI type here), the
//! `response` object with its output items and usage, and the deletion answer. Field
//! order is wire order; `Option` fields are sent as `null`, as OpenAI does.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `input`: a string (one user message) or a list of items: messages (`{"role",
/// "content"}`, with or without `"type": "message"`), `function_call` and
/// `function_call_output` items; `reasoning` items are accepted and ignored.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self::Text(s)),
            Value::Array(items) => Ok(Self::Items(items)),
            _ => Err(serde::de::Error::custom(
                "input must be a string or a list of items",
            )),
        }
    }
}

/// The schema of [`Input`].
fn input_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    Schema::OneOf(
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::Object)))
            .item(ObjectBuilder::new().schema_type(Type::Null))
            .build(),
    )
}

/// Body of `POST /v1/responses`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(default)]
pub struct CreateRequest {
    pub model: Option<String>,
    #[schema(schema_with = input_schema)]
    pub input: Option<Input>,
    /// A system message put before the conversation; not carried over to a turn that
    /// continues with `previous_response_id`.
    pub instructions: Option<String>,
    /// Function tools: `[{"type": "function", "name", "description", "parameters", "strict"}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `"auto"`, `"none"`, `"required"` or `{"type": "function", "name": …}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object"}}` or
    /// `{"format": {"type": "json_schema", "name", "schema", "strict"}}`.
    #[schema(value_type = Option<Object>)]
    pub text: Option<Value>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Keep the response for `GET`, `DELETE` and `previous_response_id` (default true).
    pub store: Option<bool>,
    pub stream: Option<bool>,
    /// Continue the conversation of a stored response, in its session.
    pub previous_response_id: Option<String>,
    /// Up to 16 string values, echoed in the response.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Session whose KV cache a fresh conversation uses (also the `X-Session-Id` or
    /// Codex's `session_id` header).
    pub prompt_cache_key: Option<String>,
    /// Candela extension: a fixed sampling seed.
    pub seed: Option<i64>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub include: Option<Value>,
    /// Accepted and ignored (no reasoning models).
    #[schema(value_type = Option<Object>)]
    pub reasoning: Option<Value>,
    /// Accepted and ignored (a prompt past the context is refused, never truncated).
    #[schema(value_type = Option<Object>)]
    pub truncation: Option<Value>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub user: Option<Value>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub service_tier: Option<Value>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub stream_options: Option<Value>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub safety_identifier: Option<Value>,
}

/// `output_text` content of a message item.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputText {
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub text: String,
    /// Always empty.
    #[schema(value_type = Vec<Object>)]
    pub annotations: Vec<Value>,
    /// Always empty.
    #[schema(value_type = Vec<Object>)]
    pub logprobs: Vec<Value>,
}

impl OutputText {
    pub fn new(text: String) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

/// One item of `output`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// The assistant's text (`msg_…`).
    Message {
        id: String,
        #[schema(value_type = String)]
        role: &'static str,
        /// `in_progress`, `completed` or `incomplete`.
        #[schema(value_type = String)]
        status: &'static str,
        content: Vec<OutputText>,
    },
    /// A call of one of the request's function tools (`fc_…`, `call_id` `call_…`).
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        /// JSON text.
        arguments: String,
        #[schema(value_type = String)]
        status: &'static str,
    },
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct InputTokensDetails {
    /// Prompt tokens whose KV came from the session cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    /// Always 0.
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

impl From<crate::engine::Usage> for ResponseUsage {
    fn from(u: crate::engine::Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_tokens,
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
            },
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncompleteDetails {
    /// `max_output_tokens`.
    #[schema(value_type = String)]
    pub reason: &'static str,
}

/// The `response` object: the answer of `POST` and `GET`, and what the stream's
/// `response.*` lifecycle events carry.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created_at: u64,
    /// `in_progress`, `completed` or `incomplete` (`max_output_tokens` reached).
    #[schema(value_type = String)]
    pub status: &'static str,
    /// Always null (a failed generation is an error response or an `error` event).
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// As the request gave it (`"auto"` by default): a string or an object.
    pub tool_choice: Value,
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    /// `{"format": …}` as the request gave it (`{"type": "text"}` by default).
    #[schema(value_type = Object)]
    pub text: Value,
    #[schema(value_type = String)]
    pub truncation: &'static str,
    pub store: bool,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Null until the response is done.
    pub usage: Option<ResponseUsage>,
}

/// Answer of `DELETE /v1/responses/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseDeleted {
    pub id: String,
    #[schema(value_type = String)]
    pub object: &'static str,
    pub deleted: bool,
}

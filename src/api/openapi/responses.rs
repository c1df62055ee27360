//! Schemas of the response bodies, for the OpenAPI document only: the handlers build
//! these objects with `serde_json`, and `tests/schemathesis.rs` checks that what they
//! send conforms to what is written here (`response_schema_conformance`).

#![allow(dead_code)]

use serde::Serialize;
use utoipa::ToSchema;

use crate::api::types::UsageOut;

/// One server-sent event of a streamed response. OpenAPI 3.1 has no `itemSchema`, so the
/// `text/event-stream` schema describes each event, as the SSE parsers (and
/// schemathesis) read it: `data` is one JSON-encoded chunk (`chat.completion.chunk`,
/// `text_completion`, or an `error` object) or the final `[DONE]`.
#[derive(Serialize, ToSchema)]
pub struct SseEvent {
    /// A JSON-encoded chunk, or `[DONE]`.
    data: String,
    /// Not sent; readers default it to `message`.
    event: Option<String>,
    /// Not sent.
    id: Option<String>,
    /// Not sent.
    retry: Option<u64>,
}

/// `chat.completion`.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    id: String,
    /// Always `chat.completion`.
    object: String,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<ChatChoice>,
    usage: UsageOut,
}

#[derive(Serialize, ToSchema)]
pub struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    /// Present (not null) when the request asked for `logprobs`.
    logprobs: Option<ChatLogprobs>,
    finish_reason: FinishReason,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

#[derive(Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    role: String,
    /// Null when the turn is only tool calls.
    content: Option<String>,
    /// Present when the model called tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Serialize, ToSchema)]
pub struct ToolCall {
    id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    kind: String,
    function: FunctionCall,
}

#[derive(Serialize, ToSchema)]
pub struct FunctionCall {
    name: String,
    /// The arguments as a JSON text.
    arguments: String,
}

#[derive(Serialize, ToSchema)]
pub struct ChatLogprobs {
    content: Vec<TokenLogprob>,
}

#[derive(Serialize, ToSchema)]
pub struct TokenLogprob {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
    top_logprobs: Vec<TopLogprob>,
}

#[derive(Serialize, ToSchema)]
pub struct TopLogprob {
    token: String,
    logprob: f32,
    bytes: Vec<u8>,
}

/// `text_completion`.
#[derive(Serialize, ToSchema)]
pub struct TextCompletion {
    id: String,
    /// Always `text_completion`.
    object: String,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<TextChoice>,
    usage: UsageOut,
}

#[derive(Serialize, ToSchema)]
pub struct TextChoice {
    index: u32,
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish_reason: FinishReason,
}

/// The legacy completions `logprobs` object.
#[derive(Serialize, ToSchema)]
pub struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    /// One `{token: logprob}` map per position.
    #[schema(value_type = Vec<Object>)]
    top_logprobs: Vec<serde_json::Value>,
    text_offset: Vec<usize>,
}

/// `GET /health` when every model is ready.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: String,
    /// The default model.
    model: Option<String>,
    models: Vec<String>,
}

/// `POST /tokenize`: ids, or `{id, piece}` objects with `with_pieces`.
#[derive(Serialize, ToSchema)]
pub struct TokenizeResponse {
    tokens: Vec<TokenEntry>,
    count: usize,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TokenEntry {
    Id(u32),
    Piece { id: u32, piece: String },
}

#[derive(Serialize, ToSchema)]
pub struct DetokenizeResponse {
    content: String,
}

/// A session as `/v1/sessions` shows it.
#[derive(Serialize, ToSchema)]
pub struct Session {
    /// The `prompt_cache_key` it was created under.
    id: String,
    /// The model whose cache it is.
    model: String,
    tokens: usize,
    bytes: usize,
    /// `memory` or `disk`.
    tier: String,
    busy: bool,
    pinned: bool,
    created: u64,
    last_used: u64,
    hits: u64,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    /// Always `list`.
    object: String,
    data: Vec<Session>,
    resident_bytes: usize,
    budget_bytes: usize,
    /// Null while the default model is loading.
    kv_dtype: Option<String>,
    kv_bytes_per_token: Option<usize>,
}

/// `DELETE /v1/sessions/{id}`.
#[derive(Serialize, ToSchema)]
pub struct SessionDeleted {
    id: String,
    /// Always `session`.
    object: String,
    model: String,
    deleted: bool,
}

//! Response bodies and stream chunks, as the handlers serialize them. Field order is
//! wire order. `Option` fields without `skip_serializing_if` are sent as `null`; those
//! with it are left out when empty, as OpenAI does (`tool_calls`, the parts of a
//! `delta`). `tests/schemathesis.rs` checks what is sent against the document generated
//! from these types (`response_schema_conformance`).

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::engine::{self, LogprobEntry};

// ---- shared parts ----

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl From<engine::Usage> for UsageOut {
    fn from(u: engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

impl FinishReason {
    /// The engine's reason, except that a turn which ended normally after making
    /// `calls` tool calls ends with `tool_calls`.
    pub fn of(f: engine::FinishReason, calls: usize) -> Self {
        match f {
            engine::FinishReason::Stop if calls > 0 => Self::ToolCalls,
            engine::FinishReason::Stop => Self::Stop,
            engine::FinishReason::Length => Self::Length,
        }
    }
}

/// One alternative at a position. Log-probabilities are the engine's `f32` widened to
/// `f64`, so they print with the digits of the exact binary value.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

/// The chosen token at one position, with its alternatives.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

impl From<&LogprobEntry> for TokenLogprob {
    fn from(e: &LogprobEntry) -> Self {
        Self {
            token: e.token.clone(),
            logprob: f64::from(e.logprob),
            bytes: e.token.as_bytes().to_vec(),
            top_logprobs: e
                .top
                .iter()
                .map(|(t, l)| TopLogprob {
                    token: t.clone(),
                    logprob: f64::from(*l),
                    bytes: t.as_bytes().to_vec(),
                })
                .collect(),
        }
    }
}

/// Chat `logprobs`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

impl ChatLogprobs {
    pub fn of(lps: &[LogprobEntry]) -> Self {
        Self {
            content: lps.iter().map(TokenLogprob::from).collect(),
        }
    }
}

/// The legacy completions `logprobs` object.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    /// One `{token: logprob}` map per position (a token text that two alternatives
    /// share appears once).
    #[schema(value_type = Vec<std::collections::HashMap<String, f64>>)]
    pub top_logprobs: Vec<Map<String, Value>>,
    /// Byte offset of each token in the text of this object.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn of(lps: &[LogprobEntry]) -> Self {
        let mut out = Self::default();
        let mut off = 0;
        for e in lps {
            out.tokens.push(e.token.clone());
            out.token_logprobs.push(f64::from(e.logprob));
            out.top_logprobs.push(
                e.top
                    .iter()
                    .map(|(t, l)| (t.clone(), Value::from(f64::from(*l))))
                    .collect(),
            );
            out.text_offset.push(off);
            off += e.token.len();
        }
        out
    }
}

/// A tool call of a whole response.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

// ---- chat.completion ----

/// `chat.completion`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Present (not null) when the request asked for `logprobs`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    #[schema(value_type = String)]
    pub role: &'static str,
    /// Null when the turn is only tool calls.
    pub content: Option<String>,
    /// Present when the model called tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl AssistantMessage {
    /// A turn of text.
    pub fn text(content: String) -> Self {
        Self {
            role: "assistant",
            content: Some(content),
            tool_calls: None,
        }
    }
}

// ---- chat.completion.chunk ----

/// `chat.completion.chunk`: one event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice; empty in the usage chunk that `stream_options.include_usage` adds
    /// at the end.
    pub choices: Vec<ChatChunkChoice>,
    /// Only with `stream_options.include_usage`: null on every chunk but that last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<UsageOut>, required = false)]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    /// The logprobs of the tokens this chunk completes, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Null until the chunk that ends the turn.
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to the message; only the parts it carries are sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant`, on the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

impl ChatDelta {
    /// The first chunk's: the role and empty content.
    pub fn start() -> Self {
        Self {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        }
    }

    pub fn content(text: impl Into<String>) -> Self {
        Self {
            content: Some(text.into()),
            ..Self::default()
        }
    }
}

/// A piece of tool call `index`: its first delta carries the id, type and name (with
/// empty arguments), later ones only more of the arguments.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, on the first delta of a call.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More of the arguments' JSON text.
    pub arguments: String,
}

// ---- text_completion ----

/// `text_completion`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextCompletion {
    pub id: String,
    /// Always `text_completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<TextChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    /// Present (not null) when the request asked for `logprobs`.
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: FinishReason,
}

/// One event of a streamed text completion (its `object` is `text_completion` too).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextCompletionChunk {
    pub id: String,
    /// Always `text_completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    /// One choice; empty in the usage chunk that `stream_options.include_usage` adds
    /// at the end.
    pub choices: Vec<TextChunkChoice>,
    /// Only with `stream_options.include_usage`: null on every chunk but that last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<UsageOut>, required = false)]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TextChunkChoice {
    pub index: u32,
    pub text: String,
    /// The logprobs of the tokens of `text` (offsets from its start), when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Null until the chunk that ends the completion.
    pub finish_reason: Option<FinishReason>,
}

// ---- errors ----

/// Every error: `{"error": {...}}` with a 4xx (bad input) or 5xx status, and the last
/// event of a stream that fails part-way.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error` (the client can fix it), `rate_limit_error` or
    /// `server_error`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A stable machine-readable reason (`session_busy`, `context_length_exceeded`, …).
    #[schema(value_type = Option<String>)]
    pub code: Option<&'static str>,
}

// ---- models, health, tokenizer ----

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    #[schema(value_type = String)]
    pub owned_by: &'static str,
    pub context_length: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    #[schema(value_type = String)]
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// `GET /health` when every model is ready.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(value_type = String)]
    pub status: &'static str,
    /// The default model.
    pub model: Option<String>,
    pub models: Vec<String>,
}

/// `POST /tokenize`: ids, or `{id, piece}` objects with `with_pieces`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub tokens: Vec<TokenEntry>,
    pub count: usize,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TokenEntry {
    Id(u32),
    Piece { id: u32, piece: String },
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub content: String,
}

// ---- sessions ----
//
// `api/sessions.rs` still builds its bodies with `serde_json` (it is being reworked
// with the session store); these are the shapes it sends, for the document, and the
// types it is to serialize.

/// A session as `/v1/sessions` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    /// The `prompt_cache_key` it was created under.
    pub id: String,
    /// The model whose cache it is.
    pub model: String,
    pub tokens: usize,
    pub bytes: usize,
    /// Where the cache is: `memory` or `disk` on a CPU server; `device` (GPU memory),
    /// `host` (host RAM) or `disk` on a GPU server. A busy session is where the model
    /// computes (`memory`, or `device`).
    pub tier: String,
    pub busy: bool,
    pub pinned: bool,
    pub created: u64,
    pub last_used: u64,
    pub hits: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Session>,
    /// Bytes of the idle caches in host RAM, and their budget (`--kv-budget`).
    pub resident_bytes: usize,
    pub budget_bytes: usize,
    /// Bytes of the idle caches in GPU memory, and their budget
    /// (`--kv-device-budget`); absent on a server without a GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_budget_bytes: Option<usize>,
    /// Bytes of the spill files, and their budget (`--kv-disk-budget`).
    pub disk_bytes: u64,
    pub disk_budget_bytes: u64,
    /// Null while the default model is loading.
    pub kv_dtype: Option<String>,
    pub kv_bytes_per_token: Option<usize>,
}

/// `DELETE /v1/sessions/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionDeleted {
    pub id: String,
    /// Always `session`.
    pub object: String,
    pub model: String,
    pub deleted: bool,
}

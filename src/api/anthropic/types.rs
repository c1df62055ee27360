//! Anthropic Messages bodies: the responses, stream events and errors the handlers
//! serialize, and the request as the OpenAPI document describes it (the handlers read
//! requests field by field in [`super::convert`], so that every bad block gets its own
//! message). Field order is wire order.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

// ---- requests (for the document) ----

/// Body of `POST /v1/messages`. Unknown fields are accepted and ignored.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct MessagesBody {
    /// The served model's id; absent or unknown to this server: see `/v1/models`.
    model: Option<String>,
    /// Most tokens to generate (required).
    #[schema(minimum = 1)]
    max_tokens: i64,
    /// The conversation: `user` and `assistant` turns whose content is a string or a
    /// list of `text`, `tool_use` (assistant) and `tool_result` (user) blocks.
    messages: Vec<InputMessage>,
    /// A string or a list of `text` blocks.
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    top_p: Option<f32>,
    #[schema(minimum = -1)]
    top_k: Option<i64>,
    /// Client tools: `[{"name", "description", "input_schema"}]`.
    tools: Option<Vec<ToolDef>>,
    /// `{"type": "auto" | "any" | "none"}` or `{"type": "tool", "name"}`, each with an
    /// optional `disable_parallel_tool_use`.
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
    /// `user_id` names the session whose KV cache the request continues.
    metadata: Option<Metadata>,
    /// Accepted and ignored (the served models do not think in blocks).
    #[schema(value_type = Option<Object>)]
    thinking: Option<Value>,
}

/// Body of `POST /v1/messages/count_tokens`: the fields of a message request that make
/// up its prompt.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct CountTokensBody {
    model: Option<String>,
    messages: Vec<InputMessage>,
    /// A string or a list of `text` blocks.
    system: Option<Value>,
    tools: Option<Vec<ToolDef>>,
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<Value>,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct InputMessage {
    role: Role,
    /// A string or a list of content blocks.
    content: Value,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ToolDef {
    name: String,
    description: Option<String>,
    /// A JSON Schema with `"type": "object"`.
    #[schema(value_type = Object)]
    input_schema: Value,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct Metadata {
    user_id: Option<String>,
}

// ---- responses ----

/// A `message`: the assistant's turn.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageResponse {
    /// `msg_…`.
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// Always `assistant`.
    #[schema(value_type = String)]
    pub role: &'static str,
    pub content: Vec<ContentBlock>,
    pub model: String,
    /// Null only in `message_start`, before the turn has ended.
    pub stop_reason: Option<StopReason>,
    /// Which of `stop_sequences` ended the turn (`stop_reason` `stop_sequence`).
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

/// A block of the assistant's content.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text {
        text: String,
    },
    ToolUse {
        /// `toolu_…`: what the `tool_result` answering this call names.
        id: String,
        name: String,
        /// The arguments, valid against the tool's `input_schema` when the grammar
        /// forced the call.
        #[schema(value_type = Object)]
        input: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
}

/// Token counts. The prompt is `input_tokens + cache_read_input_tokens +
/// cache_creation_input_tokens`: read from the session's KV cache, newly written into
/// it (requests with a session), and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct MessageUsage {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub cache_creation_input_tokens: usize,
    pub cache_read_input_tokens: usize,
}

/// `POST /v1/messages/count_tokens`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CountTokensResponse {
    /// Tokens of the prompt the request renders (system, tools and messages, through
    /// the model's chat template).
    pub input_tokens: usize,
}

// ---- stream events ----

/// One event of a streamed message; its SSE `event` name is its `type`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    MessageStart {
        message: MessageResponse,
    },
    ContentBlockStart {
        index: usize,
        content_block: ContentBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: MessageDelta,
        /// Totals for the whole message.
        usage: MessageUsage,
    },
    MessageStop,
}

impl StreamEvent {
    /// The SSE `event` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::MessageStart { .. } => "message_start",
            Self::ContentBlockStart { .. } => "content_block_start",
            Self::ContentBlockDelta { .. } => "content_block_delta",
            Self::ContentBlockStop { .. } => "content_block_stop",
            Self::MessageDelta { .. } => "message_delta",
            Self::MessageStop => "message_stop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    TextDelta {
        text: String,
    },
    /// More of a `tool_use` block's `input` as JSON text.
    InputJsonDelta {
        partial_json: String,
    },
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageDelta {
    pub stop_reason: Option<StopReason>,
    pub stop_sequence: Option<String>,
}

// ---- errors ----

/// Every error on the Anthropic routes, and the `error` event of a stream that fails
/// part-way.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AnthropicErrorBody {
    /// Always `error`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub error: AnthropicErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AnthropicErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `request_too_large`, `rate_limit_error`, `api_error` or `overloaded_error`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub message: String,
}

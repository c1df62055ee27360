//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the request and
//! response types the handlers use (`utoipa::ToSchema` derives in `types`) and the
//! route table. Chat and text completion bodies are the endpoint's own fields plus the
//! shared `CommonParams`. The Anthropic routes are in [`anthropic`].

mod anthropic;

use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::anthropic::types::{
    AnthropicErrorBody, AnthropicErrorDetail, BlockDelta, ContentBlock, CountTokensBody,
    CountTokensResponse, InputMessage, MessageDelta, MessageResponse, MessageUsage, MessagesBody,
    Metadata, Role, StopReason, StreamEvent, ToolDef,
};
use super::responses::types::{
    CreateRequest, IncompleteDetails, InputTokensDetails, OutputItem, OutputText,
    OutputTokensDetails, ResponseDeleted, ResponseObject, ResponseUsage,
};
use super::types::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
    ChatLogprobs, ChatMessage, ChatRequest, CommonParams, CompletionLogprobs, CompletionRequest,
    Content, ContentPart, DetokenizeRequest, DetokenizeResponse, ErrorBody, ErrorDetail,
    FinishReason, FunctionCall, FunctionDelta, Health, ModelCard, ModelList, Prompt,
    PromptTokensDetails, Session, SessionDeleted, SessionList, StopSpec, StreamOptions, TextChoice,
    TextChunkChoice, TextCompletion, TextCompletionChunk, TokenEntry, TokenLogprob,
    TokenizeRequest, TokenizeResponse, ToolCall, ToolCallDelta, TopLogprob, UsageOut,
};

/// One server-sent event of a streamed response. OpenAPI 3.1 has no `itemSchema`, so the
/// `text/event-stream` schema describes each event, as the SSE parsers (and
/// schemathesis) read it: `data` is one JSON-encoded chunk (`ChatCompletionChunk`,
/// `TextCompletionChunk`, or an `ErrorBody` that ends a stream failing part-way) or the
/// final `[DONE]`. The handlers write events with axum's SSE encoder; this type only
/// describes them.
#[derive(Serialize, ToSchema)]
pub struct SseEvent {
    /// A JSON-encoded chunk, or `[DONE]`.
    pub data: String,
    /// The event's type on Responses streams (`response.output_text.delta`, …); not
    /// sent on chat and text completion streams (readers default it to `message`).
    pub event: Option<String>,
    /// Not sent.
    pub id: Option<String>,
    /// Not sent.
    pub retry: Option<u64>,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ChatBody {
    #[serde(flatten)]
    chat: ChatRequest,
    #[serde(flatten)]
    common: CommonParams,
    /// Function tools: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    #[schema(value_type = Option<Vec<Object>>)]
    tools: Option<serde_json::Value>,
    /// `"auto"`, `"none"`, `"required"`, or `{"type": "function", "function": {"name"}}`.
    #[schema(value_type = Option<Object>)]
    tool_choice: Option<serde_json::Value>,
    parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    #[schema(value_type = Option<Object>)]
    response_format: Option<serde_json::Value>,
}

/// Body of `POST /v1/completions`.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"prompt": "The sky is", "max_tokens": 4, "logprobs": 2}))]
#[allow(dead_code)]
pub struct CompletionBody {
    #[serde(flatten)]
    completion: CompletionRequest,
    #[serde(flatten)]
    common: CommonParams,
    /// As on chat: `json_object` or `json_schema`.
    #[schema(value_type = Option<Object>)]
    response_format: Option<serde_json::Value>,
}

/// `PATCH /v1/sessions/{id}`.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct SessionPatch {
    pinned: bool,
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body(content = ChatBody, examples(
        ("plain" = (summary = "Greedy, with log-probabilities", value = json!({
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2
        }))),
        ("tool call" = (summary = "A forced tool call", value = json!({
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}}}],
            "tool_choice": "required", "max_tokens": 40, "seed": 1
        }))),
    )),
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` an SSE stream of `chat.completion.chunk` objects ending in `data: [DONE]`",
            content((ChatCompletion = "application/json"), (SseEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 409, description = "The session is busy with another request", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this key", body = ErrorBody),
        (status = 503, description = "Loading, or the queue is full", body = ErrorBody),
    ))]
#[allow(dead_code)]
fn chat() {}

#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = CompletionBody,
    responses(
        (status = 200, description = "A `text_completion` object, or an SSE stream of them",
            content((TextCompletion = "application/json"), (SseEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 409, description = "The session is busy with another request", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this key", body = ErrorBody),
        (status = 503, description = "Loading, or the queue is full", body = ErrorBody),
    ))]
#[allow(dead_code)]
fn completions() {}

#[utoipa::path(post, path = "/v1/responses", tag = "openai",
    request_body(content = CreateRequest, examples(
        ("plain" = (summary = "One turn, stored", value = json!({
            "instructions": "Answer briefly.", "input": "What is the capital of France?",
            "max_output_tokens": 16, "temperature": 0
        }))),
        ("tool call" = (summary = "A forced function call", value = json!({
            "input": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"type": "function", "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}}],
            "tool_choice": "required", "parallel_tool_calls": false, "max_output_tokens": 40
        }))),
    )),
    responses(
        (status = 200, description = "A `response` object, or with `stream: true` an SSE stream of named events (`response.created` … `response.completed`), each `data` a JSON event with its `type` and `sequence_number`",
            content((ResponseObject = "application/json"), (SseEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request (unknown item type, malformed item, bad parameter)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model, or `previous_response_id` names no stored response of this key", body = ErrorBody),
        (status = 409, description = "The session is busy with another request", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many requests in flight for this key", body = ErrorBody),
        (status = 503, description = "Loading, or the queue is full", body = ErrorBody),
    ))]
#[allow(dead_code)]
fn responses_create() {}

#[utoipa::path(get, path = "/v1/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "Response id (`resp_…`)")),
    responses((status = 200, body = ResponseObject), (status = 401, body = ErrorBody),
        (status = 404, description = "No stored response of this key has that id", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
#[allow(dead_code)]
fn response_get() {}

#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "openai",
    params(("id" = String, Path, description = "Response id (`resp_…`)")),
    responses((status = 200, body = ResponseDeleted), (status = 401, body = ErrorBody),
        (status = 404, description = "No stored response of this key has that id", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
#[allow(dead_code)]
fn response_delete() {}

#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = ModelList), (status = 503, body = ErrorBody)))]
#[allow(dead_code)]
fn models() {}

#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "Model id")),
    responses((status = 200, body = ModelCard), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[allow(dead_code)]
fn model() {}

#[utoipa::path(get, path = "/health", tag = "candela",
    responses((status = 200, description = "Ready", body = Health), (status = 503, description = "Loading or failed", body = ErrorBody)))]
#[allow(dead_code)]
fn health() {}

#[utoipa::path(post, path = "/tokenize", tag = "candela",
    request_body(content = TokenizeRequest, example = json!({"content": "Hello world", "with_pieces": true})),
    responses((status = 200, body = TokenizeResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[allow(dead_code)]
fn tokenize() {}

#[utoipa::path(post, path = "/detokenize", tag = "candela",
    request_body(content = DetokenizeRequest, example = json!({"tokens": [19556, 905]})),
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[allow(dead_code)]
fn detokenize() {}

#[utoipa::path(get, path = "/metrics", tag = "candela",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

#[utoipa::path(get, path = "/dashboard", tag = "candela",
    responses((status = 200, description = "Live vitals page", content_type = "text/html")))]
#[allow(dead_code)]
fn dashboard() {}

#[utoipa::path(get, path = "/openapi.json", tag = "candela",
    responses((status = 200, description = "This document")))]
#[allow(dead_code)]
fn openapi() {}

#[utoipa::path(get, path = "/v1/sessions", tag = "sessions",
    responses((status = 200, body = SessionList), (status = 401, body = ErrorBody), (status = 404, description = "Unknown model", body = ErrorBody)))]
#[allow(dead_code)]
fn sessions() {}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id (prompt_cache_key)")),
    responses((status = 200, body = Session), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
#[allow(dead_code)]
fn session_get() {}

#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 200, body = SessionDeleted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
#[allow(dead_code)]
fn session_delete() {}

#[utoipa::path(patch, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    request_body = SessionPatch,
    responses((status = 200, description = "The session after the change", body = Session), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
#[allow(dead_code)]
fn session_patch() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "candela",
        description = "Local OpenAI- and Anthropic-compatible LLM server with per-session KV cache"
    ),
    paths(
        chat,
        completions,
        responses_create,
        response_get,
        response_delete,
        models,
        model,
        health,
        tokenize,
        detokenize,
        metrics,
        dashboard,
        openapi,
        sessions,
        session_get,
        session_delete,
        session_patch,
        anthropic::messages,
        anthropic::count_tokens
    ),
    components(schemas(
        ChatBody,
        CompletionBody,
        ErrorBody,
        ErrorDetail,
        SessionPatch,
        ChatMessage,
        ChatRequest,
        CommonParams,
        CompletionRequest,
        Content,
        ContentPart,
        DetokenizeRequest,
        ModelCard,
        ModelList,
        Prompt,
        PromptTokensDetails,
        StopSpec,
        StreamOptions,
        TokenizeRequest,
        UsageOut,
        ChatCompletion,
        ChatChoice,
        SseEvent,
        ChatCompletionChunk,
        ChatChunkChoice,
        ChatDelta,
        ToolCallDelta,
        FunctionDelta,
        TextCompletionChunk,
        TextChunkChoice,
        AssistantMessage,
        ToolCall,
        FunctionCall,
        FinishReason,
        ChatLogprobs,
        TokenLogprob,
        TopLogprob,
        TextCompletion,
        TextChoice,
        CompletionLogprobs,
        Health,
        TokenizeResponse,
        TokenEntry,
        DetokenizeResponse,
        Session,
        SessionList,
        SessionDeleted,
        MessagesBody,
        CountTokensBody,
        InputMessage,
        Role,
        ToolDef,
        Metadata,
        MessageResponse,
        ContentBlock,
        StopReason,
        MessageUsage,
        CountTokensResponse,
        anthropic::AnthropicSseEvent,
        StreamEvent,
        BlockDelta,
        MessageDelta,
        AnthropicErrorBody,
        AnthropicErrorDetail,
        CreateRequest,
        ResponseObject,
        OutputItem,
        OutputText,
        ResponseUsage,
        InputTokensDetails,
        OutputTokensDetails,
        IncompleteDetails,
        ResponseDeleted
    ))
)]
pub struct ApiDoc;

/// The document as JSON text (built once).
pub fn document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}

#[cfg(test)]
mod tests {
    use super::super::routes;

    /// The document and the router list the same paths, with axum's `{id}` syntax,
    /// which OpenAPI shares.
    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(super::document()).unwrap();
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort();
        let mut served = routes::ALL.to_vec();
        served.sort();
        assert_eq!(documented, served);
        let schemas = &doc["components"]["schemas"];
        let chat = schemas["ChatBody"].to_string();
        assert!(
            chat.contains("ChatRequest") && chat.contains("CommonParams"),
            "{chat}"
        );
        assert!(schemas["ChatRequest"]["properties"]["messages"].is_object());
        assert!(schemas["CommonParams"]["properties"]["temperature"].is_object());
    }
}

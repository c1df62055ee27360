//! A Responses request as the chat pipeline's request: `input` items become chat
//! messages, `instructions` a system message in front, flat function tools and
//! `tool_choice` the chat shapes, `text.format` a `response_format`,
//! `max_output_tokens` `max_completion_tokens`. The chat pipeline then checks,
//! renders, tokenizes and compiles grammars exactly as for `/v1/chat/completions`;
//! its errors come back naming the Responses fields ([`rename_error`]).

use serde_json::{json, Map, Value};

use super::super::error::ApiError;
use super::types::{CreateRequest, Input};

/// Item types accepted in `input`.
const ITEM_TYPES: &str = "message, function_call, function_call_output, reasoning";
const ROLES: &[&str] = &["user", "assistant", "system", "developer"];

fn text_of(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

/// The text of a content list (`input_text`, `output_text`, `text` parts).
fn content_text(content: &Value, param: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => out.push_str(t),
                    ("refusal", _) => {
                        out.push_str(p.get("refusal").and_then(Value::as_str).unwrap_or(""))
                    }
                    (k, _) => {
                        return Err(ApiError::invalid(
                            &format!("{param}[{j}]"),
                            format!(
                                "content part type `{k}` is not supported (only `input_text` and `output_text` with a `text` field)"
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::invalid(
            param,
            "content must be a string or a list of content parts",
        )),
    }
}

fn required_str(item: &Value, field: &str, param: &str) -> Result<String, ApiError> {
    match item.get(field).and_then(text_of) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ApiError::invalid(
            &format!("{param}.{field}"),
            format!("{param}.{field} must be a non-empty string"),
        )),
    }
}

/// Conversation items → chat messages. A `function_call` joins the assistant message
/// before it (as one chat message carries a turn's text and its calls); parallel calls
/// thus share one message. `param` names the list in errors (`input`).
pub fn items_to_messages(items: &[Value], param: &str) -> Result<Vec<Value>, ApiError> {
    let mut out: Vec<Value> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let p = format!("{param}[{i}]");
        if !item.is_object() {
            return Err(ApiError::invalid(&p, "each input item must be an object"));
        }
        let kind = match item.get("type") {
            None | Some(Value::Null) if item.get("role").is_some() => "message",
            Some(Value::String(s)) => s.as_str(),
            _ => {
                return Err(ApiError::invalid(
                    &format!("{p}.type"),
                    format!("input items need a `type` (one of {ITEM_TYPES})"),
                ))
            }
        };
        match kind {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                if !ROLES.contains(&role) {
                    return Err(ApiError::invalid(
                        &format!("{p}.role"),
                        format!(
                            "unknown role `{role}` (expected one of {})",
                            ROLES.join(", ")
                        ),
                    ));
                }
                let content = content_text(
                    item.get("content").unwrap_or(&Value::Null),
                    &format!("{p}.content"),
                )?;
                out.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let call = json!({
                    "id": required_str(item, "call_id", &p)?,
                    "type": "function",
                    "function": {
                        "name": required_str(item, "name", &p)?,
                        "arguments": match item.get("arguments") {
                            Some(Value::String(s)) => s.clone(),
                            _ => return Err(ApiError::invalid(
                                &format!("{p}.arguments"),
                                format!("{p}.arguments must be a string of JSON"),
                            )),
                        },
                    },
                });
                let joins = out
                    .last()
                    .is_some_and(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
                match out.last_mut().filter(|_| joins) {
                    Some(m) => match m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        Some(calls) => calls.push(call),
                        None => m["tool_calls"] = json!([call]),
                    },
                    None => {
                        out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]}))
                    }
                }
            }
            "function_call_output" => {
                let call_id = required_str(item, "call_id", &p)?;
                let output = match item.get("output") {
                    Some(v @ (Value::String(_) | Value::Array(_))) => {
                        content_text(v, &format!("{p}.output"))?
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{p}.output"),
                            format!("{p}.output must be a string or a list of text parts"),
                        ))
                    }
                };
                out.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            // No reasoning models here; a client replaying another model's reasoning
            // (Codex does) loses nothing the template could show.
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid(
                    &format!("{p}.type"),
                    format!("input item type `{other}` is not supported (supported: {ITEM_TYPES})"),
                )
                .with_code("invalid_value"))
            }
        }
    }
    Ok(out)
}

/// This turn's own messages (`input`, without instructions or earlier turns).
pub fn input_messages(req: &CreateRequest) -> Result<Vec<Value>, ApiError> {
    match &req.input {
        None => Ok(Vec::new()),
        Some(Input::Text(t)) => Ok(vec![json!({"role": "user", "content": t})]),
        Some(Input::Items(items)) => items_to_messages(items, "input"),
    }
}

/// Flat function tools → chat tools.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(ApiError::invalid("tools", "tools must be a list"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let kind = t.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind != "function" {
            return Err(ApiError::invalid(
                &format!("tools[{i}].type"),
                format!("only tools of type `function` are supported, got `{kind}`"),
            ));
        }
        // A chat-shaped tool (`{"type", "function": {…}}`) passes as it is.
        if t.get("function").is_some() {
            out.push(t.clone());
            continue;
        }
        let mut f = Map::new();
        for k in ["name", "description", "parameters", "strict"] {
            if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                f.insert(k.to_string(), v.clone());
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Ok(choice.clone()),
            }
        }
        Value::Object(o) => Err(ApiError::invalid(
            "tool_choice",
            format!(
                "tool_choice must be `auto`, `none`, `required` or {{\"type\": \"function\", \"name\": …}}, got type `{}`",
                o.get("type").and_then(Value::as_str).unwrap_or_default()
            ),
        )),
        other => Ok(other.clone()),
    }
}

/// `text.format` → chat `response_format`.
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let kind = format
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok(Some(match kind {
        "json_schema" => {
            let mut js = Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(k) {
                    js.insert(k.to_string(), v.clone());
                }
            }
            json!({"type": "json_schema", "json_schema": js})
        }
        "text" | "json_object" => json!({"type": kind}),
        other => {
            return Err(ApiError::invalid(
                "text.format.type",
                format!(
                "text.format.type must be `text`, `json_object` or `json_schema`, got `{other}`"
            ),
            ))
        }
    }))
}

/// The chat request body for `messages` (instructions, earlier turns and this turn's
/// input, in order).
pub fn chat_body(req: &CreateRequest, messages: Vec<Value>) -> Result<Value, ApiError> {
    let mut body = Map::new();
    let mut put = |k: &str, v: Value| {
        body.insert(k.to_string(), v);
    };
    put("messages", Value::Array(messages));
    if let Some(m) = &req.model {
        put("model", json!(m));
    }
    if let Some(t) = req.tools.as_ref().filter(|t| !t.is_null()) {
        put("tools", chat_tools(t)?);
    }
    if let Some(c) = req.tool_choice.as_ref().filter(|c| !c.is_null()) {
        put("tool_choice", chat_tool_choice(c)?);
    }
    if let Some(p) = req.parallel_tool_calls {
        put("parallel_tool_calls", json!(p));
    }
    if let Some(t) = req.text.as_ref().filter(|t| !t.is_null()) {
        if !t.is_object() {
            return Err(ApiError::invalid("text", "text must be an object"));
        }
        if let Some(rf) = response_format(t)? {
            put("response_format", rf);
        }
    }
    if let Some(n) = req.max_output_tokens {
        put("max_completion_tokens", json!(n));
    }
    if let Some(t) = req.temperature {
        put("temperature", json!(t));
    }
    if let Some(p) = req.top_p {
        put("top_p", json!(p));
    }
    if let Some(s) = req.seed {
        put("seed", json!(s));
    }
    Ok(Value::Object(body))
}

/// `metadata`: at most 16 string values under keys of at most 64 characters, values
/// of at most 512 (OpenAI's limits).
pub fn check_metadata(m: Option<&Value>) -> Result<Value, ApiError> {
    let map = match m {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(ApiError::invalid("metadata", "metadata must be an object")),
    };
    if map.len() > 16 {
        return Err(ApiError::invalid(
            "metadata",
            format!("metadata may have at most 16 keys, got {}", map.len()),
        ));
    }
    for (k, v) in map {
        let ok = k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512);
        if !ok {
            return Err(ApiError::invalid(
                "metadata",
                format!("metadata `{k}`: keys must be at most 64 characters and values strings of at most 512"),
            ));
        }
    }
    Ok(Value::Object(map.clone()))
}

/// A chat-pipeline error as the Responses request's fields name it.
pub fn rename_error(mut e: ApiError) -> ApiError {
    const RENAMES: &[(&str, &str)] = &[
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
        ("max_completion_tokens", "max_output_tokens"),
        (".function.", "."),
        (".function", ""),
    ];
    if let Some(p) = e.param.take() {
        let mut p = if p.starts_with("messages") {
            "input".to_string()
        } else {
            p
        };
        for (from, to) in RENAMES {
            p = p.replace(from, to);
        }
        e.param = Some(p);
    }
    for (from, to) in &RENAMES[..3] {
        e.message = e.message.replace(from, to);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_chat_messages_with_calls_joined() {
        let items = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                   "content": [{"type": "output_text", "text": "let me look", "annotations": []}]}),
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "f", "arguments": "{}"}),
            json!({"type": "function_call", "call_id": "call_b", "name": "g", "arguments": "{\"x\":1}"}),
            json!({"type": "function_call_output", "call_id": "call_a", "output": "1"}),
            json!({"type": "reasoning", "id": "rs_1", "summary": []}),
            json!({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "be brief"}]}),
        ];
        let m = items_to_messages(&items, "input").unwrap();
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(m[1]["content"], "let me look");
        assert_eq!(m[1]["tool_calls"][1]["id"], "call_b");
        assert_eq!(m[1]["tool_calls"][1]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "call_a", "content": "1"})
        );
        assert_eq!(m[3]["role"], "developer");
        // A call with no assistant text before it starts its own message.
        let m = items_to_messages(
            &[
                json!({"role": "user", "content": "x"}),
                json!({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}),
            ],
            "input",
        )
        .unwrap();
        assert_eq!(m[1]["role"], "assistant");
    }

    #[test]
    fn bad_items_name_the_item() {
        let cases = [
            (json!({"type": "computer_call", "id": "x"}), "input[0].type"),
            (
                json!({"type": "function_call", "name": "f", "arguments": "{}"}),
                "input[0].call_id",
            ),
            (
                json!({"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}),
                "input[0].arguments",
            ),
            (
                json!({"type": "function_call_output", "call_id": "c"}),
                "input[0].output",
            ),
            (json!({"role": "tool", "content": "x"}), "input[0].role"),
            (
                json!({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}),
                "input[0].content[0]",
            ),
            (json!({"content": "no role or type"}), "input[0].type"),
            (json!("a string"), "input[0]"),
        ];
        for (item, param) in cases {
            let e = items_to_messages(std::slice::from_ref(&item), "input").unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{item}: {}", e.message);
        }
    }

    #[test]
    fn tools_choice_and_format_take_the_chat_shapes() {
        let req: CreateRequest = serde_json::from_value(json!({
            "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
            "max_output_tokens": 9,
        }))
        .unwrap();
        let body = chat_body(&req, vec![]).unwrap();
        assert_eq!(body["tools"][0]["function"]["name"], "f");
        assert_eq!(body["tool_choice"]["function"]["name"], "f");
        assert_eq!(body["response_format"]["json_schema"]["name"], "out");
        assert_eq!(body["max_completion_tokens"], 9);
        let bad: CreateRequest =
            serde_json::from_value(json!({"tools": [{"type": "web_search"}]})).unwrap();
        assert_eq!(
            chat_body(&bad, vec![]).unwrap_err().param.as_deref(),
            Some("tools[0].type")
        );
    }

    #[test]
    fn chat_errors_are_renamed_to_responses_fields() {
        let e = rename_error(ApiError::invalid(
            "response_format.json_schema.name",
            "response_format: bad",
        ));
        assert_eq!(e.param.as_deref(), Some("text.format.name"));
        assert_eq!(e.message, "text.format: bad");
        let e = rename_error(ApiError::invalid("tools[2].function.parameters", "x"));
        assert_eq!(e.param.as_deref(), Some("tools[2].parameters"));
        let e = rename_error(ApiError::invalid("messages[3].content", "x"));
        assert_eq!(e.param.as_deref(), Some("input"));
        let e = rename_error(ApiError::invalid(
            "max_completion_tokens",
            "max_completion_tokens must be >= 1",
        ));
        assert_eq!(e.message, "max_output_tokens must be >= 1");
    }

    #[test]
    fn metadata_is_checked() {
        assert!(check_metadata(Some(&json!({"a": "b"}))).is_ok());
        assert!(check_metadata(Some(&json!({"a": 1}))).is_err());
        assert!(check_metadata(Some(&json!([]))).is_err());
        let many: Map<String, Value> = (0..17).map(|i| (i.to_string(), json!("v"))).collect();
        assert!(check_metadata(Some(&Value::Object(many))).is_err());
    }
}

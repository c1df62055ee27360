//! An Anthropic Messages request → the chat completions body the chat pipeline checks,
//! renders and generates from (`generate::chat_job`): `system` becomes the system
//! message, `tool_use` blocks assistant `tool_calls`, `tool_result` blocks `tool`
//! messages, `tools` function tools, `tool_choice` OpenAI's, `stop_sequences` `stop`.
//! Every block is checked here, so a bad one is named by its place in the request.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use super::super::error::ApiError;

/// Block types of Anthropic's that need a modality these text-only models lack.
const MEDIA_BLOCKS: &[&str] = &["image", "document", "search_result", "container_upload"];

fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(param, format!("{param}: {message}"))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `body[key]` when present and not null.
fn field<'a>(body: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    body.get(key).filter(|v| !v.is_null())
}

fn string<'a>(v: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    v.as_str()
        .ok_or_else(|| bad(param, format!("expected a string, got {}", type_name(v))))
}

/// The chat body for `body`; `for_count` (count_tokens) leaves out what only a
/// generation needs (`max_tokens` is then optional). `session` becomes
/// `prompt_cache_key`.
pub fn to_chat(body: &Value, session: Option<&str>, for_count: bool) -> Result<Value, ApiError> {
    let body = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("", "the request body must be a JSON object"))?;
    let mut out = Map::new();
    if let Some(m) = field(body, "model") {
        out.insert("model".into(), json!(string(m, "model")?));
    }
    match field(body, "max_tokens") {
        None if for_count => {}
        None => return Err(bad("max_tokens", "field required")),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                bad(
                    "max_tokens",
                    format!("expected an integer, got {}", type_name(v)),
                )
            })?;
            out.insert("max_tokens".into(), json!(n));
        }
    }
    let mut messages = Vec::new();
    if let Some(sys) = field(body, "system") {
        let text = system_text(sys)?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let input = match field(body, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(bad("messages", "at least one message is required")),
        Some(v) => {
            return Err(bad(
                "messages",
                format!("expected a list, got {}", type_name(v)),
            ))
        }
        None => return Err(bad("messages", "field required")),
    };
    let mut prev_calls: HashSet<String> = HashSet::new();
    for (i, m) in input.iter().enumerate() {
        convert_message(m, i, &mut prev_calls, &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));
    if !for_count {
        for key in ["temperature", "top_p", "top_k", "stream"] {
            if let Some(v) = field(body, key) {
                out.insert(key.into(), v.clone());
            }
        }
        if let Some(v) = field(body, "stop_sequences") {
            if !v.is_array() {
                return Err(bad(
                    "stop_sequences",
                    format!("expected a list of strings, got {}", type_name(v)),
                ));
            }
            out.insert("stop".into(), v.clone());
        }
    }
    let tools = match field(body, "tools") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| convert_tool(t, i))
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(
                "tools",
                format!("expected a list, got {}", type_name(v)),
            ))
        }
    };
    let names: Vec<&str> = tools
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    if let Some(tc) = field(body, "tool_choice") {
        let (choice, parallel) = convert_tool_choice(tc, &names)?;
        out.insert("tool_choice".into(), choice);
        if let Some(p) = parallel {
            out.insert("parallel_tool_calls".into(), json!(p));
        }
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(s) = session {
        out.insert("prompt_cache_key".into(), json!(s));
    }
    Ok(Value::Object(out))
}

/// `system`: a string or a list of `text` blocks (joined by blank lines).
fn system_text(sys: &Value) -> Result<String, ApiError> {
    match sys {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let p = format!("system[{j}]");
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => {}
                    Some(other) => {
                        return Err(bad(
                            &p,
                            format!("system blocks must be of type `text`, got `{other}`"),
                        ))
                    }
                    None => return Err(bad(&format!("{p}.type"), "field required")),
                }
                let t = b
                    .get("text")
                    .ok_or_else(|| bad(&format!("{p}.text"), "field required"))?;
                parts.push(string(t, &format!("{p}.text"))?.to_string());
            }
            Ok(parts.join("\n\n"))
        }
        other => Err(bad(
            "system",
            format!(
                "expected a string or a list of text blocks, got {}",
                type_name(other)
            ),
        )),
    }
}

/// A block's type, with the error a block without one gets.
fn block_type<'a>(b: &'a Value, p: &str) -> Result<&'a str, ApiError> {
    if !b.is_object() {
        return Err(bad(
            p,
            format!("expected a content block object, got {}", type_name(b)),
        ));
    }
    match b.get("type") {
        None | Some(Value::Null) => Err(bad(&format!("{p}.type"), "field required")),
        Some(t) => string(t, &format!("{p}.type")),
    }
}

fn unsupported_block(p: &str, kind: &str) -> ApiError {
    if MEDIA_BLOCKS.contains(&kind) {
        bad(
            p,
            format!("content blocks of type `{kind}` are not supported: the served models read text only"),
        )
    } else {
        bad(
            p,
            format!("unknown or unsupported content block type `{kind}` (supported: text, tool_use, tool_result)"),
        )
    }
}

fn text_of(b: &Value, p: &str) -> Result<String, ApiError> {
    let t = b
        .get("text")
        .ok_or_else(|| bad(&format!("{p}.text"), "field required"))?;
    Ok(string(t, &format!("{p}.text"))?.to_string())
}

/// One Anthropic message → one or more chat messages. `prev_calls` holds the
/// `tool_use` ids of the assistant message before: a `tool_result` must answer one.
fn convert_message(
    m: &Value,
    i: usize,
    prev_calls: &mut HashSet<String>,
    out: &mut Vec<Value>,
) -> Result<(), ApiError> {
    let p = format!("messages[{i}]");
    let role = match m.get("role") {
        None | Some(Value::Null) => return Err(bad(&format!("{p}.role"), "field required")),
        Some(r) => string(r, &format!("{p}.role"))?,
    };
    if role != "user" && role != "assistant" {
        return Err(bad(
            &format!("{p}.role"),
            format!("unknown role `{role}` (expected `user` or `assistant`; the system prompt goes in `system`)"),
        ));
    }
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            if role == "assistant" {
                prev_calls.clear();
            }
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        None | Some(Value::Null) => return Err(bad(&format!("{p}.content"), "field required")),
        Some(v) => {
            return Err(bad(
                &format!("{p}.content"),
                format!(
                    "expected a string or a list of content blocks, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    if role == "assistant" {
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut ids = HashSet::new();
        for (j, b) in blocks.iter().enumerate() {
            let bp = format!("{p}.content[{j}]");
            match block_type(b, &bp)? {
                "text" => text.push_str(&text_of(b, &bp)?),
                "tool_use" => {
                    let (id, call) = tool_use(b, &bp)?;
                    if !ids.insert(id.clone()) {
                        return Err(bad(
                            &format!("{bp}.id"),
                            format!("duplicate tool_use id `{id}`"),
                        ));
                    }
                    calls.push(call);
                }
                // Reasoning a model of Anthropic's wrote: nothing these models can read.
                "thinking" | "redacted_thinking" => {}
                "tool_result" => {
                    return Err(bad(&bp, "tool_result blocks belong in user messages"))
                }
                other => return Err(unsupported_block(&bp, other)),
            }
        }
        let mut msg = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
        *prev_calls = ids;
        return Ok(());
    }
    let mut text = String::new();
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{p}.content[{j}]");
        match block_type(b, &bp)? {
            "text" => text.push_str(&text_of(b, &bp)?),
            "tool_result" => {
                let (id, content) = tool_result(b, &bp)?;
                if !prev_calls.contains(&id) {
                    return Err(bad(
                        &format!("{bp}.tool_use_id"),
                        format!("tool_result for tool_use_id `{id}`, which no tool_use block of the previous assistant message has"),
                    ));
                }
                if !text.is_empty() {
                    out.push(json!({"role": "user", "content": std::mem::take(&mut text)}));
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            "tool_use" => return Err(bad(&bp, "tool_use blocks belong in assistant messages")),
            other => return Err(unsupported_block(&bp, other)),
        }
    }
    if !text.is_empty() || blocks.is_empty() {
        out.push(json!({"role": "user", "content": text}));
    }
    Ok(())
}

/// A `tool_use` block → its id and an OpenAI tool call.
fn tool_use(b: &Value, p: &str) -> Result<(String, Value), ApiError> {
    let id = match b.get("id") {
        Some(v) => string(v, &format!("{p}.id"))?,
        None => return Err(bad(&format!("{p}.id"), "field required")),
    };
    if id.is_empty() {
        return Err(bad(&format!("{p}.id"), "must not be empty"));
    }
    let name = match b.get("name") {
        Some(v) => string(v, &format!("{p}.name"))?,
        None => return Err(bad(&format!("{p}.name"), "field required")),
    };
    let input = match b.get("input") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(v) => {
            return Err(bad(
                &format!("{p}.input"),
                format!("expected an object, got {}", type_name(v)),
            ))
        }
    };
    let call = json!({
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": input.to_string()},
    });
    Ok((id.to_string(), call))
}

/// A `tool_result` block → the id it answers and its content as text (an error result
/// says so in front).
fn tool_result(b: &Value, p: &str) -> Result<(String, String), ApiError> {
    let id = match b.get("tool_use_id") {
        Some(v) => string(v, &format!("{p}.tool_use_id"))?,
        None => return Err(bad(&format!("{p}.tool_use_id"), "field required")),
    };
    let mut content = match b.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (k, part) in parts.iter().enumerate() {
                let pp = format!("{p}.content[{k}]");
                match block_type(part, &pp)? {
                    "text" => text.push_str(&text_of(part, &pp)?),
                    other => return Err(unsupported_block(&pp, other)),
                }
            }
            text
        }
        Some(v) => {
            return Err(bad(
                &format!("{p}.content"),
                format!(
                    "expected a string or a list of text blocks, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    match b.get("is_error") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => content = format!("Error: {content}"),
        Some(v) => {
            return Err(bad(
                &format!("{p}.is_error"),
                format!("expected a boolean, got {}", type_name(v)),
            ))
        }
    }
    Ok((id.to_string(), content))
}

/// A client tool `{name, description, input_schema}` → an OpenAI function tool. The
/// chat pipeline checks the name and compiles the schema.
fn convert_tool(t: &Value, i: usize) -> Result<Value, ApiError> {
    let p = format!("tools[{i}]");
    let t = t
        .as_object()
        .ok_or_else(|| bad(&p, format!("expected a tool object, got {}", type_name(t))))?;
    match field(t, "type")
        .map(|v| string(v, &format!("{p}.type")))
        .transpose()?
    {
        None | Some("custom") => {}
        Some(other) => {
            return Err(bad(
                &format!("{p}.type"),
                format!(
                "tool type `{other}` is not supported (only client tools with an `input_schema`)"
            ),
            ))
        }
    }
    let name = match field(t, "name") {
        Some(v) => string(v, &format!("{p}.name"))?,
        None => return Err(bad(&format!("{p}.name"), "field required")),
    };
    let schema = match field(t, "input_schema") {
        Some(v @ Value::Object(_)) => v.clone(),
        Some(v) => {
            return Err(bad(
                &format!("{p}.input_schema"),
                format!("expected a JSON Schema object, got {}", type_name(v)),
            ))
        }
        None => return Err(bad(&format!("{p}.input_schema"), "field required")),
    };
    let mut function = json!({"name": name, "parameters": schema});
    if let Some(d) = field(t, "description") {
        function["description"] = json!(string(d, &format!("{p}.description"))?);
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice` → OpenAI's, and `parallel_tool_calls` when
/// `disable_parallel_tool_use` is given.
fn convert_tool_choice(tc: &Value, names: &[&str]) -> Result<(Value, Option<bool>), ApiError> {
    let p = "tool_choice";
    let kind = match tc.get("type") {
        Some(t) => string(t, "tool_choice.type")?,
        None if tc.is_object() => return Err(bad("tool_choice.type", "field required")),
        None => return Err(bad(p, format!("expected an object, got {}", type_name(tc)))),
    };
    let parallel = match tc.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(!b),
        Some(v) => {
            return Err(bad(
                "tool_choice.disable_parallel_tool_use",
                format!("expected a boolean, got {}", type_name(v)),
            ))
        }
    };
    let need_tools = |what: &str| {
        if names.is_empty() {
            Err(bad(
                p,
                format!("tool_choice `{what}` needs at least one tool in `tools`"),
            ))
        } else {
            Ok(())
        }
    };
    let choice = match kind {
        "auto" => json!(if names.is_empty() { "none" } else { "auto" }),
        "none" => json!("none"),
        "any" => {
            need_tools("any")?;
            json!("required")
        }
        "tool" => {
            let name = match tc.get("name") {
                Some(n) => string(n, "tool_choice.name")?,
                None => return Err(bad("tool_choice.name", "field required")),
            };
            if !names.contains(&name) {
                return Err(bad(
                    "tool_choice.name",
                    format!("names tool `{name}`, which is not in `tools`"),
                ));
            }
            json!({"type": "function", "function": {"name": name}})
        }
        other => {
            return Err(bad(
                "tool_choice.type",
                format!("expected `auto`, `any`, `tool` or `none`, got `{other}`"),
            ))
        }
    };
    Ok((choice, parallel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(v: Value) -> Result<Value, ApiError> {
        to_chat(&v, None, false)
    }

    #[test]
    fn blocks_become_chat_messages() {
        let chat = msg(json!({
            "max_tokens": 8,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
        }))
        .unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(
            m[0],
            json!({"role": "system", "content": "Be brief.\n\nBe kind."})
        );
        assert_eq!(m[2]["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "And tomorrow?"}));
        assert_eq!(chat["stop"], json!(["END"]));
        assert_eq!(chat["tool_choice"], "required");
        assert_eq!(chat["parallel_tool_calls"], false);
        assert_eq!(
            chat["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn bad_blocks_are_named() {
        let base = |content: Value| {
            json!({"max_tokens": 8, "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}}]},
                {"role": "user", "content": content}
            ]})
        };
        let e = msg(base(
            json!([{"type": "tool_result", "tool_use_id": "toolu_b"}]),
        ))
        .unwrap_err();
        assert!(
            e.message.contains("messages[1].content[0].tool_use_id")
                && e.message.contains("toolu_b"),
            "{e:?}"
        );
        let e = msg(base(json!([{"type": "image", "source": {}}]))).unwrap_err();
        assert!(e.message.contains("`image` are not supported"), "{e:?}");
        let e = msg(base(json!([{"type": "hologram"}]))).unwrap_err();
        assert!(
            e.message
                .contains("unknown or unsupported content block type `hologram`"),
            "{e:?}"
        );
        let e = msg(base(json!([{"text": "no type"}]))).unwrap_err();
        assert!(
            e.message
                .starts_with("messages[1].content[0].type: field required"),
            "{e:?}"
        );
        let e = msg(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap_err();
        assert!(e.message.starts_with("max_tokens: field required"), "{e:?}");
        assert!(to_chat(
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
            None,
            true
        )
        .is_ok());
        let e = msg(json!({"max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}))
            .unwrap_err();
        assert!(e.message.contains("unknown role `system`"), "{e:?}");
        let e = msg(
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tool_choice": {"type": "any"}}),
        )
        .unwrap_err();
        assert!(e.message.contains("needs at least one tool"), "{e:?}");
        let e = msg(
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        )
        .unwrap_err();
        assert!(e.message.contains("not supported"), "{e:?}");
    }
}

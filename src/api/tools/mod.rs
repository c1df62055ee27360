//! Tool calls and structured output on `/v1/chat/completions`: checking `tools`,
//! `tool_choice`, `parallel_tool_calls` and `response_format`, and the grammar that
//! forces a call (`required`, a named function) or JSON. Tools and tool turns in the
//! prompt live in [`prompt`]; [`parse::CallParser`] turns generated text into OpenAI
//! `tool_calls`, the same way for streamed and whole responses.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::engine::decode::grammar::{Grammar, SchemaError};

use super::error::ApiError;

mod parse;
mod prompt;
mod scan;

pub use parse::{assemble, message, Call, CallParser, Piece};
pub use prompt::prompt_messages;

/// Most calls a forced (`required` / named) turn may hold when parallel calls are on.
pub const MAX_PARALLEL_CALLS: u32 = 8;
pub const MAX_TOOLS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(usize),
}

#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    /// The tool as the client sent it (`{"type":"function","function":{…}}`).
    pub raw: Value,
    pub parameters: Value,
}

/// Checked `tools` + `tool_choice` + `parallel_tool_calls`.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

fn schema_err(param: &str, e: SchemaError) -> ApiError {
    let at = if e.path == "/" {
        String::new()
    } else {
        e.path.clone()
    };
    ApiError::invalid(
        &format!("{param}{at}"),
        format!("{param}: {} (at {})", e.message, e.path),
    )
    .with_code("unsupported_schema")
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `tools`, `tool_choice`, `parallel_tool_calls` from the body; None without tools.
pub fn plan(body: &Value) -> Result<Option<ToolPlan>, ApiError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(ApiError::invalid("tools", "tools must be a list")),
    };
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools are allowed, got {}", tools.len()),
        ));
    }
    let mut out: Vec<Tool> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(
                &format!("{p}.type"),
                "only tools of type `function` are supported",
            ));
        }
        let f = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ApiError::invalid(&format!("{p}.function"), "missing `function` object")
            })?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(ApiError::invalid(
                &format!("{p}.function.name"),
                format!("function name must be 1-64 characters of a-z, A-Z, 0-9, '_', '-', got `{name}`"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::invalid(
                &format!("{p}.function.name"),
                format!("duplicate function name `{name}`"),
            ));
        }
        if let Some(d) = f.get("description") {
            if !d.is_string() {
                return Err(ApiError::invalid(
                    &format!("{p}.function.description"),
                    "description must be a string",
                ));
            }
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(v) => v.clone(),
        };
        let pp = format!("{p}.function.parameters");
        if parameters.get("type").and_then(Value::as_str) != Some("object") {
            return Err(ApiError::invalid(
                &pp,
                "function parameters must be a JSON Schema with \"type\": \"object\"",
            ));
        }
        Grammar::from_schema(&parameters).map_err(|e| schema_err(&pp, e))?;
        out.push(Tool {
            name: name.to_string(),
            raw: t.clone(),
            parameters,
        });
    }
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => {
            if out.is_empty() {
                Choice::None
            } else {
                Choice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice must be `none`, `auto`, `required` or a function object, got `{other}`"),
                ))
            }
        },
        Some(v @ Value::Object(_)) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice",
                        "tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            let i = out.iter().position(|t| t.name == name).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names function `{name}`, which is not in tools"),
                )
            })?;
            Choice::Named(i)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be a string or an object",
            ))
        }
    };
    if out.is_empty() && matches!(choice, Choice::Required) {
        return Err(ApiError::invalid(
            "tool_choice",
            "tool_choice `required` needs at least one tool in tools",
        ));
    }
    let parallel = match body.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "parallel_tool_calls must be a boolean",
            ))
        }
    };
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some(ToolPlan {
        tools: out,
        choice,
        parallel,
    }))
}

impl ToolPlan {
    /// Whether the output is parsed for calls.
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// The grammar that forces calls (`required`, a named function).
    pub fn grammar(&self) -> Result<Option<Arc<Grammar>>, ApiError> {
        let (tools, max): (Vec<&Tool>, u32) = match self.choice {
            Choice::None | Choice::Auto => return Ok(None),
            Choice::Required => (
                self.tools.iter().collect(),
                if self.parallel { MAX_PARALLEL_CALLS } else { 1 },
            ),
            Choice::Named(i) => (vec![&self.tools[i]], 1),
        };
        let list: Vec<(String, Value)> = tools
            .iter()
            .map(|t| (t.name.clone(), t.parameters.clone()))
            .collect();
        Grammar::tool_calls(&list, max)
            .map(|g| Some(Arc::new(g)))
            .map_err(|e| schema_err("tools", e))
    }

    /// The tools visible to the model: all, or only the named one.
    fn offered(&self) -> Vec<&Tool> {
        match self.choice {
            Choice::Named(i) => vec![&self.tools[i]],
            _ => self.tools.iter().collect(),
        }
    }
}

/// `response_format` → a grammar (None for `text` or absent).
pub fn response_grammar(body: &Value) -> Result<Option<Arc<Grammar>>, ApiError> {
    let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = rf.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Arc::new(Grammar::json_object()))),
        "json_schema" => {
            let js = rf.get("json_schema").and_then(Value::as_object).ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a `json_schema` object",
                )
            })?;
            match js.get("name").and_then(Value::as_str) {
                Some(n) if valid_name(n) => {}
                _ => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, '_', '-'",
                    ))
                }
            }
            if let Some(s) = js.get("strict") {
                if !s.is_boolean() && !s.is_null() {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.strict",
                        "strict must be a boolean",
                    ));
                }
            }
            let schema = js.get("schema").cloned().unwrap_or(json!({}));
            Grammar::from_schema(&schema)
                .map(|g| Some(Arc::new(g)))
                .map_err(|e| schema_err("response_format.json_schema.schema", e))
        }
        other => Err(ApiError::invalid(
            "response_format.type",
            format!("response_format.type must be `text`, `json_object` or `json_schema`, got `{other}`"),
        )),
    }
}

/// Check the tool parts of `messages` (`tool_call_id`, assistant `tool_calls`).
pub fn check_messages(messages: &[super::types::ChatMessage]) -> Result<(), ApiError> {
    for (i, m) in messages.iter().enumerate() {
        if m.role == "tool" && m.tool_call_id.as_deref().unwrap_or("").is_empty() {
            return Err(ApiError::invalid(
                &format!("messages[{i}].tool_call_id"),
                "messages with role `tool` need a `tool_call_id`",
            ));
        }
        let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) else {
            continue;
        };
        if m.role != "assistant" {
            return Err(ApiError::invalid(
                &format!("messages[{i}].tool_calls"),
                "only assistant messages carry tool_calls",
            ));
        }
        let list = calls.as_array().ok_or_else(|| {
            ApiError::invalid(
                &format!("messages[{i}].tool_calls"),
                "tool_calls must be a list",
            )
        })?;
        for (j, c) in list.iter().enumerate() {
            let f = c.get("function");
            let ok = f.and_then(|f| f.get("name")).is_some_and(Value::is_string)
                && f.and_then(|f| f.get("arguments"))
                    .is_some_and(Value::is_string);
            if !ok {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_calls[{j}]"),
                    "a tool call needs function.name and function.arguments (a JSON string)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

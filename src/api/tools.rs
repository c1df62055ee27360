//! Tool calls and structured output on `/v1/chat/completions`: checking `tools`,
//! `tool_choice`, `parallel_tool_calls` and `response_format`; the grammar that forces
//! a call (`required`, a named function) or JSON; tools and tool turns in the prompt;
//! and [`CallParser`], which turns generated text into OpenAI `tool_calls`, the same
//! way for streamed and whole responses.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::engine::constrain::{CALL_CLOSE, CALL_OPEN};
use crate::engine::grammar::{Grammar, SchemaError};
use crate::engine::TemplateMessage;

use super::error::ApiError;

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

/// A call's arguments as a JSON value (clients send them as a JSON string).
fn call_args(c: &Value) -> Value {
    match c.get("function").and_then(|f| f.get("arguments")) {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(v) => v.clone(),
        None => json!({}),
    }
}

/// `{"name": …, "arguments": …}` with the name first, as the model should write it.
fn call_text(c: &Value) -> String {
    let name = c
        .get("function")
        .and_then(|f| f.get("name"))
        .cloned()
        .unwrap_or(Value::Null);
    format!("{{\"name\": {name}, \"arguments\": {}}}", call_args(c))
}

/// Messages and `tools` for the template. A template that renders tools itself gets
/// them (and calls with their arguments as objects, as HF templates expect); for one
/// that does not, the tools go into the system prompt, earlier calls become
/// `<tool_call>` text and tool results `<tool_response>` user turns.
pub fn prompt_messages(
    mut msgs: Vec<TemplateMessage>,
    plan: Option<&ToolPlan>,
    template_handles_tools: bool,
) -> (Vec<TemplateMessage>, Option<Value>) {
    if template_handles_tools {
        for m in &mut msgs {
            if let Some(Value::Array(calls)) = &m.tool_calls {
                let conv: Vec<Value> = calls
                    .iter()
                    .map(|c| {
                        let mut c = c.clone();
                        let args = call_args(&c);
                        if let Some(f) = c.get_mut("function") {
                            f["arguments"] = args;
                        }
                        c
                    })
                    .collect();
                m.tool_calls = Some(Value::Array(conv));
            }
        }
        let tools = plan
            .filter(|p| p.active())
            .map(|p| Value::Array(p.offered().iter().map(|t| t.raw.clone()).collect()));
        return (msgs, tools);
    }
    let mut out: Vec<TemplateMessage> = Vec::new();
    for mut m in msgs {
        if let Some(Value::Array(calls)) = m.tool_calls.take() {
            for c in calls {
                if !m.content.is_empty() {
                    m.content.push('\n');
                }
                m.content
                    .push_str(&format!("<tool_call>\n{}\n</tool_call>", call_text(&c)));
            }
        }
        if m.role == "tool" {
            let text = format!("<tool_response>\n{}\n</tool_response>", m.content);
            match out.last_mut() {
                Some(prev) if prev.role == "user" && prev.content.ends_with("</tool_response>") => {
                    prev.content.push('\n');
                    prev.content.push_str(&text);
                }
                _ => out.push(TemplateMessage {
                    role: "user".into(),
                    content: text,
                    name: None,
                    tool_call_id: None,
                    tool_calls: None,
                }),
            }
            continue;
        }
        m.tool_call_id = None;
        out.push(m);
    }
    if let Some(p) = plan.filter(|p| p.active()) {
        let mut sys = String::from(
            "You can call functions (tools). Here they are, as JSON Schema signatures:\n<tools>\n",
        );
        for t in p.offered() {
            let f = &t.raw["function"];
            let desc = f.get("description").cloned().unwrap_or(Value::Null);
            sys.push_str(&format!(
                "{{\"name\": {}, \"description\": {desc}, \"parameters\": {}}}",
                json!(t.name),
                t.parameters
            ));
            sys.push('\n');
        }
        sys.push_str(
            "</tools>\nTo call a function, answer with one block per call, exactly like this:\n\
             <tool_call>\n{\"name\": \"<function name>\", \"arguments\": {<arguments as JSON>}}\n</tool_call>\n\
             Function results come back inside <tool_response></tool_response>. \
             When no call is needed, answer normally.",
        );
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{sys}", first.content);
            }
            _ => out.insert(
                0,
                TemplateMessage {
                    role: "system".into(),
                    content: sys,
                    name: None,
                    tool_call_id: None,
                    tool_calls: None,
                },
            ),
        }
    }
    (out, None)
}

/// A parsed call, ready for `message.tool_calls`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl Call {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// What the parser lets out.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    Call(Call),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Only whitespace so far (held).
    Start,
    /// Plain text; a `<tool_call>` may still come (a possible prefix is held).
    Text,
    /// Inside `<tool_call>` blocks (the buffer starts at one).
    Blocks,
    /// A bare JSON answer that may be a call (held to the end).
    Bare,
    /// All the calls allowed were made; the rest is dropped.
    Done,
}

/// Incremental tool-call parser over the generated text. The same pieces come out
/// whether the text arrives token by token or at once.
pub struct CallParser {
    names: Vec<String>,
    max_calls: usize,
    buf: String,
    mode: Mode,
    calls: usize,
    /// Call ids come from the response id so that a request's ids are stable.
    id_base: String,
}

fn open_str() -> &'static str {
    std::str::from_utf8(CALL_OPEN).unwrap_or("<tool_call>")
}

fn close_str() -> &'static str {
    std::str::from_utf8(CALL_CLOSE).unwrap_or("</tool_call>")
}

impl CallParser {
    pub fn new(plan: &ToolPlan, response_id: &str) -> Self {
        let max_calls = if plan.parallel { usize::MAX } else { 1 };
        let tail = response_id.rsplit('-').next().unwrap_or(response_id);
        Self {
            names: plan.offered().iter().map(|t| t.name.clone()).collect(),
            max_calls,
            buf: String::new(),
            mode: Mode::Start,
            calls: 0,
            id_base: format!("call_{}", &tail[..tail.len().min(20)]),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls
    }

    fn call_from(&mut self, v: &Value) -> Option<Call> {
        let name = v.get("name")?.as_str()?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let args = match v.get("arguments").or_else(|| v.get("parameters")) {
            None => "{}".to_string(),
            Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
            Some(a) if a.is_object() => a.to_string(),
            Some(_) => return None,
        };
        Some(Call {
            id: format!("{}{}", self.id_base, self.calls),
            name: name.to_string(),
            arguments: args,
        })
    }

    /// Add generated text; returns what can be let out now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.drain(false, &mut out);
        out
    }

    /// The end of generation: everything still held.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.drain(true, &mut out);
        out
    }

    fn drain(&mut self, end: bool, out: &mut Vec<Piece>) {
        loop {
            match self.mode {
                Mode::Start => {
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        if end {
                            self.buf.clear();
                        }
                        return;
                    }
                    if t.starts_with(open_str()) {
                        self.buf = t.to_string();
                        self.mode = Mode::Blocks;
                    } else if (open_str().starts_with(t) || "```".starts_with(t)) && !end {
                        return;
                    } else if t.starts_with('{') || t.starts_with('[') || t.starts_with("```") {
                        self.mode = Mode::Bare;
                    } else {
                        self.mode = Mode::Text;
                    }
                }
                Mode::Text => {
                    if let Some(at) = self
                        .buf
                        .find(open_str())
                        .filter(|_| self.calls < self.max_calls)
                    {
                        let before: String = self.buf.drain(..at).collect();
                        if !before.is_empty() {
                            out.push(Piece::Content(before));
                        }
                        self.mode = Mode::Blocks;
                        continue;
                    }
                    // Hold a suffix that may grow into `<tool_call>`.
                    let hold = if end {
                        0
                    } else {
                        (1..open_str().len())
                            .rev()
                            .find(|&k| self.buf.ends_with(&open_str()[..k]))
                            .unwrap_or(0)
                    };
                    let cut = self.buf.len() - hold;
                    if cut > 0 {
                        out.push(Piece::Content(self.buf.drain(..cut).collect()));
                    }
                    return;
                }
                Mode::Blocks => {
                    // buf starts (after whitespace) with `<tool_call>` or is the tail.
                    let t = self.buf.trim_start();
                    if t.is_empty() {
                        self.buf.clear();
                        return;
                    }
                    if !t.starts_with(open_str()) {
                        if open_str().starts_with(t) && !end {
                            return;
                        }
                        // Text after the calls is not part of the answer.
                        self.buf.clear();
                        return;
                    }
                    let body = &t[open_str().len()..];
                    if body.trim().is_empty() && !end {
                        return;
                    }
                    let mut it = serde_json::Deserializer::from_str(body).into_iter::<Value>();
                    match it.next() {
                        Some(Ok(v)) => {
                            let rest = &body[it.byte_offset()..];
                            let r = rest.trim_start();
                            let used = if r.starts_with(close_str()) {
                                body.len() - r.len() + close_str().len()
                            } else if close_str().starts_with(r) && !end {
                                return; // the closing tag may still come
                            } else {
                                it.byte_offset() // no closing tag: accept the call as is
                            };
                            let consumed = self.buf.len() - t.len() + open_str().len() + used;
                            let raw: String = self.buf.drain(..consumed).collect();
                            match self.call_from(&v) {
                                Some(c) if self.calls < self.max_calls => {
                                    self.calls += 1;
                                    out.push(Piece::Call(c));
                                }
                                _ => out.push(Piece::Content(raw)),
                            }
                            if self.calls >= self.max_calls {
                                self.buf.clear();
                                self.mode = Mode::Done;
                                return;
                            }
                        }
                        Some(Err(e)) if e.is_eof() && !end => return,
                        _ => {
                            // Not JSON after all: it is text.
                            if end || !self.buf.is_empty() {
                                out.push(Piece::Content(std::mem::take(&mut self.buf)));
                            }
                            self.mode = Mode::Text;
                            return;
                        }
                    }
                }
                Mode::Done => {
                    self.buf.clear();
                    return;
                }
                Mode::Bare => {
                    if !end {
                        return;
                    }
                    let text = std::mem::take(&mut self.buf);
                    let mut t = text.trim();
                    if let Some(x) = t.strip_prefix("```json").or_else(|| t.strip_prefix("```")) {
                        t = x.trim_start();
                        t = t.strip_suffix("```").unwrap_or(t).trim_end();
                    }
                    let calls: Option<Vec<Call>> = match serde_json::from_str::<Value>(t) {
                        Ok(Value::Array(vs)) if !vs.is_empty() => {
                            let mut cs = Vec::new();
                            for v in vs.iter().take(self.max_calls) {
                                let c = self.call_from(v);
                                self.calls += usize::from(c.is_some());
                                cs.push(c);
                            }
                            cs.into_iter().collect()
                        }
                        Ok(v @ Value::Object(_)) => self.call_from(&v).map(|c| {
                            self.calls += 1;
                            vec![c]
                        }),
                        _ => None,
                    };
                    match calls {
                        Some(cs) => out.extend(cs.into_iter().map(Piece::Call)),
                        None => {
                            self.calls = 0;
                            out.push(Piece::Content(text));
                        }
                    }
                    return;
                }
            }
        }
    }
}

/// Streaming deltas for one call: the id and name first, then the arguments in pieces.
pub fn call_deltas(index: usize, c: &Call) -> Vec<Value> {
    let mut v = vec![json!({"index": index, "id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": ""}})];
    let chars: Vec<char> = c.arguments.chars().collect();
    for part in chars.chunks(16) {
        v.push(json!({"index": index, "function": {"arguments": part.iter().collect::<String>()}}));
    }
    v
}

/// The `message` object of a whole response.
pub fn message(content: String, calls: &[Call]) -> Value {
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    if calls.is_empty() {
        m.insert("content".into(), json!(content));
    } else {
        let c = content.trim();
        m.insert(
            "content".into(),
            if c.is_empty() {
                Value::Null
            } else {
                json!(content)
            },
        );
        m.insert(
            "tool_calls".into(),
            Value::Array(calls.iter().map(Call::to_json).collect()),
        );
    }
    Value::Object(m)
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;

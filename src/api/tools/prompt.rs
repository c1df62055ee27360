//! Tools and tool turns in the prompt: for templates that render tools themselves,
//! calls get their arguments as objects; for others, the tools go into the system
//! prompt and calls/results become `<tool_call>` / `<tool_response>` text.

use serde_json::{json, Value};

use crate::engine::TemplateMessage;

use super::ToolPlan;

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

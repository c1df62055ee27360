//! Chat templates come from model files, so they are untrusted input too: any template
//! source and any conversation must render or fail cleanly, in bounded time (fuel).
#![no_main]

use candela::engine::text::template::{ChatTemplate, TemplateMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // "<template>\0<messages as JSON>" (a missing part gets a fixed conversation).
    let (source, rest) = text.split_once('\0').unwrap_or((&text, ""));
    let Ok(t) = ChatTemplate::new(source, "<s>", "</s>") else {
        return;
    };
    let msgs: Vec<TemplateMessage> = serde_json::from_str::<Vec<serde_json::Value>>(rest)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            Some(TemplateMessage {
                role: m.get("role")?.as_str()?.to_string(),
                content: m.get("content")?.as_str()?.to_string(),
                name: None,
                tool_call_id: None,
                tool_calls: m.get("tool_calls").cloned(),
            })
        })
        .collect();
    let msgs = if msgs.is_empty() {
        vec![TemplateMessage {
            role: "user".into(),
            content: "hi".into(),
            name: None,
            tool_call_id: None,
            tool_calls: None,
        }]
    } else {
        msgs
    };
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let _ = t.render(&msgs, Some(&tools), true);
    let _ = t.render(&msgs, None, false);
});

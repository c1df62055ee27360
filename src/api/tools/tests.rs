use super::*;
use crate::engine::TemplateMessage;
use serde_json::json;

fn plan_of(body: Value) -> Result<Option<ToolPlan>, ApiError> {
    plan(&body)
}

fn weather_plan(parallel: bool) -> ToolPlan {
    plan_of(json!({
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
        ],
        "parallel_tool_calls": parallel
    }))
    .unwrap()
    .unwrap()
}

/// Feed the text in pieces of `step` bytes (on char boundaries) and collect.
fn run(p: &mut CallParser, text: &str, step: usize) -> Vec<Piece> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    for part in chars.chunks(step) {
        out.extend(p.push(&part.iter().collect::<String>()));
    }
    out.extend(p.finish());
    // Merge adjacent pieces of a kind so chunkings compare equal.
    let mut merged: Vec<Piece> = Vec::new();
    for x in out {
        match (merged.last_mut(), x) {
            (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
            (Some(Piece::Args { index: i, text: a }), Piece::Args { index: j, text: b })
                if *i == j =>
            {
                a.push_str(&b)
            }
            (_, x) => merged.push(x),
        }
    }
    merged
}

fn parse_all(text: &str, parallel: bool) -> Vec<Piece> {
    let plan = weather_plan(parallel);
    let whole = run(
        &mut CallParser::new(&plan, "chatcmpl-abc"),
        text,
        usize::MAX,
    );
    for step in [1, 2, 3, 7] {
        let parts = run(&mut CallParser::new(&plan, "chatcmpl-abc"), text, step);
        assert_eq!(parts, whole, "step {step} on {text:?}");
    }
    whole
}

fn names(p: &[Piece]) -> Vec<String> {
    let (_, calls) = assemble(p.to_vec());
    calls
        .iter()
        .map(|c| format!("{}{}", c.name, c.arguments))
        .collect()
}

fn is_call(p: &Piece) -> bool {
    !matches!(p, Piece::Content(_))
}

#[test]
fn qwen_blocks_and_several_calls() {
    let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let p = parse_all(t, true);
    assert_eq!(
        names(&p),
        vec!["get_weather{\"city\":\"Paris\"}", "get_time{}"]
    );
    assert!(p.iter().all(is_call));
    // Not parallel: the first call only.
    assert_eq!(names(&parse_all(t, false)).len(), 1);
}

#[test]
fn bare_json_and_fenced_json() {
    let p = parse_all(
        "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}",
        true,
    );
    assert_eq!(names(&p), vec!["get_weather{\"city\":\"Rome\"}"]);
    let p = parse_all(
        "```json\n{\"name\": \"get_time\", \"parameters\": {}}\n```",
        true,
    );
    assert_eq!(names(&p), vec!["get_time{}"]);
    let p = parse_all("[{\"name\": \"get_time\", \"arguments\": {}}, {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}]", true);
    assert_eq!(names(&p).len(), 2);
}

#[test]
fn text_and_unknown_tools_stay_text() {
    let p = parse_all("The weather is fine.", true);
    assert_eq!(p, vec![Piece::Content("The weather is fine.".into())]);
    let t = "{\"name\": \"launch_rockets\", \"arguments\": {}}";
    assert_eq!(parse_all(t, true), vec![Piece::Content(t.into())]);
    let t = "{\"a\": 1}";
    assert_eq!(parse_all(t, true), vec![Piece::Content(t.into())]);
    let p = parse_all(
        "Let me check. <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        true,
    );
    assert_eq!(p[0], Piece::Content("Let me check. ".into()));
    assert_eq!(names(&p), vec!["get_time{}"]);
    // A tag-like text that is not a call.
    let p = parse_all("use <tool> here", true);
    assert_eq!(p, vec![Piece::Content("use <tool> here".into())]);
}

#[test]
fn closing_tag_inside_a_string_does_not_cut_the_call() {
    let t = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a</tool_call>b\"}}</tool_call>";
    assert_eq!(
        names(&parse_all(t, true)),
        vec!["get_weather{\"city\":\"a</tool_call>b\"}"]
    );
}

#[test]
fn bad_tools_are_rejected_with_the_param() {
    let e = plan_of(json!({"tools": [{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}}}}]}))
    .unwrap_err();
    assert_eq!(
        e.param.as_deref(),
        Some("tools[0].function.parameters/properties/x/pattern")
    );
    assert!(e.message.contains("pattern"), "{}", e.message);
    let e = plan_of(
        json!({"tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "g"}}}),
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tool_choice"));
    let e = plan_of(json!({"tool_choice": "required"})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tool_choice"));
    let e = plan_of(json!({"tools": [{"type": "retrieval"}]})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tools[0].type"));
    let e = plan_of(json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}))
        .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
    let e = response_grammar(&json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "patternProperties": {}}}}}))
    .unwrap_err();
    assert!(e.message.contains("patternProperties"));
}

#[test]
fn prompt_without_template_tools_support() {
    let plan = weather_plan(true);
    let msgs = vec![
        TemplateMessage {
            role: "user".into(),
            content: "Weather in Paris?".into(),
            name: None,
            tool_call_id: None,
            tool_calls: None,
        },
        TemplateMessage {
            role: "assistant".into(),
            content: String::new(),
            name: None,
            tool_call_id: None,
            tool_calls: Some(
                json!([{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
            ),
        },
        TemplateMessage {
            role: "tool".into(),
            content: "sunny".into(),
            name: None,
            tool_call_id: Some("call_1".into()),
            tool_calls: None,
        },
    ];
    let (out, tools) = prompt_messages(msgs.clone(), Some(&plan), false);
    assert!(tools.is_none());
    assert_eq!(out[0].role, "system");
    assert!(out[0].content.contains("get_weather") && out[0].content.contains("<tool_call>"));
    assert_eq!(out[2].content, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>");
    assert_eq!(out[3].role, "user");
    assert_eq!(out[3].content, "<tool_response>\nsunny\n</tool_response>");
    let (out, tools) = prompt_messages(msgs, Some(&plan), true);
    assert_eq!(tools.unwrap().as_array().unwrap().len(), 2);
    assert_eq!(
        out[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
        json!({"city": "Paris"})
    );
}

/// Pieces let out by each push when `text` arrives in `step`-char pieces (finish last).
fn per_push(text: &str, step: usize) -> Vec<Vec<Piece>> {
    let plan = weather_plan(true);
    let mut p = CallParser::new(&plan, "chatcmpl-abc");
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<Vec<Piece>> = chars
        .chunks(step)
        .map(|part| p.push(&part.iter().collect::<String>()))
        .collect();
    out.push(p.finish());
    out
}

#[test]
fn the_name_goes_out_when_complete_then_the_arguments_as_they_come() {
    let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>";
    let pushes = per_push(t, 1);
    // The push that completes the name's closing quote lets the call start out.
    let at = t.find("get_weather\"").unwrap() + "get_weather\"".len() - 1;
    assert_eq!(
        pushes[at],
        vec![Piece::Start {
            index: 0,
            id: "call_abc0".into(),
            name: "get_weather".into()
        }]
    );
    assert!(pushes[..at].iter().all(Vec::is_empty));
    let frags: Vec<&str> = pushes
        .iter()
        .flatten()
        .filter_map(|p| match p {
            Piece::Args { index: 0, text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(frags.len() > 10, "{frags:?}");
    assert_eq!(frags.concat(), "{\"city\":\"Paris\",\"days\":[1,2]}");
    // Whitespace inside strings stays; outside, it goes.
    let t = "{\"name\": \"get_weather\",\n \"arguments\": {\n  \"city\" : \"New  York\"\n}\n}";
    assert_eq!(
        names(&parse_all(t, true)),
        vec!["get_weather{\"city\":\"New  York\"}"]
    );
}

#[test]
fn text_is_not_held_and_json_is_decided_early() {
    let pushes = per_push("Hello there", 1);
    assert_eq!(pushes[0], vec![Piece::Content("H".into())]);
    // Held only while it may still be `<tool_call>`.
    let pushes = per_push("a <to b", 1);
    assert_eq!(pushes[1], vec![Piece::Content(" ".into())]);
    assert!(pushes[2].is_empty() && pushes[4].is_empty());
    assert_eq!(pushes[5], vec![Piece::Content("<to ".into())]);
    // A JSON answer whose first key is not a call's is content from that key on.
    let t = "{\"answer\": 42, \"name\": \"get_time\"}";
    let pushes = per_push(t, 1);
    let key_end = "{\"answer\"".len() - 1;
    assert_eq!(pushes[key_end], vec![Piece::Content("{\"answer\"".into())]);
    assert_eq!(parse_all(t, true), vec![Piece::Content(t.into())]);
    // A fence of another language is content at once.
    assert_eq!(per_push("```py", 1)[3], vec![Piece::Content("```p".into())]);
}

#[test]
fn odd_but_real_call_shapes() {
    // Arguments before the name: they go out with the start.
    let p = parse_all(
        "{\"arguments\": {\"city\": \"Rome\"}, \"name\": \"get_weather\"}",
        true,
    );
    assert_eq!(names(&p), vec!["get_weather{\"city\":\"Rome\"}"]);
    // No arguments at all.
    let p = parse_all("<tool_call>{\"name\": \"get_time\"}</tool_call>", true);
    assert_eq!(names(&p), vec!["get_time{}"]);
    // A missing closing brace before the closing tag still closes the call.
    let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    assert_eq!(
        names(&parse_all(t, true)),
        vec!["get_weather{\"city\":\"Oslo\"}", "get_time{}"]
    );
    // Cut short by max_tokens: the call keeps what it has.
    let p = parse_all(
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
        true,
    );
    assert_eq!(names(&p), vec!["get_weather{\"ci"]);
    // Text after the calls is not part of the answer.
    let p = parse_all(
        "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call> Done!",
        true,
    );
    assert!(p.iter().all(is_call), "{p:?}");
    // A fenced list.
    let p = parse_all("```json\n[{\"name\": \"get_time\", \"arguments\": {}},\n {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}]\n```", true);
    assert_eq!(
        names(&p),
        vec!["get_time{}", "get_weather{\"city\":\"Lima\"}"]
    );
    // Whitespace before a call is dropped; before text, kept.
    assert!(
        parse_all("\n\n<tool_call>{\"name\": \"get_time\"}</tool_call>", true)
            .iter()
            .all(is_call)
    );
    assert_eq!(
        parse_all("\n Hi", true),
        vec![Piece::Content("\n Hi".into())]
    );
}

#[test]
fn deltas_are_openai_shaped() {
    let s = Piece::Start {
        index: 1,
        id: "call_x1".into(),
        name: "f".into(),
    };
    assert_eq!(
        wire(s.delta()),
        json!({"tool_calls": [{"index": 1, "id": "call_x1", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]})
    );
    let a = Piece::Args {
        index: 1,
        text: "{\"a\"".into(),
    };
    assert_eq!(
        wire(a.delta()),
        json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"a\""}}]})
    );
    assert_eq!(
        wire(Piece::Content("hi".into()).delta()),
        json!({"content": "hi"})
    );
}

/// As the response body carries it.
fn wire(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn messages_are_openai_shaped() {
    let call = Call {
        id: "call_1".into(),
        name: "f".into(),
        arguments: "{}".into(),
    };
    assert_eq!(
        wire(message(" \n".into(), vec![call.clone()])),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
    );
    assert_eq!(
        wire(message("Sure.".into(), vec![call]))["content"],
        "Sure."
    );
    assert_eq!(
        wire(message(" ".into(), vec![])),
        json!({"role": "assistant", "content": " "})
    );
}

//! Generated text → `output` items and the stream events that build them, one path
//! for streamed and whole responses. Text goes through the chat pipeline's
//! [`CallParser`] when tools are active; its pieces open, extend and close items: a
//! `message` (`output_item.added`, `content_part.added`, `output_text.delta`…,
//! `output_text.done`, `content_part.done`, `output_item.done`) or a `function_call`
//! (`output_item.added`, `function_call_arguments.delta`…, `.done`,
//! `output_item.done`). Every event carries the next `sequence_number`.

use serde_json::{json, Value};

use super::super::tools::{CallParser, Piece, ToolPlan};
use super::types::{OutputItem, OutputText};

/// The response an output item id (`msg_<uid>_<n>`, `fc_<uid>_<n>`) came from, as
/// `resp_<uid>`: a client that sends its whole history back (the Agents SDK does)
/// names the response, and so the session, its conversation continues.
pub fn response_of_item(item_id: &str) -> Option<String> {
    let rest = item_id
        .strip_prefix("msg_")
        .or_else(|| item_id.strip_prefix("fc_"))?;
    let (uid, n) = rest.split_once('_')?;
    let ok = uid.len() == 32
        && uid.bytes().all(|b| b.is_ascii_hexdigit())
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| format!("resp_{uid}"))
}

/// The item being written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Text,
    Call,
}

pub struct Output {
    /// The response's uid, in its item ids.
    uid: String,
    parser: Option<CallParser>,
    items: Vec<OutputItem>,
    open: Open,
    /// Leading whitespace not yet shown: before a call it is dropped (as chat drops
    /// whitespace-only content next to calls), before text it goes out with it.
    held: String,
    seq: u64,
}

impl Output {
    /// `uid` is the response's (its id is `resp_<uid>`): item ids carry it, and it
    /// seeds the call ids (`call_…`).
    pub fn new(tools: Option<&ToolPlan>, uid: &str) -> Self {
        Self {
            uid: uid.to_string(),
            parser: tools.map(|p| CallParser::new(p, uid)),
            items: Vec::new(),
            open: Open::None,
            held: String::new(),
            seq: 0,
        }
    }

    /// An event of `kind` with `fields` and the next sequence number.
    pub fn event(&mut self, kind: &str, fields: Value) -> Value {
        let mut ev = json!({"type": kind, "sequence_number": self.seq});
        self.seq += 1;
        if let (Some(ev), Value::Object(f)) = (ev.as_object_mut(), fields) {
            ev.extend(f);
        }
        ev
    }

    /// Generated text; the events it makes.
    pub fn text(&mut self, text: &str) -> Vec<Value> {
        let pieces = match self.parser.as_mut() {
            Some(p) => p.push(text),
            None => vec![Piece::Content(text.to_string())],
        };
        let mut out = Vec::new();
        for p in pieces {
            self.piece(p, &mut out);
        }
        out
    }

    /// The end of generation (`incomplete`: cut by `max_output_tokens`); the events
    /// that close what is open.
    pub fn finish(&mut self, incomplete: bool) -> Vec<Value> {
        let mut out = Vec::new();
        let rest = self.parser.as_mut().map(CallParser::finish);
        for p in rest.into_iter().flatten() {
            self.piece(p, &mut out);
        }
        if self.items.is_empty() {
            // Nothing but (maybe) whitespace: still one message, as OpenAI answers.
            self.open_text(&mut out);
        }
        self.close(
            if incomplete {
                "incomplete"
            } else {
                "completed"
            },
            &mut out,
        );
        out
    }

    pub fn items(&self) -> &[OutputItem] {
        &self.items
    }

    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}_{}", self.uid, self.items.len())
    }

    fn index(&self) -> usize {
        self.items.len().saturating_sub(1)
    }

    fn item_value(&self) -> Value {
        self.items
            .last()
            .and_then(|i| serde_json::to_value(i).ok())
            .unwrap_or(Value::Null)
    }

    fn item_id(&self) -> String {
        match self.items.last() {
            Some(OutputItem::Message { id, .. } | OutputItem::FunctionCall { id, .. }) => {
                id.clone()
            }
            None => String::new(),
        }
    }

    fn piece(&mut self, p: Piece, out: &mut Vec<Value>) {
        match p {
            Piece::Content(t) if t.is_empty() => {}
            Piece::Content(t) => {
                if self.open != Open::Text {
                    if t.chars().all(char::is_whitespace) {
                        self.held.push_str(&t);
                        return;
                    }
                    self.close("completed", out);
                    self.open_text(out);
                }
                self.delta_text(t, out);
            }
            Piece::Start { id, name, .. } => {
                self.held.clear();
                self.close("completed", out);
                self.items.push(OutputItem::FunctionCall {
                    id: self.new_id("fc"),
                    call_id: id,
                    name,
                    arguments: String::new(),
                    status: "in_progress",
                });
                self.open = Open::Call;
                let (i, item) = (self.index(), self.item_value());
                let ev = self.event(
                    "response.output_item.added",
                    json!({"output_index": i, "item": item}),
                );
                out.push(ev);
            }
            Piece::Args { text, .. } if text.is_empty() => {}
            Piece::Args { text, .. } => {
                if let Some(OutputItem::FunctionCall { arguments, .. }) = self.items.last_mut() {
                    arguments.push_str(&text);
                }
                let (i, id) = (self.index(), self.item_id());
                let ev = self.event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": i, "delta": text}),
                );
                out.push(ev);
            }
        }
    }

    fn open_text(&mut self, out: &mut Vec<Value>) {
        self.items.push(OutputItem::Message {
            id: self.new_id("msg"),
            role: "assistant",
            status: "in_progress",
            content: Vec::new(),
        });
        self.open = Open::Text;
        let (i, item, id) = (self.index(), self.item_value(), self.item_id());
        let ev = self.event(
            "response.output_item.added",
            json!({"output_index": i, "item": item}),
        );
        out.push(ev);
        if let Some(OutputItem::Message { content, .. }) = self.items.last_mut() {
            content.push(OutputText::new(String::new()));
        }
        let ev = self.event(
            "response.content_part.added",
            json!({"item_id": id, "output_index": i, "content_index": 0,
                   "part": OutputText::new(String::new())}),
        );
        out.push(ev);
        let held = std::mem::take(&mut self.held);
        self.delta_text(held, out);
    }

    fn delta_text(&mut self, t: String, out: &mut Vec<Value>) {
        if t.is_empty() {
            return;
        }
        if let Some(OutputItem::Message { content, .. }) = self.items.last_mut() {
            if let Some(part) = content.last_mut() {
                part.text.push_str(&t);
            }
        }
        let (i, id) = (self.index(), self.item_id());
        let ev = self.event(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": i, "content_index": 0,
                   "delta": t, "logprobs": []}),
        );
        out.push(ev);
    }

    /// Close the open item with `status`.
    fn close(&mut self, status: &'static str, out: &mut Vec<Value>) {
        let open = std::mem::replace(&mut self.open, Open::None);
        let (i, id) = (self.index(), self.item_id());
        match (open, self.items.last_mut()) {
            (
                Open::Text,
                Some(OutputItem::Message {
                    status: s, content, ..
                }),
            ) => {
                *s = status;
                let text = content.last().map(|p| p.text.clone()).unwrap_or_default();
                let ev = self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0,
                           "text": text, "logprobs": []}),
                );
                out.push(ev);
                let ev = self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0,
                           "part": OutputText::new(text)}),
                );
                out.push(ev);
            }
            (
                Open::Call,
                Some(OutputItem::FunctionCall {
                    status: s,
                    arguments,
                    name,
                    ..
                }),
            ) => {
                *s = status;
                let (arguments, name) = (arguments.clone(), name.clone());
                let ev = self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": i, "name": name,
                           "arguments": arguments}),
                );
                out.push(ev);
            }
            _ => return,
        }
        let item = self.item_value();
        let ev = self.event(
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        );
        out.push(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tools;

    fn types(evs: &[Value]) -> Vec<&str> {
        evs.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    const UID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn item_ids_name_their_response() {
        let mut o = Output::new(None, UID);
        o.text("hi");
        o.finish(false);
        let OutputItem::Message { id, .. } = &o.items()[0] else {
            panic!("{:?}", o.items())
        };
        assert_eq!(response_of_item(id), Some(format!("resp_{UID}")));
        assert_eq!(
            response_of_item(&format!("fc_{UID}_12")),
            Some(format!("resp_{UID}"))
        );
        for other in [
            "msg_abc_1",
            "fc_x",
            "rs_0123",
            &format!("msg_{UID}_"),
            &format!("call_{UID}_1"),
        ] {
            assert_eq!(response_of_item(other), None, "{other}");
        }
    }

    #[test]
    fn text_streams_as_one_message_with_numbered_events() {
        let mut o = Output::new(None, UID);
        let mut evs = o.text("\n");
        assert!(evs.is_empty(), "leading whitespace is held");
        evs.extend(o.text("Hello"));
        evs.extend(o.text(" world"));
        evs.extend(o.finish(false));
        assert_eq!(
            types(&evs),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
            ]
        );
        let seqs: Vec<u64> = evs
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..8).collect::<Vec<_>>());
        assert_eq!(evs[5]["text"], "\nHello world");
        assert_eq!(evs[7]["item"]["status"], "completed");
        assert_eq!(evs[7]["item"]["content"][0]["text"], "\nHello world");
        assert!(evs[7]["item"]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(o.items().len(), 1);
    }

    #[test]
    fn empty_output_is_one_empty_message_and_a_cut_one_is_incomplete() {
        let mut o = Output::new(None, UID);
        let evs = o.finish(true);
        assert_eq!(evs.last().unwrap()["item"]["status"], "incomplete");
        assert_eq!(evs.last().unwrap()["item"]["content"][0]["text"], "");
    }

    #[test]
    fn calls_become_function_call_items() {
        let body = json!({"tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required"});
        let plan = tools::plan(&body).unwrap().unwrap();
        let mut o = Output::new(Some(&plan), UID);
        let mut evs = o.text("  <tool_call>\n{\"name\": \"get_weather\", \"arguments\": ");
        evs.extend(o.text("{\"city\": \"Paris\"}}\n</tool_call>"));
        evs.extend(o.finish(false));
        let t = types(&evs);
        assert_eq!(t[0], "response.output_item.added");
        assert!(
            t.contains(&"response.function_call_arguments.delta"),
            "{t:?}"
        );
        assert_eq!(t[t.len() - 2], "response.function_call_arguments.done");
        let done = evs.last().unwrap();
        assert_eq!(done["item"]["type"], "function_call");
        assert_eq!(done["item"]["name"], "get_weather");
        assert_eq!(done["item"]["arguments"], "{\"city\":\"Paris\"}");
        assert!(done["item"]["call_id"]
            .as_str()
            .unwrap()
            .starts_with("call_"));
        assert!(done["item"]["id"].as_str().unwrap().starts_with("fc_"));
        assert_eq!(o.items().len(), 1, "the leading whitespace made no message");
    }
}

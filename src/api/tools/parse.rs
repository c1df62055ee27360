//! [`CallParser`]: generated text → content and tool calls, one character at a time,
//! so a streamed call goes out as it is written: its id and name as soon as the name
//! is complete (and names one of the tools), then its arguments as they come.
//!
//! What models write: Qwen's `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
//! blocks (one or several; what constrained decoding produces too), or a bare JSON
//! object / list of objects naming a tool, optionally in a ```json fence.
//!
//! The arguments string is the model's own JSON text with the whitespace outside
//! strings left out (no re-serialisation: keys, numbers and escapes stay as written),
//! so the streamed fragments concatenate to exactly the string a whole response
//! carries. Text that cannot be a call goes out as content at once; only a possible
//! `<tool_call>` prefix, or a JSON object until its first key (or its name) says
//! whether it is a call, is held. Once a call has begun, the rest of the turn outside
//! calls is dropped, and a call cut short (max_tokens) keeps what it has.

use crate::engine::decode::constrain::{CALL_CLOSE, CALL_OPEN};

use super::super::types::{
    AssistantMessage, ChatDelta, FunctionCall, FunctionDelta, ToolCall, ToolCallDelta,
};
use super::scan::{is_ws, Cx, Obj, Step};
use super::ToolPlan;

/// A parsed call, ready for `message.tool_calls`.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl From<Call> for ToolCall {
    fn from(c: Call) -> Self {
        ToolCall {
            id: c.id,
            kind: "function",
            function: FunctionCall {
                name: c.name,
                arguments: c.arguments,
            },
        }
    }
}

/// What the parser lets out.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// A call begins: its name is complete and names a tool.
    Start {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the arguments of call `index`.
    Args {
        index: usize,
        text: String,
    },
}

impl Piece {
    /// The chat-completion chunk `delta` for this piece, as OpenAI streams it.
    pub fn delta(&self) -> ChatDelta {
        let call = match self {
            Piece::Content(t) => return ChatDelta::content(t.as_str()),
            Piece::Start { index, id, name } => ToolCallDelta {
                index: *index,
                id: Some(id.clone()),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name.clone()),
                    arguments: String::new(),
                },
            },
            Piece::Args { index, text } => ToolCallDelta {
                index: *index,
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments: text.clone(),
                },
            },
        };
        ChatDelta {
            tool_calls: Some(vec![call]),
            ..ChatDelta::default()
        }
    }
}

/// Add a piece, merging it into the last one when both are content, or both are
/// arguments of the same call.
pub(super) fn put(out: &mut Vec<Piece>, p: Piece) {
    match (out.last_mut(), p) {
        (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
        (Some(Piece::Args { index: i, text: a }), Piece::Args { index: j, text: b }) if *i == j => {
            a.push_str(&b)
        }
        (_, p) => out.push(p),
    }
}

/// Pieces → the content and the calls of a whole response.
pub fn assemble(pieces: Vec<Piece>) -> (String, Vec<Call>) {
    let mut content = String::new();
    let mut calls: Vec<Call> = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(t) => content.push_str(&t),
            Piece::Start { id, name, .. } => calls.push(Call {
                id,
                name,
                arguments: String::new(),
            }),
            Piece::Args { index, text } => {
                if let Some(c) = calls.get_mut(index) {
                    c.arguments.push_str(&text);
                }
            }
        }
    }
    (content, calls)
}

/// The `message` of a whole response: with calls, content that is only whitespace
/// is null.
pub fn message(content: String, calls: Vec<Call>) -> AssistantMessage {
    if calls.is_empty() {
        return AssistantMessage::text(content);
    }
    AssistantMessage {
        content: (!content.trim().is_empty()).then_some(content),
        tool_calls: Some(calls.into_iter().map(ToolCall::from).collect()),
        ..AssistantMessage::text(String::new())
    }
}

#[derive(Debug)]
enum Mode {
    /// Only whitespace so far (held).
    Start,
    /// A ``` fence at the start (the text so far is in `raw`).
    Fence(String),
    /// Plain text; `pending` holds a suffix that may grow into `<tool_call>`.
    Text,
    /// After `<tool_call>`.
    Block(Obj),
    /// After a block's object: `pending` holds what may grow into `</tool_call>`.
    Close,
    /// A bare JSON call (or a list of them, `list`).
    Bare { list: bool, item: Option<Obj> },
    /// All the calls allowed were made; the rest is dropped.
    Done,
}

/// Incremental tool-call parser over the generated text. The same pieces come out
/// (up to how adjacent ones are merged) whether the text arrives token by token or
/// at once.
pub struct CallParser {
    names: Vec<String>,
    max_calls: usize,
    mode: Mode,
    /// Calls begun so far.
    calls: usize,
    /// Text of a possible call not yet decided (let out as content if it is none).
    raw: String,
    /// Held text that may be the start of a tag.
    pending: String,
    /// Leading whitespace: content if content follows, dropped before a call.
    lead: String,
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
            mode: Mode::Start,
            calls: 0,
            raw: String::new(),
            pending: String::new(),
            lead: String::new(),
            id_base: format!("call_{}", &tail[..tail.len().min(20)]),
        }
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Add generated text; returns what can be let out now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        for c in text.chars() {
            self.feed(c, &mut out);
        }
        out
    }

    /// The end of generation: everything still held.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.mode, Mode::Done) {
            Mode::Start | Mode::Close | Mode::Done => {}
            Mode::Fence(_) => {
                let raw = std::mem::take(&mut self.raw);
                self.content(raw, &mut out);
            }
            Mode::Text => {
                let p = std::mem::take(&mut self.pending);
                self.content(p, &mut out);
            }
            Mode::Block(o) | Mode::Bare { item: Some(o), .. } if o.index.is_some() => {}
            Mode::Block(_) | Mode::Bare { .. } => {
                let raw = std::mem::take(&mut self.raw);
                self.content(raw, &mut out);
            }
        }
        out
    }

    /// Content goes out only before the first call.
    fn content(&mut self, text: String, out: &mut Vec<Piece>) {
        if self.calls > 0 || text.is_empty() {
            return;
        }
        if !self.lead.is_empty() {
            put(out, Piece::Content(std::mem::take(&mut self.lead)));
        }
        put(out, Piece::Content(text));
    }

    /// A candidate call turned out not to be one at `c`: what was held is content,
    /// and `c` is read again as text.
    fn not_a_call(&mut self, c: char, out: &mut Vec<Piece>) {
        let mut raw = std::mem::take(&mut self.raw);
        raw.pop();
        self.content(raw, out);
        self.mode = Mode::Text;
        self.feed(c, out);
    }

    /// Feed `c` to the call object of the current mode.
    fn feed_obj(&mut self, c: char, out: &mut Vec<Piece>) -> Step {
        let obj = match &mut self.mode {
            Mode::Block(o) | Mode::Bare { item: Some(o), .. } => o,
            _ => return Step::Fail,
        };
        let was = obj.index.is_some();
        if !was {
            self.raw.push(c);
        }
        let mut cx = Cx {
            names: &self.names,
            index: self.calls,
            id_base: &self.id_base,
            out,
        };
        let step = obj.feed(c, &mut cx);
        if !was && obj.index.is_some() {
            self.calls += 1;
            self.raw.clear();
            self.lead.clear();
        }
        step
    }

    fn feed(&mut self, c: char, out: &mut Vec<Piece>) {
        match &mut self.mode {
            Mode::Start => {
                if is_ws(c) {
                    self.raw.push(c);
                    return;
                }
                match c {
                    '{' => {
                        self.mode = Mode::Bare {
                            list: false,
                            item: Some(Obj::new()),
                        };
                        self.feed(c, out);
                    }
                    '[' => {
                        self.raw.push(c);
                        self.mode = Mode::Bare {
                            list: true,
                            item: None,
                        };
                    }
                    '`' => {
                        self.raw.push(c);
                        self.mode = Mode::Fence(c.to_string());
                    }
                    _ => {
                        self.lead = std::mem::take(&mut self.raw);
                        self.mode = Mode::Text;
                        self.feed(c, out);
                    }
                }
            }
            Mode::Fence(s) => {
                let head = s.trim_end_matches(is_ws);
                let opened = head == "```" || head == "```json";
                s.push(c);
                let hold = "```json".starts_with(s.as_str()) || (opened && is_ws(c));
                if opened && (c == '{' || c == '[') {
                    self.mode = Mode::Bare {
                        list: c == '[',
                        item: (c == '{').then(Obj::new),
                    };
                    if c == '{' {
                        self.feed(c, out);
                    } else {
                        self.raw.push(c);
                    }
                } else if hold {
                    self.raw.push(c);
                } else {
                    self.raw.push(c);
                    self.not_a_call(c, out);
                }
            }
            Mode::Text => {
                self.pending.push(c);
                loop {
                    if self.pending == open_str() && self.calls < self.max_calls {
                        self.lead.clear();
                        self.raw = std::mem::take(&mut self.pending);
                        self.mode = Mode::Block(Obj::new());
                        return;
                    }
                    if open_str().starts_with(self.pending.as_str()) {
                        return;
                    }
                    let first = self.pending.remove(0);
                    self.content(first.to_string(), out);
                    if self.pending.is_empty() {
                        return;
                    }
                }
            }
            Mode::Block(_) => match self.feed_obj(c, out) {
                Step::More => {}
                Step::Fail => self.not_a_call(c, out),
                Step::Done { before } => {
                    self.mode = if self.calls >= self.max_calls {
                        Mode::Done
                    } else {
                        Mode::Close
                    };
                    if before {
                        self.feed(c, out);
                    }
                }
            },
            Mode::Close => {
                if self.pending.is_empty() && is_ws(c) {
                    return;
                }
                self.pending.push(c);
                if self.pending == close_str() {
                    self.pending.clear();
                    self.mode = Mode::Text;
                } else if !close_str().starts_with(self.pending.as_str()) {
                    // No closing tag: read what came as text.
                    let p = std::mem::take(&mut self.pending);
                    self.mode = Mode::Text;
                    for x in p.chars() {
                        self.feed(x, out);
                    }
                }
            }
            Mode::Bare { list, item } => {
                if item.is_some() {
                    match self.feed_obj(c, out) {
                        Step::More => {}
                        Step::Fail => self.not_a_call(c, out),
                        Step::Done { before } => {
                            let list = matches!(self.mode, Mode::Bare { list: true, .. });
                            self.mode = if self.calls >= self.max_calls {
                                Mode::Done
                            } else if list {
                                Mode::Bare { list, item: None }
                            } else {
                                Mode::Text
                            };
                            if before {
                                self.feed(c, out);
                            }
                        }
                    }
                    return;
                }
                // In a list, between items.
                let first = self.calls == 0;
                if is_ws(c) {
                    if first {
                        self.raw.push(c);
                    }
                } else if c == '{' {
                    *item = Some(Obj::new());
                    self.feed(c, out);
                } else if c == ',' && !first {
                } else if *list && !first {
                    // `]` or anything else: the list is over.
                    self.mode = Mode::Text;
                    if c != ']' {
                        self.feed(c, out);
                    }
                } else {
                    self.raw.push(c);
                    self.not_a_call(c, out);
                }
            }
            Mode::Done => {}
        }
    }
}

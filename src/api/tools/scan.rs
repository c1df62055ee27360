//! The JSON under a tool call, read one character at a time: [`Obj`], a call object
//! `{"name": …, "arguments": …}` (keys in any order) that lets out the call's start as
//! soon as its name is known, then its arguments as they come ([`Val`] passes a JSON
//! value through with the whitespace outside strings left out).

use super::parse::{put, Piece};

pub(super) fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// A JSON string being read, opening quote included.
#[derive(Debug, Default)]
struct Str {
    raw: String,
    esc: bool,
}

impl Str {
    fn new() -> Self {
        Self {
            raw: "\"".into(),
            esc: false,
        }
    }

    /// Take one char; true when it closed the string.
    fn feed(&mut self, c: char) -> bool {
        self.raw.push(c);
        if self.esc {
            self.esc = false;
        } else if c == '\\' {
            self.esc = true;
        } else if c == '"' {
            return true;
        }
        false
    }

    fn decoded(&self) -> Option<String> {
        serde_json::from_str(&self.raw).ok()
    }
}

#[derive(Debug)]
enum ValKind {
    /// Nothing but whitespace yet.
    Fresh,
    /// An object or array: `depth` brackets open, `str`/`esc` inside a string.
    Nested {
        depth: u32,
        str: bool,
        esc: bool,
    },
    Scalar,
    /// A JSON string holding the arguments' JSON text (some models write that).
    Quoted(Str),
}

enum ValStep {
    More,
    Done,
    /// Done, and this char belongs to what follows.
    DoneBefore,
}

/// One JSON value, passed through with the whitespace outside strings left out.
#[derive(Debug)]
struct Val(ValKind);

impl Val {
    fn feed(&mut self, c: char, emit: &mut String) -> ValStep {
        match &mut self.0 {
            ValKind::Fresh => {
                if is_ws(c) {
                    return ValStep::More;
                }
                self.0 = match c {
                    '"' => ValKind::Quoted(Str::new()),
                    '{' | '[' => {
                        emit.push(c);
                        ValKind::Nested {
                            depth: 1,
                            str: false,
                            esc: false,
                        }
                    }
                    _ => {
                        emit.push(c);
                        ValKind::Scalar
                    }
                };
                ValStep::More
            }
            ValKind::Scalar => {
                if is_ws(c) || matches!(c, ',' | '}' | ']' | '<') {
                    return ValStep::DoneBefore;
                }
                emit.push(c);
                ValStep::More
            }
            ValKind::Quoted(s) => {
                if !s.feed(c) {
                    return ValStep::More;
                }
                match s.decoded() {
                    Some(d) => emit.push_str(&d),
                    None => emit.push_str(&s.raw),
                }
                ValStep::Done
            }
            ValKind::Nested { depth, str, esc } => {
                if *str {
                    emit.push(c);
                    if *esc {
                        *esc = false;
                    } else if c == '\\' {
                        *esc = true;
                    } else if c == '"' {
                        *str = false;
                    }
                    return ValStep::More;
                }
                match c {
                    _ if is_ws(c) => return ValStep::More,
                    // Never part of JSON outside a string: a closing tag after
                    // unbalanced arguments.
                    '<' => return ValStep::DoneBefore,
                    '"' => *str = true,
                    '{' | '[' => *depth += 1,
                    '}' | ']' => *depth -= 1,
                    _ => {}
                }
                emit.push(c);
                if *depth == 0 {
                    ValStep::Done
                } else {
                    ValStep::More
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    Name,
    Args,
    Skip,
}

#[derive(Debug)]
enum ObjSt {
    Open,
    Key,
    InKey(Str),
    Colon(Key),
    Value(Key),
    InName(Str),
    InArgs(Val),
    InSkip(Val),
    After,
}

pub(super) enum Step {
    More,
    /// Not a call (only before the name was accepted).
    Fail,
    /// The object ended; `before`: this char belongs to what follows.
    Done {
        before: bool,
    },
}

/// One call object `{"name": …, "arguments": …}`, keys in any order.
#[derive(Debug)]
pub(super) struct Obj {
    st: ObjSt,
    /// The call's index once its name was accepted.
    pub index: Option<usize>,
    args_seen: bool,
    /// Arguments written before the name.
    early: String,
}

/// What an [`Obj`] needs from the parser.
pub(super) struct Cx<'a> {
    pub names: &'a [String],
    /// The index the call gets if it is one.
    pub index: usize,
    pub id_base: &'a str,
    pub out: &'a mut Vec<Piece>,
}

impl Obj {
    pub(super) fn new() -> Self {
        Self {
            st: ObjSt::Open,
            index: None,
            args_seen: false,
            early: String::new(),
        }
    }

    /// The object ended (or was cut off after its name): a call without arguments
    /// gets `{}`.
    fn close(&mut self, cx: &mut Cx, before: bool) -> Step {
        let Some(index) = self.index else {
            return Step::Fail;
        };
        if !self.args_seen {
            self.args_seen = true;
            put(
                cx.out,
                Piece::Args {
                    index,
                    text: "{}".into(),
                },
            );
        }
        Step::Done { before }
    }

    /// A char that does not fit: the end of a call, or proof that it is none.
    fn stray(&mut self, cx: &mut Cx) -> Step {
        match self.index {
            Some(_) => self.close(cx, true),
            None => Step::Fail,
        }
    }

    pub(super) fn feed(&mut self, c: char, cx: &mut Cx) -> Step {
        let ws = is_ws(c);
        match &mut self.st {
            ObjSt::Open => match c {
                _ if ws => {}
                '{' => self.st = ObjSt::Key,
                _ => return Step::Fail,
            },
            ObjSt::Key => match c {
                _ if ws => {}
                '"' => self.st = ObjSt::InKey(Str::new()),
                '}' => return self.close(cx, false),
                _ => return self.stray(cx),
            },
            ObjSt::InKey(s) => {
                if s.feed(c) {
                    let key = s.decoded().unwrap_or_default();
                    let kind = match key.as_str() {
                        "name" if self.index.is_none() => Key::Name,
                        "arguments" | "parameters" if !self.args_seen => Key::Args,
                        _ if self.index.is_some() => Key::Skip,
                        _ => return Step::Fail,
                    };
                    self.st = ObjSt::Colon(kind);
                }
            }
            ObjSt::Colon(k) => match c {
                _ if ws => {}
                ':' => self.st = ObjSt::Value(*k),
                _ => return self.stray(cx),
            },
            ObjSt::Value(k) => {
                if ws {
                    return Step::More;
                }
                self.st = match k {
                    Key::Name if c == '"' => ObjSt::InName(Str::new()),
                    Key::Name => return Step::Fail,
                    Key::Args => ObjSt::InArgs(Val(ValKind::Fresh)),
                    Key::Skip => ObjSt::InSkip(Val(ValKind::Fresh)),
                };
                if !matches!(self.st, ObjSt::InName(_)) {
                    return self.feed(c, cx);
                }
            }
            ObjSt::InName(s) => {
                if s.feed(c) {
                    let name = s.decoded().unwrap_or_default();
                    if !cx.names.contains(&name) {
                        return Step::Fail;
                    }
                    let index = cx.index;
                    self.index = Some(index);
                    put(
                        cx.out,
                        Piece::Start {
                            index,
                            id: format!("{}{index}", cx.id_base),
                            name,
                        },
                    );
                    if self.args_seen {
                        let text = std::mem::take(&mut self.early);
                        put(cx.out, Piece::Args { index, text });
                    }
                    self.st = ObjSt::After;
                }
            }
            ObjSt::InArgs(v) => {
                let mut text = String::new();
                let step = v.feed(c, &mut text);
                match self.index {
                    Some(index) if !text.is_empty() => put(cx.out, Piece::Args { index, text }),
                    Some(_) => {}
                    None => self.early.push_str(&text),
                }
                match step {
                    ValStep::More => {}
                    ValStep::Done => {
                        self.args_seen = true;
                        self.st = ObjSt::After;
                    }
                    ValStep::DoneBefore => {
                        self.args_seen = true;
                        self.st = ObjSt::After;
                        return self.feed(c, cx);
                    }
                }
            }
            ObjSt::InSkip(v) => match v.feed(c, &mut String::new()) {
                ValStep::More => {}
                ValStep::Done => self.st = ObjSt::After,
                ValStep::DoneBefore => {
                    self.st = ObjSt::After;
                    return self.feed(c, cx);
                }
            },
            ObjSt::After => match c {
                _ if ws => {}
                ',' => self.st = ObjSt::Key,
                '}' => return self.close(cx, false),
                _ => return self.stray(cx),
            },
        }
        Step::More
    }
}

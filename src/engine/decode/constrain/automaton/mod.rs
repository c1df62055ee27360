//! The byte-level pushdown automaton behind [`super::Constraint`]: stacks of frames
//! over a [`Grammar`]'s nodes, fed one byte at a time. Several stacks live at once
//! only while `anyOf`/`enum` alternatives share a prefix.
//!
//! Depends only on [`crate::engine::decode::grammar`].

use crate::engine::decode::grammar::{Grammar, Node, NodeId};

use super::{CALL_CLOSE, CALL_OPEN};

mod start;

use start::{start, start_str};

/// Longest run of insignificant whitespace allowed between tokens of JSON: enough for
/// pretty-printed output, short enough that a small model cannot stall in blank lines.
const MAX_WS: u8 = 12;
/// Longest number literal, in bytes.
const MAX_NUM: u8 = 24;
/// Longest integer literal: 15 digits and a sign stay exact in f64 and i64.
const MAX_INT: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ArrSt {
    Open,
    AfterItem,
    AfterComma,
    InItem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ObjSt {
    Open,
    AfterComma,
    InKey,
    AfterKey,
    InValue,
    AfterValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CallSt {
    Between,
    Open(u8),
    InJson,
    Close(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NumSt {
    Minus,
    Zero,
    Int,
    Frac0,
    Frac,
    Exp0,
    ExpSign,
    Exp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Frame {
    /// A value of this node, nothing consumed yet.
    Value(NodeId),
    /// Inside a string, after the opening quote. `esc`: 0 none, 10 after `\`, 1..=4
    /// hex digits still due; `utf8`: continuation bytes still due.
    Str {
        min: u32,
        max: u32,
        count: u32,
        esc: u8,
        utf8: u8,
    },
    Lit {
        node: NodeId,
        alt: u32,
        pos: u32,
    },
    Kw {
        word: &'static [u8],
        pos: u8,
    },
    Num {
        integer: bool,
        st: NumSt,
        len: u8,
        /// Exponent digits so far.
        ed: u8,
    },
    Arr {
        node: NodeId,
        count: u32,
        st: ArrSt,
    },
    Obj {
        node: NodeId,
        next: u32,
        cur: u32,
        st: ObjSt,
    },
    Key {
        node: NodeId,
        prop: u32,
        pos: u32,
    },
    Calls {
        node: NodeId,
        count: u32,
        st: CallSt,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Stack {
    frames: Vec<Frame>,
    ws: u8,
}

impl Stack {
    /// Before the first byte of a value of `node`.
    pub(super) fn at(node: NodeId) -> Self {
        Self {
            frames: vec![Frame::Value(node)],
            ws: 0,
        }
    }
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

fn allows_ws(f: &Frame) -> bool {
    match f {
        Frame::Value(_) => true,
        Frame::Arr { st, .. } => *st != ArrSt::InItem,
        Frame::Obj { st, .. } => !matches!(st, ObjSt::InKey | ObjSt::InValue),
        Frame::Calls { st, .. } => matches!(st, CallSt::Between | CallSt::Close(0)),
        _ => false,
    }
}

/// The top frame finished: tell its parent.
fn child_done(st: &mut Stack) {
    match st.frames.last_mut() {
        Some(Frame::Arr { st: s, count, .. }) => {
            *s = ArrSt::AfterItem;
            *count += 1;
        }
        Some(Frame::Obj { st: s, .. }) => {
            *s = if *s == ObjSt::InKey {
                ObjSt::AfterKey
            } else {
                ObjSt::AfterValue
            }
        }
        Some(Frame::Calls { st: s, .. }) => *s = CallSt::Close(0),
        _ => {}
    }
}

fn obj_parts(
    g: &Grammar,
    node: NodeId,
) -> (&[crate::engine::decode::grammar::Prop], Option<NodeId>) {
    match &g.nodes[node] {
        Node::Object { props, extra } => (props.as_slice(), *extra),
        _ => (&[], None),
    }
}

/// Feed one byte to one stack; the surviving stacks go to `out`.
pub(super) fn feed(g: &Grammar, mut st: Stack, c: u8, out: &mut Vec<Stack>) {
    loop {
        let Some(top) = st.frames.last_mut() else {
            return; // complete: nothing more may follow
        };
        if allows_ws(top) {
            if is_ws(c) {
                if st.ws < MAX_WS {
                    st.ws += 1;
                    out.push(st);
                }
                return;
            }
            st.ws = 0;
        }
        match top {
            Frame::Value(n) => {
                let n = *n;
                st.frames.pop();
                return start(g, st, n, c, out);
            }
            Frame::Str {
                min,
                max,
                count,
                esc,
                utf8,
            } => {
                let ok = if *utf8 > 0 {
                    *utf8 -= 1;
                    (0x80..=0xBF).contains(&c)
                } else if *esc == 10 {
                    *esc = 0;
                    match c {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => true,
                        b'u' => {
                            *esc = 4;
                            true
                        }
                        _ => false,
                    }
                } else if *esc > 0 {
                    // No \uD... escapes: surrogates would need pairs.
                    let ok = c.is_ascii_hexdigit() && !(*esc == 4 && (c == b'd' || c == b'D'));
                    *esc -= 1;
                    ok
                } else {
                    match c {
                        b'"' => {
                            if *count >= *min {
                                st.frames.pop();
                                child_done(&mut st);
                                out.push(st);
                            }
                            return;
                        }
                        0..=0x1F => false,
                        _ if *count >= *max => false,
                        b'\\' => {
                            *count += 1;
                            *esc = 10;
                            true
                        }
                        0x20..=0x7F => {
                            *count += 1;
                            true
                        }
                        0xC2..=0xF4 => {
                            *count += 1;
                            *utf8 = if c >= 0xF0 {
                                3
                            } else if c >= 0xE0 {
                                2
                            } else {
                                1
                            };
                            true
                        }
                        _ => false,
                    }
                };
                if ok {
                    out.push(st);
                }
                return;
            }
            Frame::Lit { node, alt, pos } => {
                let Node::Literal(alts) = &g.nodes[*node] else {
                    return;
                };
                let text = &alts[*alt as usize];
                if text.get(*pos as usize) != Some(&c) {
                    return;
                }
                *pos += 1;
                if *pos as usize == text.len() {
                    st.frames.pop();
                    child_done(&mut st);
                }
                return out.push(st);
            }
            Frame::Kw { word, pos } => {
                if word.get(*pos as usize) != Some(&c) {
                    return;
                }
                *pos += 1;
                if *pos as usize == word.len() {
                    st.frames.pop();
                    child_done(&mut st);
                }
                return out.push(st);
            }
            Frame::Num {
                integer,
                st: ns,
                len,
                ed,
            } => {
                let next = match (*ns, c) {
                    // `-0` reads back as a float in many parsers: not for integers.
                    (NumSt::Minus, b'0') if !*integer => Some(NumSt::Zero),
                    (NumSt::Minus, b'1'..=b'9') => Some(NumSt::Int),
                    (NumSt::Int, b'0'..=b'9') => Some(NumSt::Int),
                    (NumSt::Zero | NumSt::Int, b'.') if !*integer => Some(NumSt::Frac0),
                    (NumSt::Zero | NumSt::Int | NumSt::Frac, b'e' | b'E') if !*integer => {
                        Some(NumSt::Exp0)
                    }
                    (NumSt::Frac0 | NumSt::Frac, b'0'..=b'9') => Some(NumSt::Frac),
                    (NumSt::Exp0, b'+' | b'-') => Some(NumSt::ExpSign),
                    (NumSt::Exp0 | NumSt::ExpSign | NumSt::Exp, b'0'..=b'9') => Some(NumSt::Exp),
                    _ => None,
                };
                if next == Some(NumSt::Exp) {
                    *ed += 1;
                }
                let max_len = if *integer { MAX_INT } else { MAX_NUM };
                match next {
                    // Exponents of at most 2 digits keep every number inside f64.
                    Some(n) if *len < max_len && *ed <= 2 => {
                        *ns = n;
                        *len += 1;
                        return out.push(st);
                    }
                    Some(_) => return,
                    None => {
                        if !matches!(ns, NumSt::Zero | NumSt::Int | NumSt::Frac | NumSt::Exp) {
                            return;
                        }
                        // The number ended; the byte belongs to the parent.
                        st.frames.pop();
                        child_done(&mut st);
                        continue;
                    }
                }
            }
            Frame::Arr { node, count, st: s } => {
                let Node::Array { items, min, max } = g.nodes[*node] else {
                    return;
                };
                match *s {
                    ArrSt::Open if c == b']' && min == 0 => {}
                    ArrSt::Open | ArrSt::AfterComma if c != b']' && *count < max => {
                        *s = ArrSt::InItem;
                        st.frames.push(Frame::Value(items));
                        continue;
                    }
                    ArrSt::AfterItem if c == b',' && *count < max => {
                        *s = ArrSt::AfterComma;
                        return out.push(st);
                    }
                    ArrSt::AfterItem if c == b']' && *count >= min => {}
                    _ => return,
                }
                st.frames.pop();
                child_done(&mut st);
                return out.push(st);
            }
            Frame::Obj {
                node,
                next,
                cur,
                st: s,
            } => {
                let node = *node;
                let (props, extra) = obj_parts(g, node);
                let rest = props.get(*next as usize..).unwrap_or(&[]);
                let can_close = !rest.iter().any(|p| p.required);
                let can_more = extra.is_some() || !rest.is_empty();
                match (*s, c) {
                    (ObjSt::Open, b'}') | (ObjSt::AfterValue, b'}') if can_close => {
                        st.frames.pop();
                        child_done(&mut st);
                        return out.push(st);
                    }
                    (ObjSt::AfterValue, b',') if can_more => {
                        *s = ObjSt::AfterComma;
                        return out.push(st);
                    }
                    (ObjSt::Open | ObjSt::AfterComma, b'"') if can_more => {
                        if extra.is_some() {
                            *s = ObjSt::InKey;
                            return start_str(st, 0, u32::MAX, out);
                        }
                        let first = *next as usize;
                        for (k, p) in rest.iter().enumerate() {
                            let mut s2 = st.clone();
                            if let Some(Frame::Obj { next, cur, st, .. }) = s2.frames.last_mut() {
                                *next = (first + k + 1) as u32;
                                *cur = (first + k) as u32;
                                *st = ObjSt::InKey;
                            }
                            s2.frames.push(Frame::Key {
                                node,
                                prop: (first + k) as u32,
                                pos: 1,
                            });
                            out.push(s2);
                            if p.required {
                                break;
                            }
                        }
                        return;
                    }
                    (ObjSt::AfterKey, b':') => {
                        let value = match extra {
                            Some(x) => x,
                            None => match props.get(*cur as usize) {
                                Some(p) => p.value,
                                None => return,
                            },
                        };
                        *s = ObjSt::InValue;
                        st.frames.push(Frame::Value(value));
                        return out.push(st);
                    }
                    _ => return,
                }
            }
            Frame::Key { node, prop, pos } => {
                let (props, _) = obj_parts(g, *node);
                let Some(key) = props.get(*prop as usize).map(|p| &p.key) else {
                    return;
                };
                if key.get(*pos as usize) != Some(&c) {
                    return;
                }
                *pos += 1;
                if *pos as usize == key.len() {
                    st.frames.pop();
                    child_done(&mut st);
                }
                return out.push(st);
            }
            Frame::Calls { node, count, st: s } => {
                let Node::Calls { call, max } = g.nodes[*node] else {
                    return;
                };
                match *s {
                    CallSt::Between if c == CALL_OPEN[0] && *count < max => *s = CallSt::Open(1),
                    CallSt::Open(p) if CALL_OPEN.get(p as usize) == Some(&c) => {
                        if p as usize + 1 == CALL_OPEN.len() {
                            *s = CallSt::InJson;
                            st.frames.push(Frame::Value(call));
                        } else {
                            *s = CallSt::Open(p + 1);
                        }
                    }
                    CallSt::Close(p) if CALL_CLOSE.get(p as usize) == Some(&c) => {
                        if p as usize + 1 == CALL_CLOSE.len() {
                            *count += 1;
                            *s = CallSt::Between;
                        } else {
                            *s = CallSt::Close(p + 1);
                        }
                    }
                    _ => return,
                }
                return out.push(st);
            }
        }
    }
}

pub(super) fn stack_can_end(st: &Stack) -> bool {
    match st.frames.as_slice() {
        [] => true,
        [Frame::Num { st, .. }] => {
            matches!(st, NumSt::Zero | NumSt::Int | NumSt::Frac | NumSt::Exp)
        }
        [Frame::Calls {
            st: CallSt::Between,
            count,
            ..
        }] => *count > 0,
        _ => false,
    }
}

/// A string being written at a character boundary (one stack, not in an escape):
/// its `(count, min, max)`.
pub(super) fn in_plain_string(stacks: &[Stack]) -> Option<(u32, u32, u32)> {
    match stacks {
        [s] => match s.frames.last() {
            Some(Frame::Str {
                min,
                max,
                count,
                esc: 0,
                utf8: 0,
            }) => Some((*count, *min, *max)),
            _ => None,
        },
        _ => None,
    }
}

/// The string of [`in_plain_string`] with `n` more characters written.
pub(super) fn add_chars(stacks: &[Stack], n: u32) -> Vec<Stack> {
    let mut out = stacks.to_vec();
    for s in &mut out {
        if let Some(Frame::Str { count, .. }) = s.frames.last_mut() {
            *count += n;
        }
    }
    out
}

/// The stacks with what cannot change which bytes come next made equal, so that equal
/// keys have equal token masks: a string's length once it is past its minimum and has
/// no maximum.
pub(super) fn mask_key(stacks: &[Stack]) -> Vec<Stack> {
    let mut key = stacks.to_vec();
    for s in &mut key {
        for f in &mut s.frames {
            if let Frame::Str {
                min, max, count, ..
            } = f
            {
                if *max == u32::MAX && *count > *min {
                    *count = *min;
                }
            }
        }
    }
    key
}

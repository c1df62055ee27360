//! Grammar-constrained decoding: a byte-level pushdown automaton over a [`Grammar`]
//! that says, before each sampling step, which tokens may come next, so the output
//! always parses and matches the schema. End-of-generation tokens are allowed only when
//! the JSON (or the last tool call) is complete.
//!
//! The state is a small set of stacks (several only while `anyOf`/`enum` alternatives
//! share a prefix). Masking does not run every token through the automaton: inside a
//! plain string (the common case by far) a token without `"`, `\` or control bytes is
//! allowed by its character count alone; elsewhere tokens are grouped by first byte and
//! only groups whose first byte is accepted are simulated.
//!
//! Depends only on [`super::grammar`]; the token table is built from plain byte strings.

use std::sync::Arc;

use super::grammar::{Grammar, Node, NodeId, ANY_ARRAY, ANY_OBJECT};

/// Longest run of insignificant whitespace allowed between tokens of JSON: enough for
/// pretty-printed output, short enough that a small model cannot stall in blank lines.
const MAX_WS: u8 = 12;
/// Longest number literal, in bytes.
const MAX_NUM: u8 = 24;
/// Longest integer literal: 15 digits and a sign stay exact in f64 and i64.
const MAX_INT: u8 = 16;
pub const CALL_OPEN: &[u8] = b"<tool_call>";
pub const CALL_CLOSE: &[u8] = b"</tool_call>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrSt {
    Open,
    AfterItem,
    AfterComma,
    InItem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjSt {
    Open,
    AfterComma,
    InKey,
    AfterKey,
    InValue,
    AfterValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallSt {
    Between,
    Open(u8),
    InJson,
    Close(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stack {
    frames: Vec<Frame>,
    ws: u8,
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

fn obj_parts(g: &Grammar, node: NodeId) -> (&[super::grammar::Prop], Option<NodeId>) {
    match &g.nodes[node] {
        Node::Object { props, extra } => (props.as_slice(), *extra),
        _ => (&[], None),
    }
}

/// Start a value of `node` whose first (non-whitespace) byte is `c`.
fn start(g: &Grammar, mut st: Stack, node: NodeId, c: u8, out: &mut Vec<Stack>) {
    let push = |mut st: Stack, f: Frame, out: &mut Vec<Stack>| {
        st.frames.push(f);
        out.push(st);
    };
    match &g.nodes[node] {
        Node::Any => match c {
            b'{' => start(g, st, ANY_OBJECT, c, out),
            b'[' => start(g, st, ANY_ARRAY, c, out),
            b'"' => start_str(st, 0, u32::MAX, out),
            b't' | b'f' | b'n' => start_kw(st, c, true, true, out),
            b'-' | b'0'..=b'9' => start_num(st, false, c, out),
            _ => {}
        },
        Node::Null => {
            if c == b'n' {
                start_kw(st, c, false, true, out)
            }
        }
        Node::Bool => {
            if c == b't' || c == b'f' {
                start_kw(st, c, true, false, out)
            }
        }
        Node::Number { integer } => start_num(st, *integer, c, out),
        Node::String { min, max } => {
            if c == b'"' {
                start_str(st, *min, *max, out)
            }
        }
        Node::Literal(alts) => {
            for (i, a) in alts.iter().enumerate() {
                if a.first() == Some(&c) {
                    let mut s = st.clone();
                    if a.len() == 1 {
                        child_done(&mut s);
                        out.push(s);
                    } else {
                        push(
                            s,
                            Frame::Lit {
                                node,
                                alt: i as u32,
                                pos: 1,
                            },
                            out,
                        );
                    }
                }
            }
        }
        Node::Array { .. } => {
            if c == b'[' {
                push(
                    st,
                    Frame::Arr {
                        node,
                        count: 0,
                        st: ArrSt::Open,
                    },
                    out,
                )
            }
        }
        Node::Object { .. } => {
            if c == b'{' {
                push(
                    st,
                    Frame::Obj {
                        node,
                        next: 0,
                        cur: 0,
                        st: ObjSt::Open,
                    },
                    out,
                )
            }
        }
        Node::AnyOf(alts) => {
            for &a in alts {
                start(g, st.clone(), a, c, out);
            }
        }
        Node::Calls { .. } => {
            st.frames.push(Frame::Calls {
                node,
                count: 0,
                st: CallSt::Between,
            });
            feed(g, st, c, out);
        }
    }
}

fn start_str(mut st: Stack, min: u32, max: u32, out: &mut Vec<Stack>) {
    st.frames.push(Frame::Str {
        min,
        max,
        count: 0,
        esc: 0,
        utf8: 0,
    });
    out.push(st);
}

fn start_kw(mut st: Stack, c: u8, bools: bool, null: bool, out: &mut Vec<Stack>) {
    let word: &'static [u8] = match c {
        b't' if bools => b"true",
        b'f' if bools => b"false",
        b'n' if null => b"null",
        _ => return,
    };
    st.frames.push(Frame::Kw { word, pos: 1 });
    out.push(st);
}

fn start_num(mut st: Stack, integer: bool, c: u8, out: &mut Vec<Stack>) {
    let s = match c {
        b'-' => NumSt::Minus,
        b'0' => NumSt::Zero,
        b'1'..=b'9' => NumSt::Int,
        _ => return,
    };
    st.frames.push(Frame::Num {
        integer,
        st: s,
        len: 1,
        ed: 0,
    });
    out.push(st);
}

/// Feed one byte to one stack; the surviving stacks go to `out`.
fn feed(g: &Grammar, mut st: Stack, c: u8, out: &mut Vec<Stack>) {
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

fn stack_can_end(st: &Stack) -> bool {
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

/// Per-model facts about the vocabulary, built once.
pub struct TokenTable {
    /// Bytes of each token; empty: never allowed as text (control tokens).
    bytes: Vec<Box<[u8]>>,
    /// Usable token ids by first byte, each list sorted by the tokens' bytes (so tokens
    /// that share a second byte are adjacent).
    by_first: Vec<Vec<u32>>,
    /// Tokens that are plain string content (no `"`, `\`, control bytes; whole UTF-8
    /// characters), with their character counts.
    plain: Vec<(u32, u32)>,
    /// Usable tokens that are not plain and may still continue a string (no control
    /// byte before their first `"` or `\`).
    nonplain: Vec<u32>,
    /// End-of-generation ids.
    eog: Vec<u32>,
}

impl TokenTable {
    /// `bytes[id]`: the token's bytes, or None for a control token.
    pub fn new(bytes: Vec<Option<Vec<u8>>>, eog: Vec<u32>) -> Self {
        let mut by_first = vec![Vec::new(); 256];
        let mut plain = Vec::new();
        let mut nonplain = Vec::new();
        let bytes: Vec<Box<[u8]>> = bytes
            .into_iter()
            .enumerate()
            .map(|(id, b)| {
                let b = match b {
                    Some(b) if !b.is_empty() && !eog.contains(&(id as u32)) => b,
                    _ => return Box::default(),
                };
                by_first[b[0] as usize].push(id as u32);
                let is_plain = !b.iter().any(|&c| c == b'"' || c == b'\\' || c < 0x20);
                // A raw control byte can never come inside a string.
                let dead_in_string = b
                    .iter()
                    .find(|&&c| c == b'"' || c == b'\\' || c < 0x20)
                    .is_some_and(|&c| c < 0x20);
                match std::str::from_utf8(&b) {
                    Ok(s) if is_plain => plain.push((id as u32, s.chars().count() as u32)),
                    _ if dead_in_string => {}
                    _ => nonplain.push(id as u32),
                }
                b.into_boxed_slice()
            })
            .collect();
        for ids in &mut by_first {
            ids.sort_by(|&x, &y| bytes[x as usize].cmp(&bytes[y as usize]));
        }
        Self {
            bytes,
            by_first,
            plain,
            nonplain,
            eog,
        }
    }

    pub fn vocab(&self) -> usize {
        self.bytes.len()
    }
}

/// The live constraint of one sequence.
pub struct Constraint {
    g: Arc<Grammar>,
    stacks: Vec<Stack>,
    allowed: Vec<bool>,
    /// Set once an end-of-generation token was accepted.
    ended: bool,
}

fn feed_all(g: &Grammar, stacks: &[Stack], c: u8) -> Vec<Stack> {
    let mut out = Vec::new();
    for s in stacks {
        feed(g, s.clone(), c, &mut out);
    }
    out
}

fn accepts(g: &Grammar, stacks: &[Stack], bytes: &[u8]) -> bool {
    let mut cur = stacks.to_vec();
    for &c in bytes {
        let mut next = Vec::with_capacity(cur.len());
        for s in cur {
            feed(g, s, c, &mut next);
        }
        if next.is_empty() {
            return false;
        }
        cur = next;
    }
    true
}

impl Constraint {
    pub fn new(g: Arc<Grammar>) -> Self {
        let root = g.root;
        Self {
            g,
            stacks: vec![Stack {
                frames: vec![Frame::Value(root)],
                ws: 0,
            }],
            allowed: Vec::new(),
            ended: false,
        }
    }

    /// Whether the output so far is complete (an end token may come now).
    pub fn can_end(&self) -> bool {
        self.stacks.iter().any(stack_can_end)
    }

    /// Which tokens may come next (indexed by id; ids past the table are never allowed).
    pub fn allowed(&mut self, t: &TokenTable) -> &[bool] {
        let n = t.bytes.len();
        self.allowed.clear();
        self.allowed.resize(n, false);
        let g = &*self.g;
        if self.ended {
            return &self.allowed;
        }
        let plain_str = match self.stacks.as_slice() {
            [s] => match s.frames.last() {
                Some(Frame::Str {
                    max,
                    count,
                    esc: 0,
                    utf8: 0,
                    ..
                }) => Some(max - count),
                _ => None,
            },
            _ => None,
        };
        if let Some(room) = plain_str {
            for &(id, chars) in &t.plain {
                if chars <= room {
                    self.allowed[id as usize] = true;
                }
            }
            for &id in &t.nonplain {
                if accepts(g, &self.stacks, &t.bytes[id as usize]) {
                    self.allowed[id as usize] = true;
                }
            }
        } else {
            for (c, ids) in t.by_first.iter().enumerate() {
                if ids.is_empty() {
                    continue;
                }
                let after = feed_all(g, &self.stacks, c as u8);
                if after.is_empty() {
                    continue;
                }
                // Tokens sharing a second byte are adjacent: feed it once per run, and
                // skip the whole run when the automaton refuses it.
                let mut second: Option<(u8, Vec<Stack>)> = None;
                for &id in ids {
                    let b = &t.bytes[id as usize];
                    let Some(&c2) = b.get(1) else {
                        self.allowed[id as usize] = true;
                        continue;
                    };
                    if second.as_ref().map(|s| s.0) != Some(c2) {
                        second = Some((c2, feed_all(g, &after, c2)));
                    }
                    let Some((_, after2)) = &second else { continue };
                    if !after2.is_empty() && (b.len() == 2 || accepts(g, after2, &b[2..])) {
                        self.allowed[id as usize] = true;
                    }
                }
            }
        }
        if self.can_end() {
            for &e in &t.eog {
                if let Some(a) = self.allowed.get_mut(e as usize) {
                    *a = true;
                }
            }
        }
        &self.allowed
    }

    /// Set the logits of forbidden tokens to -inf; returns how many stay allowed.
    pub fn mask(&mut self, t: &TokenTable, logits: &mut [f32]) -> usize {
        let allowed = self.allowed(t);
        let mut n = 0;
        for (i, l) in logits.iter_mut().enumerate() {
            if allowed.get(i).copied().unwrap_or(false) {
                n += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        n
    }

    /// Take the sampled token. False if the grammar does not allow it.
    pub fn advance(&mut self, t: &TokenTable, id: u32) -> bool {
        if t.eog.contains(&id) {
            let ok = self.can_end();
            self.ended = ok;
            return ok;
        }
        let Some(b) = t.bytes.get(id as usize).filter(|b| !b.is_empty()) else {
            return false;
        };
        let mut cur = std::mem::take(&mut self.stacks);
        for &c in b.iter() {
            let mut next = Vec::with_capacity(cur.len());
            for s in cur {
                feed(&self.g, s, c, &mut next);
            }
            let mut i = 0;
            while i < next.len() {
                if next[..i].contains(&next[i]) {
                    next.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            cur = next;
        }
        let ok = !cur.is_empty();
        self.stacks = cur;
        ok
    }

    /// Feed text directly (tests and tools).
    pub fn accepts_text(&self, text: &[u8]) -> bool {
        accepts(&self.g, &self.stacks, text)
    }
}

#[cfg(test)]
#[path = "constrain_tests.rs"]
mod tests;

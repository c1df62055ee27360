//! Starting a value: the frame a node's first byte opens.

use crate::engine::decode::grammar::{Grammar, Node, NodeId, ANY_ARRAY, ANY_OBJECT};

use super::{child_done, feed, ArrSt, CallSt, Frame, NumSt, ObjSt, Stack};

/// Start a value of `node` whose first (non-whitespace) byte is `c`.
pub(super) fn start(g: &Grammar, mut st: Stack, node: NodeId, c: u8, out: &mut Vec<Stack>) {
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

pub(super) fn start_str(mut st: Stack, min: u32, max: u32, out: &mut Vec<Stack>) {
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

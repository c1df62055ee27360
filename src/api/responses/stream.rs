//! A streamed response: `response.created`, `response.in_progress`, the output items'
//! events ([`Output`]), then `response.completed` (or `response.incomplete` when
//! `max_output_tokens` cut it) carrying the whole response, which is stored before that
//! event goes out. Each SSE event names its type (`event:`) and carries a
//! `sequence_number`. A generation that fails part-way ends with one `error` event
//! (`code`, `message`, `param`: the error its response would have been).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, Sse};
use serde_json::{json, Value};

use super::super::error::sse_json;
use super::super::generate::{sse_response, Events, Step};
use super::output::Output;
use super::Turn;

/// `event: <type>` then `data: <json>`, as OpenAI writes them.
fn event(ev: &Value) -> Event {
    let kind = ev.get("type").and_then(Value::as_str).unwrap_or("message");
    Event::default()
        .event(kind)
        .json_data(ev)
        .unwrap_or_else(|_| sse_json(ev))
}

pub(super) fn sse(
    turn: Turn,
    uid: String,
    events: Events,
    idle: Option<Duration>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let id = turn.id.clone();
    sse_response(id, sse_events(turn, uid, events), idle)
}

fn sse_events(
    turn: Turn,
    uid: String,
    mut events: Events,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let mut out = Output::new(turn.tools.as_ref(), &uid);
    async_stream::stream! {
        let start = json!({"response": turn.object("in_progress", Vec::new(), None)});
        yield Ok(event(&out.event("response.created", start.clone())));
        yield Ok(event(&out.event("response.in_progress", start)));
        loop {
            match events.next().await {
                Step::Token { text, .. } => {
                    for ev in out.text(&text) {
                        yield Ok(event(&ev));
                    }
                }
                Step::Done { finish, usage, .. } => {
                    let incomplete = finish == crate::engine::FinishReason::Length;
                    for ev in out.finish(incomplete) {
                        yield Ok(event(&ev));
                    }
                    let resp = turn.finish(&out, finish, usage).await;
                    let kind = if incomplete { "response.incomplete" } else { "response.completed" };
                    yield Ok(event(&out.event(kind, json!({"response": resp}))));
                    break;
                }
                Step::Failed(e) => {
                    let ev = out.event("error", json!({
                        "code": e.code,
                        "message": e.message,
                        "param": e.param,
                    }));
                    yield Ok(event(&ev));
                    break;
                }
            }
        }
    }
}

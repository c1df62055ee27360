//! The streamed message: `message_start`, content blocks (`content_block_start`,
//! `content_block_delta` with `text_delta` / `input_json_delta`,
//! `content_block_stop`), `message_delta` (stop reason, usage totals), `message_stop`;
//! each an SSE event named by its `type`. A generation that fails part-way ends the
//! stream with `event: error` and Anthropic's error body. Reading, idle cut-off and
//! cancellation are the chat stream's ([`generate::sse_response`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::Event;
use axum::response::IntoResponse;

use super::super::error::sse_named;
use super::super::generate::{self, Events, Step};
use super::turn::Turn;
use super::types::StreamEvent;

fn event(e: &StreamEvent) -> Event {
    sse_named(e.name(), e)
}

pub fn sse(turn: Turn, events: Events, idle: Option<Duration>) -> impl IntoResponse {
    let id = turn.id.clone();
    generate::sse_response(id, sse_events(turn, events), idle)
}

fn sse_events(
    mut turn: Turn,
    mut events: Events,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        yield Ok(event(&turn.start()));
        loop {
            match events.next().await {
                Step::Token { text, .. } => {
                    for e in turn.token(text) {
                        yield Ok(event(&e));
                    }
                }
                Step::Done { finish, usage, stop_sequence } => {
                    for e in turn.done(finish, &usage, stop_sequence) {
                        yield Ok(event(&e));
                    }
                    break;
                }
                Step::Failed(e) => {
                    yield Ok(e.anthropic_sse_event());
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::sse::Sse;
    use serde_json::{json, Value};

    use crate::engine::{EngineError, GenEvent};
    use crate::kv::store::KvError;

    fn turn() -> Turn {
        Turn::new("msg_t".into(), "m".into(), None, "abc", 5, true)
    }

    fn token() -> GenEvent {
        GenEvent::Token {
            text: "Hi".into(),
            logprob: None,
        }
    }

    /// The (event name, data) pairs of the stream of `sent`.
    async fn streamed(sent: Vec<GenEvent>) -> Vec<(String, Value)> {
        let body = Sse::new(sse_events(turn(), Events::from_sent(sent))).into_response();
        let bytes = axum::body::to_bytes(body.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let mut out = Vec::new();
        let mut name = String::new();
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                out.push((name.clone(), serde_json::from_str(d).unwrap()));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_failure_mid_stream_is_an_error_event_with_the_body_a_response_gets() {
        let failed = || vec![token(), GenEvent::Error("out of memory".into())];
        let events = streamed(failed()).await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "error"
            ]
        );
        let body =
            json!({"type": "error", "error": {"type": "api_error", "message": "out of memory"}});
        assert_eq!(events[3].1, body);
        let whole = turn()
            .collect(Events::from_sent(failed()))
            .await
            .unwrap_err();
        assert_eq!(whole.status.as_u16(), 500);
        assert_eq!(serde_json::to_value(whole.anthropic_body()).unwrap(), body);

        let busy = EngineError::Session(KvError::Busy("s".into()));
        let events = streamed(vec![token(), GenEvent::Rejected(busy)]).await;
        let (name, last) = events.last().unwrap();
        assert_eq!(
            (name.as_str(), &last["error"]["type"]),
            ("error", &json!("invalid_request_error"))
        );
    }

    #[tokio::test]
    async fn a_whole_stream_ends_with_the_usage_split() {
        let done = GenEvent::Done {
            finish: crate::engine::FinishReason::Stop,
            usage: crate::engine::Usage {
                prompt_tokens: 5,
                completion_tokens: 1,
                cached_tokens: 3,
            },
            stop_sequence: None,
        };
        let events = streamed(vec![token(), done]).await;
        let (name, delta) = &events[events.len() - 2];
        assert_eq!(name, "message_delta");
        assert_eq!(
            delta["usage"],
            json!({"input_tokens": 0, "output_tokens": 1, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3})
        );
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert_eq!(events.last().unwrap().0, "message_stop");
    }
}

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

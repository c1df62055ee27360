//! The streamed response: one SSE event per `chat.completion.chunk` (or streamed
//! `text_completion`), `data: [DONE]` at the end, or the error event of a generation
//! that fails part-way, then the stream closes. A reader that goes away or stops
//! reading cancels the generation behind it.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use tokio::sync::mpsc;

use crate::engine::{LogprobEntry, Usage};

use super::super::error::sse_json;
use super::super::tools::{CallParser, Piece};
use super::super::types::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatLogprobs, CompletionLogprobs,
    FinishReason, TextChunkChoice, TextCompletionChunk, UsageOut,
};
use super::{fingerprint, now_secs, Events, Kind, Reply, Step};

impl Reply {
    /// One chunk adding `delta` and the logprobs of its tokens; a text completion
    /// carries the delta's content as its `text`.
    fn chunk(
        &self,
        created: u64,
        delta: ChatDelta,
        lps: &[LogprobEntry],
        finish: Option<FinishReason>,
    ) -> Event {
        let lps = (self.want_logprobs && !lps.is_empty()).then_some(lps);
        match self.kind {
            Kind::Chat => self.chat_chunk(
                created,
                vec![ChatChunkChoice {
                    index: 0,
                    delta,
                    logprobs: lps.map(ChatLogprobs::of),
                    finish_reason: finish,
                }],
                None,
            ),
            Kind::Text => self.text_chunk(
                created,
                vec![TextChunkChoice {
                    index: 0,
                    text: delta.content.unwrap_or_default(),
                    logprobs: lps.map(CompletionLogprobs::of),
                    finish_reason: finish,
                }],
                None,
            ),
        }
    }

    /// The last chunk with `stream_options.include_usage`: no choices, the usage.
    fn usage_chunk(&self, created: u64, usage: Usage) -> Event {
        let usage = Some(UsageOut::from(usage));
        match self.kind {
            Kind::Chat => self.chat_chunk(created, Vec::new(), usage),
            Kind::Text => self.text_chunk(created, Vec::new(), usage),
        }
    }

    fn chat_chunk(
        &self,
        created: u64,
        choices: Vec<ChatChunkChoice>,
        usage: Option<UsageOut>,
    ) -> Event {
        sse_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created,
            model: self.model.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn text_chunk(
        &self,
        created: u64,
        choices: Vec<TextChunkChoice>,
        usage: Option<UsageOut>,
    ) -> Event {
        sse_json(&TextCompletionChunk {
            id: self.id.clone(),
            object: "text_completion",
            created,
            model: self.model.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }
}

/// Events buffered between the generation and a slow client before back-pressure.
const STREAM_BUFFER: usize = 64;

pub(super) fn sse(
    reply: Reply,
    events: Events,
    idle: Option<Duration>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let id = reply.id.clone();
    serve_sse(sse_events(reply, events), id, idle)
}

/// Serve `src` as an SSE response with keep-alive comments, through a bounded buffer:
/// a client that reads nothing for `idle` is cut off, and one that goes away drops
/// `src` (cancelling the generation behind it). Shared by every streaming protocol.
pub(crate) fn serve_sse<S>(
    src: S,
    id: String,
    idle: Option<Duration>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>>
where
    S: futures::Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let (tx, out) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        if forward(src, tx, idle).await == Forwarded::IdleTimeout {
            tracing::warn!(request_id = %id, "stream left unread past the idle timeout; generation cancelled");
            crate::metrics::stream_idle_timeout();
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}

#[derive(Debug, PartialEq)]
enum Forwarded {
    /// The source ended.
    Done,
    /// The client went away (its receiver was dropped).
    Gone,
    /// The client kept the connection but read nothing for `idle`.
    IdleTimeout,
}

/// Move `src` into `tx` until it ends, the receiver is dropped, or one event waits
/// longer than `idle` for room. Dropping `src` on return cancels the generation
/// behind it (the engine sees its channel closed at the next step).
async fn forward<S, T>(src: S, tx: mpsc::Sender<T>, idle: Option<Duration>) -> Forwarded
where
    S: futures::Stream<Item = T>,
{
    use futures::StreamExt;
    let mut src = std::pin::pin!(src);
    while let Some(item) = src.next().await {
        let sent = match idle {
            Some(d) => tx.send_timeout(item, d).await.map_err(|e| match e {
                mpsc::error::SendTimeoutError::Timeout(_) => Forwarded::IdleTimeout,
                mpsc::error::SendTimeoutError::Closed(_) => Forwarded::Gone,
            }),
            None => tx.send(item).await.map_err(|_| Forwarded::Gone),
        };
        if let Err(why) = sent {
            return why;
        }
    }
    Forwarded::Done
}

/// Stream deltas for parsed pieces (a call's first delta names it; later ones carry
/// pieces of its arguments as they were generated).
fn piece_deltas(pieces: Vec<Piece>) -> Vec<ChatDelta> {
    pieces
        .iter()
        .filter(|p| !matches!(p, Piece::Content(t) | Piece::Args { text: t, .. } if t.is_empty()))
        .map(Piece::delta)
        .collect()
}

fn sse_events(
    reply: Reply,
    mut events: Events,
) -> impl futures::Stream<Item = Result<Event, Infallible>> {
    let created = now_secs();
    let mut parser = reply.tools.as_ref().map(|p| CallParser::new(p, &reply.id));
    async_stream::stream! {
        if reply.kind == Kind::Chat {
            yield Ok(reply.chunk(created, ChatDelta::start(), &[], None));
        }
        loop {
            match events.next().await {
                Step::Token { text, logprob } => {
                    let lps: Vec<LogprobEntry> = logprob.into_iter().collect();
                    match parser.as_mut() {
                        None => {
                            if !text.is_empty() || !lps.is_empty() {
                                yield Ok(reply.chunk(created, ChatDelta::content(text), &lps, None));
                            }
                        }
                        Some(p) => {
                            let deltas = piece_deltas(p.push(&text));
                            if deltas.is_empty() && !lps.is_empty() {
                                yield Ok(reply.chunk(created, ChatDelta::default(), &lps, None));
                            }
                            for (i, d) in deltas.into_iter().enumerate() {
                                let l: &[LogprobEntry] = if i == 0 { &lps } else { &[] };
                                yield Ok(reply.chunk(created, d, l, None));
                            }
                        }
                    }
                }
                Step::Done { finish, usage } => {
                    let mut calls = 0;
                    if let Some(p) = parser.as_mut() {
                        for d in piece_deltas(p.finish()) {
                            yield Ok(reply.chunk(created, d, &[], None));
                        }
                        calls = p.calls();
                    }
                    let reason = FinishReason::of(finish, calls);
                    yield Ok(reply.chunk(created, ChatDelta::default(), &[], Some(reason)));
                    if reply.include_usage {
                        yield Ok(reply.usage_chunk(created, usage));
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    break;
                }
                Step::Failed(e) => {
                    yield Ok(e.sse_event());
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use axum::response::{IntoResponse, Response};
    use serde_json::Value;

    use crate::api::auth::Principal;
    use crate::api::error::ApiError;
    use crate::api::limits::Limiter;
    use crate::engine::{EngineError, GenEvent};
    use crate::kv::store::KvError;

    /// An endless source that records when it is dropped.
    fn endless(dropped: Arc<AtomicBool>) -> impl futures::Stream<Item = u32> {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped);
        async_stream::stream! {
            let _flag = flag;
            let mut i = 0u32;
            loop {
                i += 1;
                yield i;
            }
        }
    }

    #[tokio::test]
    async fn unread_stream_is_cut_after_idle_and_source_dropped() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, _rx_kept_but_unread) = mpsc::channel(4);
        let t0 = Instant::now();
        let why = forward(
            endless(dropped.clone()),
            tx,
            Some(Duration::from_millis(100)),
        )
        .await;
        assert_eq!(why, Forwarded::IdleTimeout);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(dropped.load(Ordering::SeqCst), "generation not released");
    }

    #[tokio::test]
    async fn gone_client_stops_forwarding_and_reader_gets_everything_else() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let why = forward(endless(dropped.clone()), tx, Some(Duration::from_secs(60))).await;
        assert_eq!(why, Forwarded::Gone);
        assert!(dropped.load(Ordering::SeqCst));

        let (tx, mut rx) = mpsc::channel(1);
        let src = futures::stream::iter(0..100u32);
        let fwd = tokio::spawn(forward(src, tx, Some(Duration::from_secs(5))));
        let mut got = Vec::new();
        while let Some(x) = rx.recv().await {
            tokio::time::sleep(Duration::from_millis(1)).await;
            got.push(x);
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(fwd.await.unwrap(), Forwarded::Done);
    }

    fn reply(kind: Kind, stream: bool) -> Reply {
        Reply {
            kind,
            id: "chatcmpl-test".into(),
            model: "m".into(),
            want_logprobs: false,
            stream,
            include_usage: false,
            tools: None,
        }
    }

    /// `sent` as the engine's events, the channel closed after them.
    fn events(sent: Vec<GenEvent>) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in sent {
            tx.send(e).unwrap();
        }
        Events {
            peek: None,
            rx,
            _permit: Limiter::new(0).acquire(&Principal::default()).unwrap(),
        }
    }

    async fn body_text(r: Response) -> (u16, String) {
        let status = r.status().as_u16();
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// The `data:` payloads of an SSE body.
    fn data_lines(text: &str) -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    /// A generation that fails after one token with the event `end` makes (none: the
    /// engine lets go): the status and body a whole response gets, and the events of
    /// a stream.
    async fn fail_after_a_token(end: fn() -> Option<GenEvent>) -> ((u16, Value), Vec<Value>) {
        let sent = || {
            let token = GenEvent::Token {
                text: "Hi".into(),
                logprob: None,
            };
            std::iter::once(token).chain(end()).collect::<Vec<_>>()
        };
        let whole = match super::super::collect(reply(Kind::Chat, false), events(sent())).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let (status, text) = body_text(whole).await;
        let streamed = Sse::new(sse_events(reply(Kind::Chat, true), events(sent())));
        let (_, sse) = body_text(streamed.into_response()).await;
        (
            (status, serde_json::from_str(&text).unwrap()),
            data_lines(&sse),
        )
    }

    #[tokio::test]
    async fn a_refusal_mid_stream_is_the_error_its_response_would_be() {
        let busy = EngineError::Session(KvError::Busy("agent-1".into()));
        // Before the first byte a refusal is its own response (see `run`).
        let (status, text) = body_text(ApiError::from(busy).into_response()).await;
        assert_eq!(status, 409);
        let refused: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(refused["error"]["code"], "session_busy");
        let ((status, whole), streamed) = fail_after_a_token(|| {
            Some(GenEvent::Rejected(EngineError::Session(KvError::Busy(
                "agent-1".into(),
            ))))
        })
        .await;
        assert_eq!((status, &whole), (409, &refused));
        assert_eq!(streamed[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(streamed.last(), Some(&refused), "{streamed:?}");
        assert_eq!(streamed.len(), 3, "the error event ends the stream");
    }

    #[tokio::test]
    async fn engine_failures_mid_stream_are_the_errors_responses_carry() {
        let failures: [fn() -> Option<GenEvent>; 2] =
            [|| Some(GenEvent::Error("out of memory".into())), || None];
        for end in failures {
            let ((status, whole), streamed) = fail_after_a_token(end).await;
            assert_eq!(status, 500);
            assert_eq!(whole["error"]["code"], "internal_error", "{whole}");
            assert_eq!(streamed.last(), Some(&whole), "{streamed:?}");
        }
    }
}

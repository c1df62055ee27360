//! One assistant turn in Anthropic's terms: generated text → content blocks (`text`,
//! `tool_use` through the same [`CallParser`] as chat completions) → stream events.
//! A whole response is the fold of the events a stream would carry, so the two can
//! not disagree.

use serde_json::{json, Value};

use crate::engine::{self, Usage};

use super::super::error::ApiError;
use super::super::generate::{Events, Step};
use super::super::tools::{CallParser, Piece, ToolPlan};
use super::types::{
    BlockDelta, ContentBlock, MessageDelta, MessageResponse, MessageUsage, StopReason, StreamEvent,
};

/// What is open at the end of the content.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Text,
    /// A `tool_use` block for parsed call `call`.
    Tool {
        call: usize,
    },
}

pub struct Turn {
    pub id: String,
    model: String,
    parser: Option<CallParser>,
    /// Prefix of this turn's `toolu_` ids.
    tool_ids: String,
    prompt_tokens: usize,
    has_session: bool,
    open: Option<Open>,
    /// Blocks begun so far.
    blocks: usize,
}

/// Anthropic's usage from the engine's: tokens reused from the KV cache are read from
/// the cache; with a session, the other prompt tokens are written into its cache
/// (creation); without one they are plain input.
pub fn usage(u: &Usage, has_session: bool) -> MessageUsage {
    let read = u.cached_tokens.min(u.prompt_tokens);
    let created = if has_session {
        u.prompt_tokens - read
    } else {
        0
    };
    MessageUsage {
        input_tokens: u.prompt_tokens - read - created,
        output_tokens: u.completion_tokens,
        cache_creation_input_tokens: created,
        cache_read_input_tokens: read,
    }
}

fn stop_reason(
    finish: engine::FinishReason,
    calls: usize,
    stop_sequence: Option<String>,
) -> (StopReason, Option<String>) {
    match finish {
        engine::FinishReason::Length => (StopReason::MaxTokens, None),
        engine::FinishReason::Stop if calls > 0 => (StopReason::ToolUse, None),
        engine::FinishReason::Stop => match stop_sequence {
            Some(s) => (StopReason::StopSequence, Some(s)),
            None => (StopReason::EndTurn, None),
        },
    }
}

impl Turn {
    pub fn new(
        id: String,
        model: String,
        tools: Option<ToolPlan>,
        uuid: &str,
        prompt_tokens: usize,
        has_session: bool,
    ) -> Self {
        Self {
            parser: tools.as_ref().map(|p| CallParser::new(p, &id)),
            tool_ids: format!("toolu_{}", &uuid[..uuid.len().min(20)]),
            id,
            model,
            prompt_tokens,
            has_session,
            open: None,
            blocks: 0,
        }
    }

    fn message(&self, content: Vec<ContentBlock>, usage: MessageUsage) -> MessageResponse {
        MessageResponse {
            id: self.id.clone(),
            kind: "message",
            role: "assistant",
            content,
            model: self.model.clone(),
            stop_reason: None,
            stop_sequence: None,
            usage,
        }
    }

    /// The first event. How much of the prompt the cache held is known only at the
    /// end: here the whole prompt counts as input, `message_delta` has the split.
    pub fn start(&self) -> StreamEvent {
        let usage = MessageUsage {
            input_tokens: self.prompt_tokens,
            output_tokens: 0,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
        };
        StreamEvent::MessageStart {
            message: self.message(Vec::new(), usage),
        }
    }

    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if self.open.take().is_some() {
            out.push(StreamEvent::ContentBlockStop {
                index: self.blocks - 1,
            });
        }
    }

    fn begin(&mut self, open: Open, block: ContentBlock, out: &mut Vec<StreamEvent>) {
        self.close(out);
        out.push(StreamEvent::ContentBlockStart {
            index: self.blocks,
            content_block: block,
        });
        self.blocks += 1;
        self.open = Some(open);
    }

    fn piece(&mut self, p: Piece, out: &mut Vec<StreamEvent>) {
        match p {
            Piece::Content(text) if text.is_empty() => {}
            Piece::Content(text) => {
                if self.open != Some(Open::Text) {
                    let block = ContentBlock::Text {
                        text: String::new(),
                    };
                    self.begin(Open::Text, block, out);
                }
                out.push(StreamEvent::ContentBlockDelta {
                    index: self.blocks - 1,
                    delta: BlockDelta::TextDelta { text },
                });
            }
            Piece::Start { index, name, .. } => {
                let block = ContentBlock::ToolUse {
                    id: format!("{}{index:02}", self.tool_ids),
                    name,
                    input: json!({}),
                };
                self.begin(Open::Tool { call: index }, block, out);
            }
            Piece::Args { index, text } => {
                if !text.is_empty() && self.open == Some(Open::Tool { call: index }) {
                    out.push(StreamEvent::ContentBlockDelta {
                        index: self.blocks - 1,
                        delta: BlockDelta::InputJsonDelta { partial_json: text },
                    });
                }
            }
        }
    }

    /// The events for more generated text.
    pub fn token(&mut self, text: String) -> Vec<StreamEvent> {
        let pieces = match self.parser.as_mut() {
            Some(p) => p.push(&text),
            None => vec![Piece::Content(text)],
        };
        let mut out = Vec::new();
        for p in pieces {
            self.piece(p, &mut out);
        }
        out
    }

    /// The last events: what the parser held, the end of the content (an empty text
    /// block if there was none), `message_delta` with the totals, `message_stop`.
    pub fn done(
        &mut self,
        finish: engine::FinishReason,
        u: &Usage,
        stop_sequence: Option<String>,
    ) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        let held = self
            .parser
            .as_mut()
            .map(CallParser::finish)
            .unwrap_or_default();
        for p in held {
            self.piece(p, &mut out);
        }
        if self.blocks == 0 {
            let block = ContentBlock::Text {
                text: String::new(),
            };
            self.begin(Open::Text, block, &mut out);
        }
        self.close(&mut out);
        let calls = self.parser.as_ref().map_or(0, CallParser::calls);
        let (stop_reason, stop_sequence) = stop_reason(finish, calls, stop_sequence);
        out.push(StreamEvent::MessageDelta {
            delta: MessageDelta {
                stop_reason: Some(stop_reason),
                stop_sequence,
            },
            usage: usage(u, self.has_session),
        });
        out.push(StreamEvent::MessageStop);
        out
    }

    /// The whole message: every event of the generation, folded.
    pub async fn collect(mut self, mut events: Events) -> Result<MessageResponse, ApiError> {
        let mut all = vec![self.start()];
        loop {
            match events.next().await {
                Step::Token { text, .. } => all.extend(self.token(text)),
                Step::Done {
                    finish,
                    usage,
                    stop_sequence,
                } => {
                    all.extend(self.done(finish, &usage, stop_sequence));
                    break;
                }
                Step::Failed(e) => return Err(e),
            }
        }
        Ok(fold(all))
    }
}

/// The message a stream of events describes.
pub fn fold(events: Vec<StreamEvent>) -> MessageResponse {
    let mut msg: Option<MessageResponse> = None;
    let mut json_parts: Vec<String> = Vec::new();
    for e in events {
        match e {
            StreamEvent::MessageStart { message } => msg = Some(message),
            StreamEvent::ContentBlockStart { content_block, .. } => {
                if let Some(m) = msg.as_mut() {
                    m.content.push(content_block);
                    json_parts.push(String::new());
                }
            }
            StreamEvent::ContentBlockDelta { index, delta } => {
                let block = msg.as_mut().and_then(|m| m.content.get_mut(index));
                match (block, delta) {
                    (Some(ContentBlock::Text { text }), BlockDelta::TextDelta { text: t }) => {
                        text.push_str(&t)
                    }
                    (
                        Some(ContentBlock::ToolUse { .. }),
                        BlockDelta::InputJsonDelta { partial_json },
                    ) => {
                        if let Some(j) = json_parts.get_mut(index) {
                            j.push_str(&partial_json);
                        }
                    }
                    _ => {}
                }
            }
            StreamEvent::ContentBlockStop { index } => {
                let block = msg.as_mut().and_then(|m| m.content.get_mut(index));
                if let (Some(ContentBlock::ToolUse { input, .. }), Some(j)) =
                    (block, json_parts.get(index))
                {
                    // A call cut short (max_tokens) keeps an empty input.
                    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(j) {
                        *input = v;
                    }
                }
            }
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(m) = msg.as_mut() {
                    m.stop_reason = delta.stop_reason;
                    m.stop_sequence = delta.stop_sequence;
                    m.usage = usage;
                }
            }
            StreamEvent::MessageStop => {}
        }
    }
    msg.unwrap_or_else(|| MessageResponse {
        id: String::new(),
        kind: "message",
        role: "assistant",
        content: Vec::new(),
        model: String::new(),
        stop_reason: None,
        stop_sequence: None,
        usage: MessageUsage {
            input_tokens: 0,
            output_tokens: 0,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(prompt: usize, cached: usize, out: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: out,
            cached_tokens: cached,
        }
    }

    #[test]
    fn usage_splits_the_prompt() {
        let with = usage(&u(100, 90, 5), true);
        assert_eq!(
            (
                with.input_tokens,
                with.cache_read_input_tokens,
                with.cache_creation_input_tokens
            ),
            (0, 90, 10)
        );
        let without = usage(&u(100, 20, 5), false);
        assert_eq!(
            (
                without.input_tokens,
                without.cache_read_input_tokens,
                without.cache_creation_input_tokens
            ),
            (80, 20, 0)
        );
        assert_eq!(without.output_tokens, 5);
    }

    #[test]
    fn text_turn_folds_to_its_stream() {
        let mut t = Turn::new("msg_x".into(), "m".into(), None, "abc", 7, false);
        let mut all = vec![t.start()];
        all.extend(t.token("Hel".into()));
        all.extend(t.token(String::new()));
        all.extend(t.token("lo".into()));
        all.extend(t.done(engine::FinishReason::Stop, &u(7, 0, 3), Some("END".into())));
        let names: Vec<&str> = all.iter().map(StreamEvent::name).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let m = fold(all);
        assert_eq!(
            m.content,
            vec![ContentBlock::Text {
                text: "Hello".into()
            }]
        );
        assert_eq!(m.stop_reason, Some(StopReason::StopSequence));
        assert_eq!(m.stop_sequence.as_deref(), Some("END"));
        assert_eq!(m.usage.input_tokens, 7);
    }

    #[test]
    fn an_empty_turn_has_one_empty_text_block() {
        let mut t = Turn::new("msg_x".into(), "m".into(), None, "abc", 7, false);
        let mut all = vec![t.start()];
        all.extend(t.done(engine::FinishReason::Length, &u(7, 0, 1), None));
        let m = fold(all);
        assert_eq!(
            m.content,
            vec![ContentBlock::Text {
                text: String::new()
            }]
        );
        assert_eq!(m.stop_reason, Some(StopReason::MaxTokens));
    }
}

//! What travels between the API and the engine thread: a checked generation request
//! (carrying its own reply channel) and the events the worker sends back.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::decode::grammar::Grammar;
use super::decode::sampling::SamplingParams;
use super::EngineError;
use crate::kv::store::SessionInfo;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// A token's logprob with texts, ready for the OpenAI `logprobs` object.
#[derive(Debug, Clone)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the worker sends back while generating.
#[derive(Debug)]
pub enum GenEvent {
    /// One generated token; `text` is what it completes (may be empty while a multi-byte
    /// character or a possible stop string is held back).
    Token {
        text: String,
        logprob: Option<LogprobEntry>,
    },
    Done {
        finish: FinishReason,
        usage: Usage,
        /// The stop string that ended it (`finish` is `Stop`), None for an
        /// end-of-generation token or another reason.
        stop_sequence: Option<String>,
    },
    Error(String),
    /// Refused before any work (e.g. the session is busy).
    Rejected(EngineError),
}

/// A checked generation request.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Session whose cache to use and keep (`prompt_cache_key`); None: anonymous pool.
    pub session: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Grammar the output must follow (`response_format`, forced tool calls).
    pub grammar: Option<Arc<Grammar>>,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub span: tracing::Span,
    pub enqueued: Instant,
}

/// What the engine thread takes from its queue.
// Generation requests are the common case; boxing them would add an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    Generate(GenRequest),
    /// A change to the session store, which the engine thread alone owns.
    Session(SessionCmd),
}

/// Session store commands from the API, each with its reply channel.
pub enum SessionCmd {
    Delete {
        id: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Pin {
        id: String,
        pinned: bool,
        reply: oneshot::Sender<Result<SessionInfo, EngineError>>,
    },
    /// Write every idle session to the spill dir; answers how many were written.
    SpillAll { reply: oneshot::Sender<usize> },
    /// Attach an opaque note to a session (kept, spilled and dropped with it).
    PutNote {
        id: String,
        key: String,
        value: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// The session holding a note under `key`, with all of its notes.
    FindNote {
        key: String,
        reply: oneshot::Sender<Option<(String, Notes)>>,
    },
}

/// A session's notes: opaque strings under string keys.
pub type Notes = std::collections::BTreeMap<String, String>;

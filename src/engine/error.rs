//! The engine's error type: a leaf that every room of the engine may import (and
//! `api` maps to HTTP statuses). It imports nothing from the engine.

use crate::kv::store::KvError;

/// Errors of the engine layer. `api` maps them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model load failed: {0}")]
    Load(String),
    #[error("model fetch failed: {0}")]
    Fetch(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the model is still loading")]
    Loading,
    #[error("the engine is not running: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Session(#[from] KvError),
    #[error("constrained decoding failed: {0}")]
    Constraint(String),
}

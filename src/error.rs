//! The crate-level error type for start-up and serving (not request errors: those are
//! `engine::EngineError`, mapped to HTTP in `api::error`).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration error: {0}")]
    Config(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

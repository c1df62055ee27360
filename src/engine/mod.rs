//! The inference engine: model loading, tokenizer, chat template, sampling, stop
//! conditions and the generation worker, which runs on its own thread and owns the
//! model. Callers reach it only through [`Engine`]: a bounded queue of typed requests,
//! each carrying its own reply channel.
//!
//! Depends on `kv` (caches) and `metrics`; never on `api` or axum.

pub mod decode;
mod error;
pub mod fetch;
pub mod kernels;
pub mod model;
mod request;
pub mod text;
mod worker;

pub use error::EngineError;
pub use request::{
    Command, FinishReason, GenEvent, GenRequest, LogprobEntry, Notes, SessionCmd, Usage,
};

pub use worker::{device_memory, pick_device};

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::kv::store::{KvError, SessionInfo, StoreStats};

pub use decode::sampling::{SamplingParams, TokenLogprob};
pub use text::template::{ChatTemplate, TemplateMessage};
pub use text::tokenizer::Tok;

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: String,
    pub data_dir: PathBuf,
    /// Context size in tokens; 0 = the model's training context.
    pub ctx_size: usize,
    pub threads: usize,
    /// Requests that may wait for the worker before new ones get 503.
    pub queue_size: usize,
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Bytes the idle session caches may hold (host RAM).
    pub kv_budget: usize,
    /// Budget of the idle caches in GPU memory (a GPU device only).
    pub kv_device_budget: crate::kv::store::tiers::DeviceBudget,
    /// Element type of every session cache.
    pub kv_dtype: crate::kv::KvDtype,
    pub kv_spill_dir: PathBuf,
    /// 0: no spilling.
    pub kv_disk_budget: u64,
    /// The spill dir is shared with other replicas (leases, write-behind, lookup on a miss).
    pub kv_shared: bool,
    /// `auto`, `cpu`, `cuda[:N]` or `metal`.
    pub device: String,
    /// When the host's available memory drops below this many bytes, idle session caches
    /// leave memory (0 = never).
    pub kv_min_free: usize,
}

/// Facts about the loaded model, for `/v1/models`, validation and metrics.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub path: PathBuf,
    pub arch: String,
    pub ctx_size: usize,
    pub vocab_size: usize,
    pub n_layers: usize,
    pub weight_bytes: usize,
    pub kv_bytes_per_token: usize,
    pub kv_dtype: crate::kv::KvDtype,
    pub created: u64,
}

/// Everything the HTTP side may use once the model is loaded (all thread-safe).
pub struct Loaded {
    pub info: ModelInfo,
    pub tok: Arc<Tok>,
    pub template: ChatTemplate,
    /// The vocabulary as bytes, for constrained decoding.
    pub tokens: Arc<decode::constrain::TokenTable>,
}

#[derive(Clone)]
pub enum EngineState {
    Loading,
    Ready(Arc<Loaded>),
    Failed(String),
}

/// What the API may read of a model's session store without asking the engine thread:
/// the sessions and the store's totals as of its last change, published by the engine
/// thread (which alone owns the store).
#[derive(Debug, Clone, Default)]
pub struct StoreView {
    pub sessions: Vec<SessionInfo>,
    pub stats: StoreStats,
}

/// Slots of the command queue beyond `queue_size`, so that session commands (delete,
/// pin, spill) find room while generation requests fill the queue.
const CONTROL_SLOTS: usize = 32;

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    /// The name the model is served under (`fetch::served_id` of its spec).
    id: Arc<str>,
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<EngineState>,
    queue_size: usize,
    /// Generation requests sent and not yet taken by the engine thread.
    waiting: Arc<AtomicUsize>,
    view: watch::Receiver<Arc<StoreView>>,
}

impl Engine {
    /// Start the worker thread: it fetches and loads the model, then serves requests.
    pub fn start(cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1) + CONTROL_SLOTS);
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let (view_tx, view) = watch::channel(Arc::new(StoreView::default()));
        let queue_size = cfg.queue_size;
        let waiting = Arc::new(AtomicUsize::new(0));
        let id: Arc<str> = fetch::served_id(&cfg.model).into();
        let link = worker::Link {
            rx,
            state: state_tx,
            view: view_tx,
            waiting: waiting.clone(),
        };
        std::thread::Builder::new()
            .name("candela-engine".into())
            .spawn(move || worker::run(cfg, link))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot spawn engine thread: {e}"));
        Self {
            id,
            tx,
            state,
            queue_size,
            waiting,
            view,
        }
    }

    /// The name the model is served under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sessions and store totals as the engine thread last published them.
    pub fn store_view(&self) -> Arc<StoreView> {
        self.view.borrow().clone()
    }

    pub fn list_sessions(&self) -> Vec<SessionInfo> {
        self.store_view().sessions.clone()
    }

    pub fn session(&self, id: &str) -> Result<SessionInfo, EngineError> {
        self.store_view()
            .sessions
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| KvError::NotFound(id.to_string()).into())
    }

    pub fn kv_stats(&self) -> StoreStats {
        self.store_view().stats
    }

    /// Send a session command to the engine thread and wait for its answer. The store
    /// exists once the model is loaded; before that there are no sessions to act on.
    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<T>) -> SessionCmd,
    ) -> Result<T, EngineError> {
        self.loaded()?;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Session(cmd(reply)))
            .await
            .map_err(|_| EngineError::Unavailable("engine thread stopped".into()))?;
        answer
            .await
            .map_err(|_| EngineError::Unavailable("engine thread stopped".into()))
    }

    pub async fn delete_session(&self, id: &str) -> Result<(), EngineError> {
        let id = id.to_string();
        self.ask(|reply| SessionCmd::Delete { id, reply }).await?
    }

    pub async fn pin_session(&self, id: &str, pinned: bool) -> Result<SessionInfo, EngineError> {
        let id = id.to_string();
        self.ask(|reply| SessionCmd::Pin { id, pinned, reply })
            .await?
    }

    /// Attach `value` under `key` to session `id`: the note lives as long as the
    /// session does (memory, disk, restart) and goes when it is evicted or deleted.
    pub async fn put_note(&self, id: &str, key: &str, value: String) -> Result<(), EngineError> {
        let (id, key) = (id.to_string(), key.to_string());
        self.ask(|reply| SessionCmd::PutNote {
            id,
            key,
            value,
            reply,
        })
        .await?
    }

    /// The session holding a note under `key`, with all of that session's notes.
    pub async fn find_note(&self, key: &str) -> Result<Option<(String, Notes)>, EngineError> {
        let key = key.to_string();
        self.ask(|reply| SessionCmd::FindNote { key, reply }).await
    }

    /// Write every idle session to the spill dir (graceful shutdown); the number written.
    pub async fn spill_all(&self) -> usize {
        self.ask(|reply| SessionCmd::SpillAll { reply })
            .await
            .unwrap_or(0)
    }

    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// Wait until the model is loaded or loading failed.
    pub async fn wait_ready(&self) -> Result<Arc<Loaded>, EngineError> {
        let mut rx = self.state.clone();
        loop {
            match rx.borrow_and_update().clone() {
                EngineState::Ready(l) => return Ok(l),
                EngineState::Failed(e) => return Err(EngineError::Unavailable(e)),
                EngineState::Loading => {}
            }
            if rx.changed().await.is_err() {
                return Err(EngineError::Unavailable("engine thread exited".into()));
            }
        }
    }

    pub fn loaded(&self) -> Result<Arc<Loaded>, EngineError> {
        match self.state() {
            EngineState::Ready(l) => Ok(l),
            EngineState::Loading => Err(EngineError::Loading),
            EngineState::Failed(e) => Err(EngineError::Unavailable(e)),
        }
    }

    /// Queue a request; a full queue is an immediate error, never an unbounded wait.
    pub fn submit(&self, req: GenRequest) -> Result<(), EngineError> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue_size.max(1) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull(self.queue_size));
        }
        self.tx.try_send(Command::Generate(req)).map_err(|e| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            match e {
                mpsc::error::TrySendError::Full(_) => EngineError::QueueFull(self.queue_size),
                mpsc::error::TrySendError::Closed(_) => {
                    EngineError::Unavailable("engine thread stopped".into())
                }
            }
        })
    }

    /// Generation requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

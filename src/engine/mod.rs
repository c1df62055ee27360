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
pub use request::{FinishReason, GenEvent, GenRequest, LogprobEntry, Usage};

pub use worker::pick_device;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::kv::store::{SessionInfo, SessionStore};

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
    /// Bytes the idle session caches may hold.
    pub kv_budget: usize,
    /// Element type of every session cache.
    pub kv_dtype: crate::kv::KvDtype,
    pub kv_spill_dir: PathBuf,
    /// 0: no spilling.
    pub kv_disk_budget: u64,
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

/// Hand freed heap pages back to the OS. glibc keeps freed blocks in its arenas, so
/// without this the RSS stays at its peak after session caches are dropped or spilled
/// (a cache is many ~100 KB blocks, under the mmap threshold). No-op off glibc.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    /// The name the model is served under (`fetch::served_id` of its spec).
    id: Arc<str>,
    tx: mpsc::Sender<GenRequest>,
    state: watch::Receiver<EngineState>,
    queue_size: usize,
    sessions: Arc<Mutex<SessionStore>>,
}

impl Engine {
    /// Start the worker thread: it fetches and loads the model, then serves requests.
    pub fn start(cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_size.max(1));
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let queue_size = cfg.queue_size;
        let id: Arc<str> = fetch::served_id(&cfg.model).into();
        let sessions = Arc::new(Mutex::new(SessionStore::new(cfg.kv_budget)));
        let store = sessions.clone();
        std::thread::Builder::new()
            .name("candela-engine".into())
            .spawn(move || worker::run(cfg, rx, state_tx, store))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot spawn engine thread: {e}"));
        Self {
            id,
            tx,
            state,
            queue_size,
            sessions,
        }
    }

    /// The name the model is served under.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn store(&self) -> std::sync::MutexGuard<'_, SessionStore> {
        // The store's maps stay consistent between statements, so a lock poisoned by a
        // panic elsewhere is still usable.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list_sessions(&self) -> Vec<SessionInfo> {
        self.store().list()
    }

    pub fn session(&self, id: &str) -> Result<SessionInfo, EngineError> {
        Ok(self.store().get(id)?)
    }

    pub fn delete_session(&self, id: &str) -> Result<(), EngineError> {
        let mut st = self.store();
        st.delete(id)?;
        let (stats, delta) = st.report();
        crate::metrics::kv_store(&self.id, &stats, &delta);
        drop(st);
        release_freed_memory();
        Ok(())
    }

    pub fn pin_session(&self, id: &str, pinned: bool) -> Result<SessionInfo, EngineError> {
        Ok(self.store().set_pinned(id, pinned)?)
    }

    pub fn kv_stats(&self) -> crate::kv::store::StoreStats {
        self.store().stats()
    }

    /// Write every idle session to the spill dir (graceful shutdown).
    pub fn spill_all(&self) -> usize {
        self.store().spill_all()
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
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::QueueFull(self.queue_size),
            mpsc::error::TrySendError::Closed(_) => {
                EngineError::Unavailable("engine thread stopped".into())
            }
        })
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

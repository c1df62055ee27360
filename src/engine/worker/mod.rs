//! The engine thread: it owns the model, every live sequence and the model's session
//! store (the API reads a published [`StoreView`] and changes the store only through
//! [`SessionCmd`]s on the same queue as generation requests).
//!
//! Each loop turn takes what the queue holds (session commands are answered at once,
//! generation requests wait in order), admits requests up to `max_batch` live
//! sequences, then runs one forward pass where it can: the next prompt chunks of
//! sequences still reading their prompts (`PREFILL_CHUNK` tokens in all,
//! `MIXED_PREFILL_CHUNK` while others decode on host caches, `IDLE_WIDE_PREFILL_CHUNK`
//! while nothing decodes on a device that prefills wide) together with the next token of every
//! decoding sequence. Sequences join and leave between steps. Loading is in [`load`],
//! per-sequence work in [`seq`], the steps in [`step`].

mod load;
mod seq;
mod step;
#[cfg(test)]
mod tests;

pub use load::{device_memory, pick_device};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use tokio::sync::{mpsc, watch};

use super::model::{Logits, Model, SeqInput};
use super::{
    Command, EngineConfig, EngineState, GenEvent, GenRequest, Loaded, SessionCmd, StoreView,
};
use crate::kv::store::{SessionStore, SpillConfig, StoreStats};
use crate::kv::{CacheLayout, KvDtype};
use crate::metrics;
use seq::{admit, Seq};

/// Prompt tokens processed per forward pass during prefill, so that a long prompt does
/// not stall the decode steps of other sequences for its whole length.
const PREFILL_CHUNK: usize = 512;
/// Prompt tokens per forward pass while other sequences are decoding. Their next tokens
/// ride in the same pass (a mixed step), so a long prompt joining holds each running
/// stream up by one such chunk at a time (~0.1 s on two cores for a small model), not by
/// a whole `PREFILL_CHUNK` plus a separate decode pass.
const MIXED_PREFILL_CHUNK: usize = 128;
/// Prompt tokens per pass on a device that prefills wide (see
/// [`Forward::prefill_wide`]) while no other sequence decodes: nobody waits on the pass,
/// and every pass costs a synchronisation and a logits row, so a long prompt goes in a
/// few large passes rather than many of `PREFILL_CHUNK`.
const IDLE_WIDE_PREFILL_CHUNK: usize = 4096;
/// Trim the allocator once idle caches shrank by this much since the last trim.
const TRIM_AFTER_BYTES: usize = 32 << 20;

/// How often the worker looks at the host's available memory.
const MEM_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What the worker needs of a model: a batched forward pass over borrowed caches, and
/// the shape and home of those caches. [`Model`] is the real one; the scheduler's unit
/// tests drive the loop through a small fake.
pub(crate) trait Forward: Sync {
    /// Logits `(1, vocab)` per sequence (see [`Model::forward_logits`]).
    fn forward(&self, batch: &mut [SeqInput<'_>]) -> candle_core::Result<Vec<Logits>>;
    fn cache_layout(&self, dtype: KvDtype) -> CacheLayout;
    fn device(&self) -> &Device;
    /// The longest prompt chunk that device caches take in a pass with other sequences'
    /// chunks ([`Model::fused_chunk`]; 0: device caches prefill one sequence a pass).
    fn fused_chunk(&self) -> usize {
        0
    }
    /// Whether long prompt chunks on this device prefill wide (on the GPU's tensor
    /// cores, a few milliseconds per 512 tokens).
    fn prefill_wide(&self) -> bool {
        false
    }
    /// Whether device caches' prompt chunks of any length share a pass, the device
    /// packing several sequences' rows into shared wide passes ([`Model::fused_wide_pack`]).
    fn prefill_packed(&self) -> bool {
        false
    }
}

impl Forward for Model {
    fn forward(&self, batch: &mut [SeqInput<'_>]) -> candle_core::Result<Vec<Logits>> {
        Model::forward_logits(self, batch)
    }
    fn cache_layout(&self, dtype: KvDtype) -> CacheLayout {
        Model::cache_layout(self, dtype)
    }
    fn device(&self) -> &Device {
        Model::device(self)
    }
    fn fused_chunk(&self) -> usize {
        Model::fused_chunk(self)
    }
    fn prefill_wide(&self) -> bool {
        Model::prefills_wide(self)
    }
    fn prefill_packed(&self) -> bool {
        Model::fused_wide_pack(self)
    }
}

/// The engine thread's ends of the channels the [`super::Engine`] handle holds.
pub(super) struct Link {
    pub rx: mpsc::Receiver<Command>,
    pub state: watch::Sender<EngineState>,
    pub view: watch::Sender<Arc<StoreView>>,
    /// Generation requests sent and not yet admitted (queued or pending here).
    pub waiting: Arc<AtomicUsize>,
}

/// What the scheduling loop needs to know besides the model.
pub(super) struct Sched {
    pub max_batch: usize,
    pub kv_dtype: KvDtype,
    /// Spill idle sessions when the host's available memory falls below this (0: never).
    pub kv_min_free: usize,
}

pub(super) fn run(cfg: EngineConfig, link: Link) {
    if cfg.threads > 0 {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build_global()
        {
            tracing::warn!("thread pool already set up: {e}");
        }
    }
    let (model, loaded) = match load::load(&cfg) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            let _ = link.state.send(EngineState::Failed(e.to_string()));
            return;
        }
    };
    let mut store = SessionStore::new(cfg.kv_budget);
    if let Some((free, total)) = device_memory(model.device()) {
        // What the passes will allocate (a long prompt's wide buffers) is not the
        // sessions' to take.
        let scratch = model.pass_scratch_bytes();
        let budget = cfg.kv_device_budget.resolve(free.saturating_sub(scratch));
        tracing::info!(
            budget,
            free,
            scratch,
            total,
            host_budget = cfg.kv_budget,
            "session caches: GPU memory tier, then host RAM, then disk"
        );
        store.enable_device_tier(model.device().clone(), budget);
    }
    if cfg.kv_disk_budget > 0 {
        let layout = model.cache_layout(cfg.kv_dtype);
        let fingerprint = format!(
            "{}:{}:{}x{}x{}:{:?}",
            loaded.info.id,
            std::fs::metadata(&loaded.info.path)
                .map(|m| m.len())
                .unwrap_or(0),
            layout.n_layers,
            layout.n_kv_heads,
            layout.head_dim,
            layout.dtype
        );
        let found = store.enable_spill(SpillConfig {
            dir: cfg.kv_spill_dir.clone(),
            disk_budget: cfg.kv_disk_budget,
            fingerprint,
            layout,
            device: model.device().clone(),
            shared: cfg.kv_shared,
        });
        tracing::info!(dir = %cfg.kv_spill_dir.display(), sessions = found, "session spill dir indexed");
    }
    metrics::bind_model(&loaded.info.id);
    let sched = Sched {
        max_batch: cfg.max_batch,
        kv_dtype: cfg.kv_dtype,
        kv_min_free: cfg.kv_min_free,
    };
    serve(&model, &loaded, &sched, store, link);
}

/// Publish the store's state: metrics, and the view the sessions API reads.
fn publish(store: &mut SessionStore, view: &watch::Sender<Arc<StoreView>>, id: &str) -> StoreStats {
    let (stats, delta) = store.report();
    metrics::kv_store(id, &stats, &delta);
    view.send_replace(Arc::new(StoreView {
        sessions: store.list(),
        stats,
    }));
    stats
}

/// Carry out a session command on the store and answer it.
fn command(
    store: &mut SessionStore,
    cmd: SessionCmd,
    view: &watch::Sender<Arc<StoreView>>,
    id: &str,
) {
    match cmd {
        SessionCmd::Delete { id: sid, reply } => {
            let r = store.delete(&sid).map_err(Into::into);
            publish(store, view, id);
            release_freed_memory();
            let _ = reply.send(r);
        }
        SessionCmd::Pin {
            id: sid,
            pinned,
            reply,
        } => {
            let r = store.set_pinned(&sid, pinned).map_err(Into::into);
            publish(store, view, id);
            let _ = reply.send(r);
        }
        SessionCmd::SpillAll { reply } => {
            let n = store.spill_all();
            publish(store, view, id);
            let _ = reply.send(n);
        }
        SessionCmd::PutNote {
            id: sid,
            key,
            value,
            reply,
        } => {
            let _ = reply.send(store.put_note(&sid, &key, value).map_err(Into::into));
        }
        SessionCmd::FindNote { key, reply } => {
            let _ = reply.send(store.find_note(&key));
        }
    }
}

/// The scheduling loop, once the model is loaded; returns when every handle is gone.
fn serve(
    model: &impl Forward,
    loaded: &Arc<Loaded>,
    sched: &Sched,
    mut store: SessionStore,
    link: Link,
) {
    let Link {
        mut rx,
        state,
        view,
        waiting,
    } = link;
    let id = loaded.info.id.as_str();
    publish(&mut store, &view, id);
    let _ = state.send(EngineState::Ready(loaded.clone()));
    let tok = loaded.tok.clone();
    let mut seqs: Vec<Seq> = Vec::new();
    let mut pending: VecDeque<GenRequest> = VecDeque::new();
    // Most bytes the store held since the allocator was last trimmed.
    let mut resident_peak = 0usize;
    let mut sys = sysinfo::System::new();
    let mut last_mem_check = Instant::now();
    loop {
        // Take what the queue holds; with nothing to do, wait for it.
        let mut taken = Vec::new();
        if seqs.is_empty() && pending.is_empty() {
            match rx.blocking_recv() {
                Some(c) => taken.push(c),
                None => return,
            }
        }
        while let Ok(c) = rx.try_recv() {
            taken.push(c);
        }
        for c in taken {
            match c {
                Command::Generate(r) => pending.push_back(r),
                Command::Session(cmd) => command(&mut store, cmd, &view, id),
            }
        }
        let mut admitted = false;
        while seqs.len() < sched.max_batch.max(1) {
            let Some(r) = pending.pop_front() else { break };
            waiting.fetch_sub(1, Ordering::SeqCst);
            seqs.extend(admit(model, &loaded.tokens, sched.kv_dtype, r, &mut store));
            admitted = true;
        }
        if admitted {
            publish(&mut store, &view, id);
        }
        metrics::set_running(seqs.len(), waiting.load(Ordering::SeqCst));
        if seqs.is_empty() {
            continue;
        }
        // Mixed steps on host caches; a GPU keeps separate prefill and decode passes.
        let mixed = seqs.iter().any(|s| s.next.is_some()) && seqs.iter().all(|s| s.cache.is_host());
        let budget = if mixed {
            MIXED_PREFILL_CHUNK
        } else if model.prefill_wide() && seqs.iter().all(|s| s.next.is_none()) {
            IDLE_WIDE_PREFILL_CHUNK
        } else {
            PREFILL_CHUNK
        };
        let picked = step::pick_prefill(&seqs, budget);
        if !(mixed && !picked.is_empty() && step::mixed(model, &tok, &mut seqs, &picked)) {
            step::prefill(model, &tok, &mut seqs, &picked);
            step::decode(model, &tok, &mut seqs);
        }
        if sched.kv_min_free > 0 && last_mem_check.elapsed() >= MEM_CHECK_EVERY {
            last_mem_check = Instant::now();
            sys.refresh_memory();
            let avail = sys.available_memory() as usize;
            if avail < sched.kv_min_free {
                let freed = store.relieve(sched.kv_min_free - avail);
                if freed > 0 {
                    tracing::warn!(
                        available = avail,
                        freed,
                        "host memory low: idle session caches moved out of memory"
                    );
                    publish(&mut store, &view, id);
                }
            }
        }
        // Keep sequences still prefilling or with a token to feed whose client listens;
        // the others hand their cache back (it holds exactly the tokens computed).
        let (live, done): (Vec<Seq>, Vec<Seq>) = seqs.into_iter().partition(|s| {
            (s.next.is_some() || s.prefill_pos < s.req.prompt.len()) && !s.req.events.is_closed()
        });
        seqs = live;
        if !done.is_empty() {
            let mut last = Vec::with_capacity(done.len());
            for s in done {
                // A client that went away between steps is seen here, not by a failed
                // send: count it as the send path does.
                let unfinished = s.next.is_some() || s.prefill_pos < s.req.prompt.len();
                if unfinished && s.req.events.is_closed() {
                    tracing::info!(parent: &s.req.span, tokens = s.generated.len(), "client went away; generation cancelled");
                    metrics::cancelled();
                }
                metrics::kv_session_tokens(s.cache.len());
                store.checkin(s.req.session.as_deref(), s.cache);
                last.extend(s.last_event.map(|ev| (s.req.events, ev)));
            }
            let stats = publish(&mut store, &view, id);
            // Caches left memory (spilled, evicted, dropped): give the pages back.
            resident_peak = resident_peak.max(stats.resident_bytes);
            if resident_peak - stats.resident_bytes >= TRIM_AFTER_BYTES {
                release_freed_memory();
                resident_peak = stats.resident_bytes;
            }
            // Only now: the session is idle and the metrics count this request.
            for (events, ev) in last {
                // Counted here, on this thread: `accept` may run on a pool thread, and
                // the model label is this thread's.
                if let GenEvent::Done { finish, usage, .. } = &ev {
                    metrics::finished(
                        finish.as_str(),
                        usage.prompt_tokens,
                        usage.completion_tokens,
                    );
                }
                let _ = events.send(ev);
            }
        }
    }
}

/// Hand freed heap pages back to the OS. glibc keeps freed blocks in its arenas, so
/// without this the RSS stays at its peak after session caches are dropped or spilled
/// (a cache is many ~100 KB blocks, under the mmap threshold). No-op off glibc.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

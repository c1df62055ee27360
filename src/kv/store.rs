//! Session cache store: named sessions (`prompt_cache_key`) and an anonymous pool, each a
//! [`SeqCache`] kept between requests so a conversation's next turn only prefills what
//! is new. A byte budget bounds the resident caches; past it, the least recently used
//! idle, unpinned caches are evicted.
//!
//! A cache is checked out for the length of one request and checked back in after it;
//! while out, its session is busy and a second request on it is refused.
//!
//! With an accelerator ([`SessionStore::enable_device_tier`]) an idle session is in one
//! of three tiers — device memory, host RAM, disk — each with its own budget: past the
//! device budget the least recently used idle caches move to host RAM, past the host
//! budget to disk, and a session's next turn brings it back to the device (see
//! [`tiers`]). Without one (a CPU server) there are two: memory and disk.
//!
//! A named session may also carry **notes**: opaque strings under string keys that the
//! API attaches to it (stored responses). The store never reads them; it keeps them
//! with the session in every tier, writes them beside its spill file, and drops them
//! when the session goes (evicted without spilling, past the disk budget, deleted).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::Device;

use super::shared::Shared;
use super::{spill, CacheLayout, SeqCache};

/// Anonymous caches kept for prefix reuse by requests without a session key.
pub const ANON_MAX: usize = 8;
/// Shortest shared prefix worth reusing from the anonymous pool.
pub const ANON_MIN_PREFIX: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("session `{0}` is busy with another request; retry when it finishes")]
    Busy(String),
    #[error("session `{0}` not found")]
    NotFound(String),
    #[error("session `{0}` cannot move back to device memory ({1}); its cache stays in host RAM, retry later")]
    DeviceFull(String, String),
}

/// What the sessions API shows about a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub tokens: usize,
    pub bytes: usize,
    pub tier: &'static str,
    pub busy: bool,
    pub pinned: bool,
    pub created: u64,
    pub last_used: u64,
    pub hits: u64,
}

#[derive(Debug)]
enum Slot {
    /// In the accelerator's memory (only with a device tier).
    Device(Box<SeqCache>),
    /// In host RAM (the one memory tier of a CPU server). Boxed: a cache's header is
    /// several times the size of the other variants.
    Memory(Box<SeqCache>),
    Disk {
        path: PathBuf,
        bytes: u64,
    },
    /// Checked out by a request.
    Busy,
}

#[derive(Debug)]
struct Entry {
    slot: Slot,
    tokens: usize,
    bytes: usize,
    created: u64,
    last_used: u64,
    lru: Instant,
    hits: u64,
    pinned: bool,
    /// Deleted while busy: drop it at check-in instead of storing it.
    doomed: bool,
    /// Opaque notes the API keeps with the session (see the module docs).
    notes: BTreeMap<String, String>,
    /// Turns this cache has had (see [`spill::SpillMeta::generation`]).
    gen: u64,
    /// The generation last handed to the disk (written behind or spilled).
    written_gen: u64,
}

impl Entry {
    /// A session found on disk (spill file at `path`, `bytes` long, metadata `m`).
    fn on_disk(
        path: PathBuf,
        bytes: u64,
        m: &spill::SpillMeta,
        notes: BTreeMap<String, String>,
        last_used: u64,
    ) -> Self {
        Entry {
            slot: Slot::Disk { path, bytes },
            tokens: m.tokens,
            bytes: 0,
            created: m.created,
            last_used,
            lru: Instant::now(),
            hits: m.hits,
            pinned: false,
            doomed: false,
            notes,
            gen: m.generation,
            written_gen: m.generation,
        }
    }
}

#[derive(Debug)]
struct Anon {
    cache: SeqCache,
    lru: Instant,
}

/// A cache handed to one request.
#[derive(Debug)]
pub struct Checkout {
    pub cache: SeqCache,
    /// Prompt tokens whose K/V were already cached.
    pub reused: usize,
    /// The cache came back from disk.
    pub restored: bool,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StoreStats {
    /// Idle caches in host RAM (a CPU server's memory tier).
    pub resident_bytes: usize,
    /// Budget of the host RAM tier (`--kv-budget`).
    pub budget_bytes: usize,
    /// The store has a device tier (GPU memory); the fields below are 0 without one.
    pub device_tier: bool,
    /// Idle caches (and the anonymous pool) in device memory.
    pub device_bytes: usize,
    /// Budget of the device tier (`--kv-device-budget`).
    pub device_budget_bytes: usize,
    /// Idle named sessions in host RAM while the store has a device tier (then
    /// `sessions_idle` counts those on the device).
    pub sessions_host: usize,
    pub disk_bytes: u64,
    pub disk_budget_bytes: u64,
    pub sessions_busy: usize,
    pub sessions_idle: usize,
    pub sessions_disk: usize,
    pub anon: usize,
    pub counters: StoreCounters,
}

/// Cumulative counts since start: evictions by reason, spill/restore bytes and time.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StoreCounters {
    pub evicted_lru: u64,
    pub evicted_pressure: u64,
    pub evicted_explicit: u64,
    pub spilled_bytes: u64,
    pub spill_seconds: f64,
    pub restored_bytes: u64,
    pub restore_seconds: f64,
    /// Caches moved between tiers, and their bytes, by [`tiers::move_index`].
    pub moves: [u64; tiers::MOVES],
    pub move_bytes: [u64; tiers::MOVES],
}

/// Where and for which model sessions are spilled.
#[derive(Debug, Clone)]
pub struct SpillConfig {
    pub dir: PathBuf,
    pub disk_budget: u64,
    /// Identifies the model and cache format; files with another one are ignored.
    pub fingerprint: String,
    pub layout: CacheLayout,
    pub device: Device,
    /// The directory is shared with other replicas: lease each session while serving
    /// it, write it behind every turn, look it up there on a miss (see [`super::shared`]).
    pub shared: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Outcome of a lookup, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Partial,
    Miss,
}

#[derive(Debug)]
pub struct SessionStore {
    budget: usize,
    sessions: HashMap<String, Entry>,
    anon: Vec<Anon>,
    spill: Option<SpillConfig>,
    /// Leases and the writer thread, on a shared spill dir.
    shared: Option<Shared>,
    /// The accelerator tier, when caches are computed on one.
    device: Option<DeviceTier>,
    /// Evictions since start, for tests and metrics.
    pub evictions: u64,
    pub spills: u64,
    pub restores: u64,
    /// Cumulative counters for metrics (read through `stats()`).
    pub counters: StoreCounters,
    /// What [`SessionStore::report`] handed out last, so each report carries only news.
    reported: StoreCounters,
}

impl SessionStore {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            sessions: HashMap::new(),
            anon: Vec::new(),
            spill: None,
            shared: None,
            device: None,
            evictions: 0,
            spills: 0,
            restores: 0,
            counters: StoreCounters::default(),
            reported: StoreCounters::default(),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Spill evicted sessions to `cfg.dir` from now on, and index the sessions already
    /// there: files for this model become disk-tier sessions; foreign, torn or corrupt
    /// files are skipped with a warning. Returns how many sessions were found.
    pub fn enable_spill(&mut self, cfg: SpillConfig) -> usize {
        let mut found = 0;
        if let Ok(rd) = std::fs::read_dir(&cfg.dir) {
            for e in rd.flatten() {
                let path = e.path();
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.ends_with(".tmp") {
                    // On a shared dir another replica may be writing it right now: only
                    // a temp file nobody touched for a while is a dead writer's.
                    let age = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or_default();
                    if !cfg.shared || age > STALE_TMP {
                        tracing::warn!(path = %path.display(), "removing an unfinished spill file");
                        let _ = std::fs::remove_file(&path);
                    }
                    continue;
                }
                if !name.ends_with(".kv.safetensors") {
                    continue;
                }
                match spill::read_meta(&path) {
                    Ok((m, _))
                        if m.fingerprint == cfg.fingerprint
                            && !self.sessions.contains_key(&m.session) =>
                    {
                        let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                        let notes = spill::read_notes(&path).unwrap_or_else(|err| {
                            tracing::warn!(
                                "ignoring the unreadable notes of a spilled session: {err}"
                            );
                            BTreeMap::new()
                        });
                        let entry = Entry::on_disk(path, bytes, &m, notes, m.created);
                        self.sessions.insert(m.session.clone(), entry);
                        found += 1;
                    }
                    Ok((m, _)) if m.fingerprint != cfg.fingerprint => {
                        tracing::warn!(
                            path = %path.display(),
                            file = %m.fingerprint,
                            server = %cfg.fingerprint,
                            "skipping a spilled session of another model or kv dtype"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("skipping an unreadable spill file: {e}"),
                }
            }
        }
        // Notes whose cache file is gone (restored, then the server stopped hard). Not
        // on a shared dir, where another replica may be about to write the cache file.
        let rd = if cfg.shared {
            None
        } else {
            std::fs::read_dir(&cfg.dir).ok()
        };
        if let Some(rd) = rd {
            for e in rd.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".notes.json") {
                    if !cfg.dir.join(format!("{stem}.kv.safetensors")).exists() {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        if cfg.shared {
            let sh = Shared::start(&cfg.dir, cfg.disk_budget);
            tracing::info!(dir = %cfg.dir.display(), owner = %sh.owner(), "shared spill dir: sessions are leased and written behind every turn");
            self.shared = Some(sh);
        }
        self.spill = Some(cfg);
        self.enforce_disk_budget();
        found
    }

    /// Take the cache for a request. The cache is cut back to the longest prefix it shares
    /// with `prompt`, leaving at least one prompt token to compute (its logits are needed).
    pub fn checkout(
        &mut self,
        key: Option<&str>,
        prompt: &[u32],
        layout: CacheLayout,
        device: &Device,
    ) -> Result<(Checkout, Lookup), KvError> {
        if let Some(k) = key {
            self.lease_and_sync(k)?;
        }
        let fresh = || SeqCache::new(layout, device);
        let mut restored = false;
        let mut cache = match key {
            Some(k) => match self.sessions.get_mut(k) {
                Some(e) => {
                    let cache = match std::mem::replace(&mut e.slot, Slot::Busy) {
                        Slot::Busy => return Err(KvError::Busy(k.to_string())),
                        Slot::Device(c) => *c,
                        Slot::Memory(c) if self.device.is_some() => {
                            // Promotion may demote others: let go of `e` first.
                            self.promote(k, *c)?
                        }
                        Slot::Memory(c) => *c,
                        Slot::Disk { path, .. } => {
                            let fp = self
                                .spill
                                .as_ref()
                                .map(|s| s.fingerprint.clone())
                                .unwrap_or_default();
                            let t0 = Instant::now();
                            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                            let mut r = spill::read(&path, layout, device, &fp);
                            if r.is_err() && self.device_bytes() > 0 {
                                // Perhaps the GPU is full: move its idle caches down and
                                // read once more before giving the file up.
                                self.demote_until(0);
                                r = spill::read(&path, layout, device, &fp);
                            }
                            // The notes stay with the entry in memory. A shared file
                            // stays: it is the copy a crash would fall back to.
                            if self.shared.is_none() {
                                spill::remove(&path);
                            }
                            match r {
                                Ok((c, m)) => {
                                    if let Some(e) = self.sessions.get_mut(k) {
                                        e.gen = m.generation;
                                        e.written_gen = m.generation;
                                    }
                                    restored = true;
                                    self.restores += 1;
                                    self.counters.restored_bytes += size;
                                    self.counters.restore_seconds += t0.elapsed().as_secs_f64();
                                    let to = self.fast_tier();
                                    self.count_move(Tier::Disk, to, size);
                                    c
                                }
                                Err(err) => {
                                    tracing::warn!("could not restore session `{k}`, starting it afresh: {err}");
                                    fresh()
                                }
                            }
                        }
                    };
                    if let Some(e) = self.sessions.get_mut(k) {
                        e.lru = Instant::now();
                        e.last_used = now_secs();
                    }
                    cache
                }
                None => {
                    let now = now_secs();
                    self.sessions.insert(
                        k.to_string(),
                        Entry {
                            slot: Slot::Busy,
                            tokens: 0,
                            bytes: 0,
                            created: now,
                            last_used: now,
                            lru: Instant::now(),
                            hits: 0,
                            pinned: false,
                            doomed: false,
                            notes: BTreeMap::new(),
                            gen: 0,
                            written_gen: 0,
                        },
                    );
                    fresh()
                }
            },
            None => {
                let best = self
                    .anon
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (i, a.cache.common_prefix(prompt)))
                    .filter(|&(i, n)| self.anon[i].cache.can_resume_at(n))
                    .filter(|&(_, n)| n >= ANON_MIN_PREFIX)
                    .max_by_key(|&(_, n)| n);
                match best {
                    Some((i, _)) => self.anon.swap_remove(i).cache,
                    None => fresh(),
                }
            }
        };
        if cache.layout() != layout {
            cache = fresh();
        }
        let reused = cache
            .common_prefix(prompt)
            .min(prompt.len().saturating_sub(1));
        // Sliding-window layers may have dropped what that position would see: then
        // nothing is reused (truncate forgets everything).
        cache.truncate(reused);
        let reused = cache.len();
        let lookup = match reused {
            0 => Lookup::Miss,
            n if n + 1 >= prompt.len() => Lookup::Hit,
            _ => Lookup::Partial,
        };
        if let (Some(k), true) = (key, reused > 0) {
            if let Some(e) = self.sessions.get_mut(k) {
                e.hits += 1;
            }
        }
        Ok((
            Checkout {
                cache,
                reused,
                restored,
            },
            lookup,
        ))
    }

    /// Return a cache after its request; then keep the resident bytes under budget.
    pub fn checkin(&mut self, key: Option<&str>, mut cache: SeqCache) {
        if let Err(e) = cache.settle() {
            tracing::warn!("could not shrink a session's local layers: {e}");
        }
        match key.and_then(|k| self.sessions.get_mut(k).map(|e| (k, e))) {
            Some((k, e)) => {
                let shared = self.shared.as_ref().zip(self.spill.as_ref());
                if e.doomed {
                    self.sessions.remove(k);
                    if let Some((sh, cfg)) = shared {
                        let path = cfg.dir.join(spill::file_name(k));
                        spill::remove(&path);
                        sh.release(&path);
                    }
                } else {
                    e.tokens = cache.len();
                    e.bytes = cache.allocated_bytes();
                    e.lru = Instant::now();
                    e.last_used = now_secs();
                    if let Some((sh, cfg)) = shared {
                        e.gen += 1;
                        write_behind(sh, cfg, k, e, &cache);
                    }
                    e.slot = match self.device {
                        Some(_) => Slot::Device(Box::new(cache)),
                        None => Slot::Memory(Box::new(cache)),
                    };
                }
            }
            None if key.is_none() && !cache.is_empty() => {
                self.anon.push(Anon {
                    cache,
                    lru: Instant::now(),
                });
                if self.anon.len() > ANON_MAX {
                    let oldest = self
                        .anon
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, a)| a.lru)
                        .map(|(i, _)| i);
                    if let Some(i) = oldest {
                        self.anon.swap_remove(i);
                        self.evictions += 1;
                    }
                }
            }
            None => {}
        }
        self.enforce_budget();
    }

    /// Bytes of the caches held in host RAM while idle (busy ones are counted by their
    /// requests until check-in); the anonymous pool's too unless it lives on a device.
    pub fn resident_bytes(&self) -> usize {
        self.sessions
            .values()
            .filter(|e| matches!(e.slot, Slot::Memory(_)))
            .map(|e| e.bytes)
            .sum::<usize>()
            + if self.device.is_none() {
                self.anon_bytes()
            } else {
                0
            }
    }

    fn anon_bytes(&self) -> usize {
        self.anon.iter().map(|a| a.cache.allocated_bytes()).sum()
    }

    pub fn disk_bytes(&self) -> u64 {
        self.sessions
            .values()
            .map(|e| match e.slot {
                Slot::Disk { bytes, .. } => bytes,
                _ => 0,
            })
            .sum()
    }

    /// Move a named session's cache to disk (or drop it when spilling is off or fails).
    fn spill_one(&mut self, k: &str) {
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        let (cache, from) = match std::mem::replace(&mut e.slot, Slot::Busy) {
            Slot::Memory(c) => (c, Tier::Host),
            Slot::Device(c) => (c, Tier::Device),
            other => {
                e.slot = other;
                return;
            }
        };
        let written = match &self.spill {
            Some(cfg)
                if !cache.is_empty()
                    && self.shared.is_some()
                    && cfg.dir.join(spill::file_name(k)).exists()
                    && (e.written_gen == e.gen
                        || spill::read_meta(&cfg.dir.join(spill::file_name(k)))
                            .is_ok_and(|(m, _)| m.generation >= e.gen)) =>
            {
                // Written behind its last turn already (or served by another replica
                // since): never overwrite it with an older copy.
                let path = cfg.dir.join(spill::file_name(k));
                let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                self.spills += 1;
                e.slot = Slot::Disk { path, bytes };
                self.count_move(from, Tier::Disk, bytes);
                return;
            }
            Some(cfg) if !cache.is_empty() => {
                let meta = spill::SpillMeta {
                    session: k.to_string(),
                    fingerprint: cfg.fingerprint.clone(),
                    tokens: cache.len(),
                    created: e.created,
                    hits: e.hits,
                    generation: e.gen,
                };
                let t0 = Instant::now();
                match spill::write(&cfg.dir, &cache, &meta) {
                    Ok(x) => {
                        self.counters.spilled_bytes += x.1;
                        self.counters.spill_seconds += t0.elapsed().as_secs_f64();
                        Some(x)
                    }
                    Err(err) => {
                        tracing::warn!("could not spill session `{k}`, dropping it: {err}");
                        None
                    }
                }
            }
            _ => None,
        };
        match written {
            Some((path, bytes)) => {
                if let Err(err) = spill::write_notes(&path, &e.notes) {
                    tracing::warn!("could not write the notes of session `{k}` to disk: {err}");
                }
                e.written_gen = e.gen;
                e.slot = Slot::Disk { path, bytes };
                self.spills += 1;
                self.count_move(from, Tier::Disk, bytes);
            }
            None => {
                self.sessions.remove(k);
            }
        }
    }

    /// Move least recently used idle, unpinned caches down a tier until each tier is
    /// under its budget: device to host RAM, host RAM to disk (or dropped).
    pub fn enforce_budget(&mut self) {
        if let Some(limit) = self.device.as_ref().map(|d| d.budget) {
            self.demote_until(limit);
        }
        self.evict_until(self.budget, false);
    }

    /// The host is short of memory: move up to `bytes` of idle caches out of memory
    /// (spilled or dropped, LRU first), so the cache yields before the OS swaps.
    /// Returns the bytes freed.
    pub fn relieve(&mut self, bytes: usize) -> usize {
        let before = self.resident_bytes();
        self.evict_until(before.saturating_sub(bytes), true);
        before - self.resident_bytes()
    }

    fn evict_until(&mut self, limit: usize, pressure: bool) {
        // With a device tier the anonymous pool lives there (see `demote_until`).
        let anon_here = self.device.is_none();
        while self.resident_bytes() > limit {
            let anon = self
                .anon
                .iter()
                .enumerate()
                .filter(|_| anon_here)
                .map(|(i, a)| (a.lru, None, Some(i)));
            let named = self
                .sessions
                .iter()
                .filter(|(_, e)| matches!(e.slot, Slot::Memory(_)) && !e.pinned)
                .map(|(k, e)| (e.lru, Some(k.clone()), None));
            let Some((_, name, idx)) = anon.chain(named).min_by_key(|c| c.0) else {
                break; // only pinned or busy caches left
            };
            match (name, idx) {
                (Some(k), _) => self.spill_one(&k),
                (None, Some(i)) => {
                    self.anon.swap_remove(i);
                }
                _ => break,
            }
            self.evictions += 1;
            if pressure {
                self.counters.evicted_pressure += 1;
            } else {
                self.counters.evicted_lru += 1;
            }
        }
        self.enforce_disk_budget();
    }

    /// Delete the oldest spilled sessions past the disk budget.
    fn enforce_disk_budget(&mut self) {
        let Some(limit) = self.spill.as_ref().map(|s| s.disk_budget) else {
            return;
        };
        if self.shared.is_some() {
            return; // the writer keeps the whole directory under budget
        }
        while self.disk_bytes() > limit {
            let oldest = self
                .sessions
                .iter()
                .filter(|(_, e)| matches!(e.slot, Slot::Disk { .. }))
                .min_by_key(|(_, e)| e.lru)
                .map(|(k, _)| k.clone());
            let Some(k) = oldest else { break };
            if let Some(Entry {
                slot: Slot::Disk { path, .. },
                ..
            }) = self.sessions.remove(&k)
            {
                spill::remove(&path);
            }
        }
    }

    /// Spill every idle named session (graceful shutdown). Returns how many were written.
    pub fn spill_all(&mut self) -> usize {
        if self.spill.is_none() {
            return 0;
        }
        let keys: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, e)| matches!(e.slot, Slot::Memory(_) | Slot::Device(_)))
            .map(|(k, _)| k.clone())
            .collect();
        let before = self.spills;
        for k in keys {
            self.spill_one(&k);
        }
        if let Some(sh) = &self.shared {
            sh.flush();
        }
        (self.spills - before) as usize
    }

    fn info(&self, id: &str, e: &Entry) -> SessionInfo {
        let dev = self.device.is_some();
        let (tier, bytes) = match &e.slot {
            Slot::Disk { bytes, .. } => ("disk", *bytes as usize),
            Slot::Memory(_) => (Tier::Host.name(dev), e.bytes),
            // A busy cache is where the model computes.
            Slot::Device(_) | Slot::Busy => (self.fast_tier().name(dev), e.bytes),
        };
        SessionInfo {
            id: id.to_string(),
            tokens: e.tokens,
            bytes,
            tier,
            busy: matches!(e.slot, Slot::Busy),
            pinned: e.pinned,
            created: e.created,
            last_used: e.last_used,
            hits: e.hits,
        }
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<_> = self
            .sessions
            .iter()
            .filter(|(_, e)| !e.doomed)
            .map(|(k, e)| self.info(k, e))
            .collect();
        v.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.id.cmp(&b.id)));
        v
    }

    /// A session deleted while busy is gone for the API at once, though its cache
    /// leaves only when its request checks it in.
    pub fn get(&self, id: &str) -> Result<SessionInfo, KvError> {
        self.sessions
            .get(id)
            .filter(|e| !e.doomed)
            .map(|e| self.info(id, e))
            .ok_or_else(|| KvError::NotFound(id.to_string()))
    }

    /// Delete a session (and its spill file); a busy one goes when its request finishes.
    pub fn delete(&mut self, id: &str) -> Result<(), KvError> {
        if self.sessions.contains_key(id) {
            self.counters.evicted_explicit += 1;
        }
        match self.sessions.get_mut(id) {
            None => Err(KvError::NotFound(id.to_string())),
            Some(e) if matches!(e.slot, Slot::Busy) => {
                e.doomed = true;
                Ok(())
            }
            Some(_) => {
                if let Some(Entry {
                    slot: Slot::Disk { path, .. },
                    ..
                }) = self.sessions.remove(id)
                {
                    spill::remove(&path);
                }
                if let (Some(_), Some(cfg)) = (&self.shared, &self.spill) {
                    spill::remove(&cfg.dir.join(spill::file_name(id)));
                }
                Ok(())
            }
        }
    }

    /// Attach `value` under `key` to session `id` (replacing what was there); on disk,
    /// the session's notes file is rewritten.
    pub fn put_note(&mut self, id: &str, key: &str, value: String) -> Result<(), KvError> {
        let e = self
            .sessions
            .get_mut(id)
            .filter(|e| !e.doomed)
            .ok_or_else(|| KvError::NotFound(id.to_string()))?;
        e.notes.insert(key.to_string(), value);
        if let Slot::Disk { path, .. } = &e.slot {
            if let Err(err) = spill::write_notes(path, &e.notes) {
                tracing::warn!("could not write the notes of session `{id}` to disk: {err}");
            }
        } else if let (Some(sh), Some(cfg)) = (&self.shared, &self.spill) {
            // Other replicas find stored responses in the shared dir.
            sh.write_notes(&cfg.dir.join(spill::file_name(id)), e.notes.clone());
        }
        Ok(())
    }

    /// The session holding a note under `key`, with all of that session's notes.
    pub fn find_note(&self, key: &str) -> Option<(String, BTreeMap<String, String>)> {
        self.sessions
            .iter()
            .find(|(_, e)| !e.doomed && e.notes.contains_key(key))
            .map(|(id, e)| (id.clone(), e.notes.clone()))
            .or_else(|| self.shared.as_ref()?.find_note(key))
    }

    pub fn set_pinned(&mut self, id: &str, pinned: bool) -> Result<SessionInfo, KvError> {
        let e = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| KvError::NotFound(id.to_string()))?;
        e.pinned = pinned;
        let e = &self.sessions[id];
        Ok(self.info(id, e))
    }

    /// Stats plus the counter increments since the previous report (for metrics; each
    /// store reports its own increments, so several stores in one process add up).
    pub fn report(&mut self) -> (StoreStats, StoreCounters) {
        let (c, r) = (self.counters, self.reported);
        let delta = StoreCounters {
            evicted_lru: c.evicted_lru - r.evicted_lru,
            evicted_pressure: c.evicted_pressure - r.evicted_pressure,
            evicted_explicit: c.evicted_explicit - r.evicted_explicit,
            spilled_bytes: c.spilled_bytes - r.spilled_bytes,
            spill_seconds: c.spill_seconds - r.spill_seconds,
            restored_bytes: c.restored_bytes - r.restored_bytes,
            restore_seconds: c.restore_seconds - r.restore_seconds,
            moves: std::array::from_fn(|i| c.moves[i] - r.moves[i]),
            move_bytes: std::array::from_fn(|i| c.move_bytes[i] - r.move_bytes[i]),
        };
        self.reported = c;
        (self.stats(), delta)
    }

    pub fn stats(&self) -> StoreStats {
        let count = |f: fn(&Slot) -> bool| self.sessions.values().filter(|e| f(&e.slot)).count();
        let dev = self.device.is_some();
        let (idle, host) = (
            count(|s| matches!(s, Slot::Memory(_) | Slot::Device(_))),
            count(|s| matches!(s, Slot::Memory(_))),
        );
        StoreStats {
            resident_bytes: self.resident_bytes(),
            budget_bytes: self.budget,
            device_tier: dev,
            device_bytes: self.device_bytes(),
            device_budget_bytes: self.device.as_ref().map_or(0, |d| d.budget),
            sessions_host: if dev { host } else { 0 },
            disk_bytes: self.disk_bytes(),
            disk_budget_bytes: self.spill.as_ref().map(|s| s.disk_budget).unwrap_or(0),
            sessions_busy: count(|s| matches!(s, Slot::Busy)),
            sessions_idle: if dev { idle - host } else { idle },
            sessions_disk: count(|s| matches!(s, Slot::Disk { .. })),
            anon: self.anon.len(),
            counters: self.counters,
        }
    }
}

mod replicas;
pub mod tiers;
use replicas::{write_behind, STALE_TMP};
use tiers::{DeviceTier, Tier};

#[cfg(test)]
mod tests;

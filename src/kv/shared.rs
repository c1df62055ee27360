//! The shared spill tier: several replicas pointed at one spill directory (a shared
//! volume) serve each other's sessions. This module owns what makes that safe:
//!
//! - **Leases.** A session is served by one replica at a time. Before a replica uses a
//!   session's cache it takes `<session>.lease`, a small text file naming the owner
//!   (host, pid, a per-process nonce) and an expiry. It is created atomically (written
//!   under a private name, then hard-linked into place, which fails when a lease is
//!   there), renewed by a keeper thread while held, and removed once the session's
//!   write-behind is on disk. A lease past its expiry, or held by a process of this host
//!   that no longer runs, is taken over (logged).
//! - **Write-behind.** After each turn the session's cache goes to a writer thread, which
//!   writes it (temp name, rename) off the engine thread, then releases the lease. A
//!   `kill -9` loses at most the turn in flight.
//! - **One disk budget across writers.** After each write the writer sums the directory's
//!   spill files and deletes the oldest unleased ones past the budget.
//!
//! Problems with the directory (read-only, full, foreign files) are logged once per kind
//! with what was done, and the request goes on (cold if need be). This module must not
//! depend on `engine` or `api`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::spill::{self, private_name};
use super::SeqCache;
use crate::metrics;

/// How long a lease lives without renewal. A replica that dies holding one blocks its
/// session on other hosts for at most this long (on its own host, not at all: a dead
/// pid is seen at once).
pub const LEASE_TTL: Duration = Duration::from_secs(15);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The lease file of a session's cache file (`x.kv.safetensors` → `x.lease`).
pub fn lease_path(cache_file: &Path) -> PathBuf {
    let name = cache_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".kv.safetensors").unwrap_or(&name);
    cache_file.with_file_name(format!("{stem}.lease"))
}

/// Who holds a lease, as written in its file: `host pid nonce expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    pub nonce: String,
    pub expires_ms: u64,
}

impl Owner {
    fn parse(text: &str) -> Option<Self> {
        let mut it = text.split_whitespace();
        let o = Owner {
            host: it.next()?.to_string(),
            pid: it.next()?.parse().ok()?,
            nonce: it.next()?.to_string(),
            expires_ms: it.next()?.parse().ok()?,
        };
        Some(o)
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.host, self.pid, self.nonce, self.expires_ms
        )
    }

    fn same_process(&self, other: &Owner) -> bool {
        self.host == other.host && self.pid == other.pid && self.nonce == other.nonce
    }

    /// Why this lease may be taken over by `me`, if it may.
    fn stale_for(&self, me: &Owner, now: u64) -> Option<&'static str> {
        if self.expires_ms < now {
            return Some("expired");
        }
        if self.host == me.host && (self.pid == me.pid || !pid_alive(self.pid)) {
            // Same host: its process is gone (or this pid is a new incarnation, e.g. a
            // restarted container where every process is pid 1).
            return Some("its process is gone");
        }
        None
    }
}

/// Whether process `pid` of this host still runs (a zombie, killed but not yet reaped
/// by its parent, does not).
#[cfg(target_os = "linux")]
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

#[cfg(not(target_os = "linux"))]
fn pid_alive(_pid: u32) -> bool {
    true // cannot tell: wait for the lease to expire
}

/// A lease could not be taken: another live replica serves the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub owner: String,
    /// Seconds until the lease expires unless renewed.
    pub retry_after: u64,
}

/// Kinds of trouble, each logged once until it clears.
#[derive(Default)]
struct Alarms(Mutex<HashSet<&'static str>>);

impl Alarms {
    fn raise(&self, kind: &'static str, msg: std::fmt::Arguments<'_>) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(kind) {
            tracing::warn!(
                kind,
                "shared spill dir: {msg} (logged once until it recovers)"
            );
        }
    }

    fn clear(&self, kind: &'static str) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.remove(kind) {
            tracing::info!(kind, "shared spill dir: recovered");
        }
    }
}

/// One write-behind: a session's cache after a turn, and the lease to release once it
/// is on disk.
pub struct Job {
    pub dir: PathBuf,
    pub cache: SeqCache,
    pub meta: spill::SpillMeta,
    pub notes: BTreeMap<String, String>,
}

enum Work {
    Write(Box<Job>),
    Notes {
        cache_file: PathBuf,
        notes: BTreeMap<String, String>,
    },
    Flush(mpsc::Sender<()>),
}

struct Inner {
    me: Owner,
    dir: PathBuf,
    disk_budget: u64,
    /// Lease files this process holds, with how many holds each (a checked-out request,
    /// a write-behind not yet on disk).
    held: Mutex<HashMap<PathBuf, u32>>,
    alarms: Alarms,
}

/// Handle to the shared tier of one spill directory: leases, the writer thread and the
/// lease keeper. Cloning shares them.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Work>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("owner", &self.inner.me)
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl Shared {
    /// Start the writer and keeper threads for `dir`.
    pub fn start(dir: &Path, disk_budget: u64) -> Self {
        let host = sysinfo::System::host_name().unwrap_or_else(|| "localhost".into());
        Self::start_as(dir, disk_budget, &host)
    }

    /// [`Shared::start`] as a replica on host `host` (tests run several in one process).
    pub fn start_as(dir: &Path, disk_budget: u64, host: &str) -> Self {
        let host = host.replace(char::is_whitespace, "_");
        let nonce = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let inner = Arc::new(Inner {
            me: Owner {
                host,
                pid: std::process::id(),
                nonce,
                expires_ms: 0,
            },
            dir: dir.to_path_buf(),
            disk_budget,
            held: Mutex::new(HashMap::new()),
            alarms: Alarms::default(),
        });
        let (tx, rx) = mpsc::channel::<Work>();
        let w = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || writer(&w, rx));
        if let Err(e) = spawned {
            tracing::error!("could not start the session writer thread: {e}");
        }
        let k = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new()
            .name("kv-lease".into())
            .spawn(move || loop {
                std::thread::sleep(LEASE_TTL / 3);
                let Some(inner) = k.upgrade() else { return };
                inner.renew_all();
            });
        if let Err(e) = spawned {
            tracing::error!("could not start the session lease keeper: {e}");
        }
        Self { inner, tx }
    }

    /// This process's owner id (`host:pid:nonce`).
    pub fn owner(&self) -> String {
        let m = &self.inner.me;
        format!("{}:{}:{}", m.host, m.pid, m.nonce)
    }

    /// Take (or add a hold on) the lease of the session whose cache file is
    /// `cache_file`. A directory that cannot be written is logged and the session is
    /// served without a lease (nothing could be written for it anyway).
    pub fn acquire(&self, cache_file: &Path) -> Result<(), Held> {
        self.inner.acquire(&lease_path(cache_file))
    }

    /// Drop one hold; the last one removes the lease file.
    pub fn release(&self, cache_file: &Path) {
        self.inner.release(&lease_path(cache_file));
    }

    /// Queue a write-behind; the writer releases the job's lease hold when it is done.
    pub fn write_behind(&self, job: Job) {
        let path = job.dir.join(spill::file_name(&job.meta.session));
        if self.tx.send(Work::Write(Box::new(job))).is_err() {
            self.release(&path);
        }
    }

    /// Queue a rewrite of a session's notes sidecar.
    pub fn write_notes(&self, cache_file: &Path, notes: BTreeMap<String, String>) {
        let _ = self.tx.send(Work::Notes {
            cache_file: cache_file.to_path_buf(),
            notes,
        });
    }

    /// Wait until every write queued so far is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Work::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Note a problem with the directory (logged once per kind until cleared).
    pub fn alarm(&self, kind: &'static str, msg: std::fmt::Arguments<'_>) {
        self.inner.alarms.raise(kind, msg);
    }

    /// Find the session holding note `key` among the notes sidecars of the directory
    /// (stored by any replica): its id and notes.
    pub fn find_note(&self, key: &str) -> Option<(String, BTreeMap<String, String>)> {
        let rd = fs::read_dir(&self.inner.dir).ok()?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".notes.json") else {
                continue;
            };
            let cache_file = self.inner.dir.join(format!("{stem}.kv.safetensors"));
            let Ok(notes) = spill::read_notes(&cache_file) else {
                continue;
            };
            if !notes.contains_key(key) {
                continue;
            }
            if let Ok((meta, _)) = spill::read_meta(&cache_file) {
                return Some((meta.session, notes));
            }
        }
        None
    }
}

impl Inner {
    fn mine(&self) -> Owner {
        Owner {
            expires_ms: now_ms() + LEASE_TTL.as_millis() as u64,
            ..self.me.clone()
        }
    }

    fn acquire(&self, lease: &Path) -> Result<(), Held> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(lease) {
            *n += 1;
            return Ok(());
        }
        for _ in 0..3 {
            match self.create(lease) {
                Ok(()) => {
                    self.alarms.clear("lease");
                    held.insert(lease.to_path_buf(), 1);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    self.alarms.raise(
                        "lease",
                        format_args!(
                            "cannot create lease {}: {e}; serving sessions without leases",
                            lease.display()
                        ),
                    );
                    held.insert(lease.to_path_buf(), 1);
                    return Ok(());
                }
            }
            let text = match fs::read_to_string(lease) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => String::new(),
            };
            let owner = Owner::parse(&text);
            let now = now_ms();
            let why = match &owner {
                Some(o) if o.same_process(&self.me) => {
                    held.insert(lease.to_path_buf(), 1);
                    return Ok(());
                }
                Some(o) => match o.stale_for(&self.me, now) {
                    Some(why) => why,
                    None => {
                        return Err(Held {
                            owner: format!("{}:{}", o.host, o.pid),
                            retry_after: o.expires_ms.saturating_sub(now).div_ceil(1000).max(1),
                        })
                    }
                },
                None => "unreadable",
            };
            if self.take_over(lease, &text) {
                metrics::kv_shared_event("takeover");
                let who = owner.map_or_else(|| "?".into(), |o| format!("{}:{}", o.host, o.pid));
                tracing::warn!(
                    lease = %lease.display(),
                    owner = %who,
                    "taking over a stale session lease ({why}); its last completed turn is on disk"
                );
            }
        }
        Err(Held {
            owner: "another replica".into(),
            retry_after: 1,
        })
    }

    /// Create `lease` for this process, atomically: written under a private name, then
    /// hard-linked into place (fails when a lease exists).
    fn create(&self, lease: &Path) -> std::io::Result<()> {
        let tmp = private_name(lease);
        write_private(&tmp, self.mine().line().as_bytes())?;
        let r = fs::hard_link(&tmp, lease);
        let _ = fs::remove_file(&tmp);
        r
    }

    /// Remove a stale lease whose content was `seen`. Only the holder of the takeover
    /// guard (`<session>.takeover`, created exclusively like a lease) removes it, and only
    /// if it still reads `seen` (a renewed lease reads otherwise): so two replicas taking
    /// over at once never remove each other's fresh lease. A guard left by a replica that
    /// died holding it is removed once older than [`LEASE_TTL`]. True when removed.
    fn take_over(&self, lease: &Path, seen: &str) -> bool {
        let guard = lease.with_extension("takeover");
        let tmp = private_name(&guard);
        if write_private(&tmp, self.me.line().as_bytes()).is_err() {
            return false;
        }
        let got = fs::hard_link(&tmp, &guard);
        let _ = fs::remove_file(&tmp);
        if got.is_err() {
            let old = fs::metadata(&guard)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > LEASE_TTL);
            if old {
                let _ = fs::remove_file(&guard);
            }
            return false;
        }
        let still = fs::read_to_string(lease).is_ok_and(|t| t == seen);
        if still {
            let _ = fs::remove_file(lease);
        }
        let _ = fs::remove_file(&guard);
        still
    }

    fn release(&self, lease: &Path) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = held.get_mut(lease) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        held.remove(lease);
        let ours = fs::read_to_string(lease)
            .ok()
            .and_then(|t| Owner::parse(&t))
            .is_some_and(|o| o.same_process(&self.me));
        if ours {
            let _ = fs::remove_file(lease);
        }
    }

    /// Push the expiry of every lease held forward (a lease taken over meanwhile, by a
    /// replica that judged this one dead, is left to its new owner).
    fn renew_all(&self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let line = self.mine().line();
        held.retain(|lease, _| {
            let text = fs::read_to_string(lease).unwrap_or_default();
            match Owner::parse(&text) {
                Some(o) if o.same_process(&self.me) => {
                    let tmp = private_name(lease);
                    if write_private(&tmp, line.as_bytes())
                        .and_then(|_| fs::rename(&tmp, lease))
                        .is_err()
                    {
                        let _ = fs::remove_file(&tmp);
                    }
                    true
                }
                Some(o) => {
                    tracing::warn!(lease = %lease.display(), owner = %format!("{}:{}", o.host, o.pid), "a session lease of this replica was taken over");
                    false
                }
                // No file (a read-only dir: the lease was never written): keep the hold.
                None => true,
            }
        });
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(bytes)
}

/// Run the calling thread at a lower scheduling priority (nice 10), so that on a busy
/// machine the writes behind turns yield to the compute threads. Linux only.
fn lower_priority() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: gettid and setpriority only read and set this thread's scheduling value.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

fn writer(inner: &Inner, rx: mpsc::Receiver<Work>) {
    lower_priority();
    for work in rx {
        match work {
            Work::Write(job) => {
                let Job {
                    dir,
                    cache,
                    meta,
                    notes,
                } = *job;
                let path = dir.join(spill::file_name(&meta.session));
                let t0 = std::time::Instant::now();
                match spill::write(&dir, &cache, &meta) {
                    Ok((path, _)) => {
                        metrics::kv_shared_event("written");
                        metrics::kv_write_behind_seconds(t0.elapsed().as_secs_f64());
                        inner.alarms.clear("write");
                        if let Err(e) = spill::write_notes(&path, &notes) {
                            inner
                                .alarms
                                .raise("notes", format_args!("could not write notes: {e}"));
                        }
                    }
                    Err(e) => {
                        metrics::kv_shared_event("write_failed");
                        inner.alarms.raise(
                        "write",
                        format_args!(
                            "could not write a session behind its turn, it stays in memory only: {e}"
                        ),
                    );
                    }
                }
                drop(cache);
                inner.release(&lease_path(&path));
                enforce_budget(inner, &path);
            }
            Work::Notes { cache_file, notes } => {
                if let Err(e) = spill::write_notes(&cache_file, &notes) {
                    inner
                        .alarms
                        .raise("notes", format_args!("could not write notes: {e}"));
                }
            }
            Work::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Keep the directory's spill files (of every writer) under the budget: delete the
/// least recently written ones that no live lease protects, never `keep`.
fn enforce_budget(inner: &Inner, keep: &Path) {
    let Ok(rd) = fs::read_dir(&inner.dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".kv.safetensors"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let notes = fs::metadata(spill::notes_path(&e.path()))
                .map(|m| m.len())
                .unwrap_or(0);
            Some((m.modified().ok()?, m.len() + notes, e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    if total <= inner.disk_budget {
        return;
    }
    files.sort();
    let now = now_ms();
    let mut dropped = 0;
    for (_, bytes, path) in files {
        if total <= inner.disk_budget {
            break;
        }
        let leased = fs::read_to_string(lease_path(&path))
            .ok()
            .and_then(|t| Owner::parse(&t))
            .is_some_and(|o| o.expires_ms >= now);
        if path == keep || leased {
            continue;
        }
        spill::remove(&path);
        total -= bytes;
        dropped += 1;
    }
    if dropped > 0 {
        tracing::info!(
            files = dropped,
            budget = inner.disk_budget,
            "shared spill dir over its disk budget: oldest idle sessions deleted"
        );
    }
}

#[cfg(test)]
mod tests;

//! The session store's side of a spill dir shared by several replicas
//! ([`super::super::shared`] owns the leases and the writer thread): leasing a session
//! at checkout and picking up a newer generation written by another replica, and handing
//! each turn's cache to the disk at check-in.

use std::collections::BTreeMap;

use super::{now_secs, Entry, KvError, SessionStore, Slot, SpillConfig};
use crate::kv::shared::{Job, Shared};
use crate::kv::{spill, SeqCache};

impl SessionStore {
    /// Act as replica `host` on the shared spill dir (tests run several in one process).
    #[cfg(test)]
    pub(crate) fn share_as(&mut self, host: &str) {
        if let Some(cfg) = &self.spill {
            self.shared = Some(Shared::start_as(&cfg.dir, cfg.disk_budget, host));
        }
    }

    /// On a shared spill dir: lease session `k` for this request, and where the
    /// directory holds a newer generation of it than this replica (another replica
    /// served it since) or this replica does not know it, point the entry at the file.
    /// A foreign or unreadable file is logged (once) and the session starts cold.
    pub(super) fn lease_and_sync(&mut self, k: &str) -> Result<(), KvError> {
        let (Some(sh), Some(cfg)) = (&self.shared, &self.spill) else {
            return Ok(());
        };
        if matches!(self.sessions.get(k).map(|e| &e.slot), Some(Slot::Busy)) {
            return Err(KvError::Busy(k.to_string()));
        }
        let path = cfg.dir.join(spill::file_name(k));
        if let Err(held) = sh.acquire(&path) {
            tracing::debug!(session = k, owner = %held.owner, "session leased by another replica");
            crate::metrics::kv_shared_event("busy");
            return Err(KvError::Busy(k.to_string()));
        }
        let on_disk = match spill::read_meta(&path) {
            Ok((m, _)) if m.fingerprint == cfg.fingerprint && m.session == k => Some(m),
            Ok((m, _)) => {
                crate::metrics::kv_shared_event("foreign");
                sh.alarm(
                    "foreign",
                    format_args!(
                        "{} was written for another model or kv dtype ({}); not loaded, the session starts cold and its file is replaced",
                        path.display(),
                        m.fingerprint
                    ),
                );
                None
            }
            Err(spill::SpillError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => {
                crate::metrics::kv_shared_event("foreign");
                sh.alarm(
                    "unreadable",
                    format_args!("{e}; not loaded, the session starts cold"),
                );
                None
            }
        };
        let Some(m) = on_disk else {
            return Ok(());
        };
        let bytes = std::fs::metadata(&path).map(|x| x.len()).unwrap_or(0);
        let notes = || {
            spill::read_notes(&path).unwrap_or_else(|err| {
                tracing::warn!("ignoring the unreadable notes of a shared session: {err}");
                BTreeMap::new()
            })
        };
        match self.sessions.get_mut(k) {
            Some(e) if m.generation <= e.gen => {}
            Some(e) => {
                // Served elsewhere since: the memory copy (if any) is older.
                e.notes = notes();
                e.slot = Slot::Disk {
                    path: path.clone(),
                    bytes,
                };
                e.tokens = m.tokens;
                e.gen = m.generation;
                e.written_gen = m.generation;
            }
            None => {
                let notes = notes();
                let entry = Entry::on_disk(path, bytes, &m, notes, now_secs());
                self.sessions.insert(k.to_string(), entry);
            }
        }
        Ok(())
    }
}

/// A temp file on a shared spill dir untouched this long belongs to a dead writer.
pub(super) const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

/// Shared dir: hand the cache of session `k` after its turn to the disk. A host cache
/// (f16, bf16 or q8_0 on the CPU) is copied and written by the writer thread (which
/// then releases the lease); other caches share storage with the live tensors, so they
/// are written here.
pub(super) fn write_behind(
    sh: &Shared,
    cfg: &SpillConfig,
    k: &str,
    e: &mut Entry,
    cache: &SeqCache,
) {
    let path = cfg.dir.join(spill::file_name(k));
    if cache.is_empty() {
        sh.release(&path);
        return;
    }
    let meta = spill::SpillMeta {
        session: k.to_string(),
        fingerprint: cfg.fingerprint.clone(),
        tokens: cache.len(),
        created: e.created,
        hits: e.hits,
        generation: e.gen,
    };
    e.written_gen = e.gen;
    if cache.is_host() {
        sh.write_behind(Job {
            dir: cfg.dir.clone(),
            cache: cache.clone(),
            meta,
            notes: e.notes.clone(),
        });
        return;
    }
    match spill::write(&cfg.dir, cache, &meta) {
        Ok((path, _)) => {
            if let Err(err) = spill::write_notes(&path, &e.notes) {
                sh.alarm("notes", format_args!("could not write notes: {err}"));
            }
        }
        Err(err) => sh.alarm(
            "write",
            format_args!(
                "could not write a session behind its turn, it stays in memory only: {err}"
            ),
        ),
    }
    sh.release(&path);
}

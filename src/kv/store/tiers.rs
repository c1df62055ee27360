//! The device tier of the session store: with an accelerator, idle caches stay in its
//! memory up to `--kv-device-budget`; past it the least recently used idle, unpinned
//! ones move to host RAM (whose budget, `--kv-budget`, then sends the oldest on to
//! disk), and a session's next turn brings its cache back to the device.
//!
//! A move is a whole copy of the cache's tensors ([`SeqCache::to_device`]): the tokens
//! and slot layout stay as they were, so a session decodes after a round trip exactly
//! as it would have without one. Pinned sessions never leave the device while the
//! server runs; a session that cannot come back up because device memory is full gets
//! [`KvError::DeviceFull`] and keeps its host copy.
//!
//! The anonymous pool lives on the device and is dropped (not moved) past the budget.

use std::time::Instant;

use candle_core::Device;

use super::{KvError, SessionStore, Slot};
use crate::kv::SeqCache;

/// A tier a session's cache can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Device,
    /// Host RAM: the one memory tier of a store without a device tier.
    Host,
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Disk];

    /// The name the sessions API and the metrics use. Without a device tier, host RAM is
    /// `memory`, as it always was on a CPU server.
    pub fn name(self, device_tier: bool) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host if device_tier => "host",
            Tier::Host => "memory",
            Tier::Disk => "disk",
        }
    }
}

/// Number of (from, to) tier pairs counted in [`super::StoreCounters::moves`].
pub const MOVES: usize = 9;

/// Index of the (from, to) pair in [`super::StoreCounters::moves`].
pub fn move_index(from: Tier, to: Tier) -> usize {
    let i = |t| Tier::ALL.iter().position(|&x| x == t).unwrap_or(0);
    i(from) * 3 + i(to)
}

/// The device tier's home and budget.
#[derive(Debug)]
pub(super) struct DeviceTier {
    pub(super) device: Device,
    pub(super) budget: usize,
}

impl SessionStore {
    /// Keep idle caches on `device` (an accelerator) up to `budget` bytes; past it they
    /// move to host RAM, where [`SessionStore::budget`] applies.
    pub fn enable_device_tier(&mut self, device: Device, budget: usize) {
        self.device = Some(DeviceTier { device, budget });
    }

    /// The device tier's budget, when there is one.
    pub fn device_budget(&self) -> Option<usize> {
        self.device.as_ref().map(|d| d.budget)
    }

    /// Where checked-in caches live: the device when there is a device tier.
    pub(super) fn fast_tier(&self) -> Tier {
        if self.device.is_some() {
            Tier::Device
        } else {
            Tier::Host
        }
    }

    pub(super) fn count_move(&mut self, from: Tier, to: Tier, bytes: u64) {
        let i = move_index(from, to);
        self.counters.moves[i] += 1;
        self.counters.move_bytes[i] += bytes;
    }

    /// Bytes of the idle caches (and the anonymous pool) in device memory.
    pub fn device_bytes(&self) -> usize {
        if self.device.is_none() {
            return 0;
        }
        self.sessions
            .values()
            .filter(|e| matches!(e.slot, Slot::Device(_)))
            .map(|e| e.bytes)
            .sum::<usize>()
            + self.anon_bytes()
    }

    /// Move least recently used idle, unpinned device caches to host RAM (anonymous
    /// ones are dropped) until the device tier holds at most `limit` bytes.
    pub(super) fn demote_until(&mut self, limit: usize) {
        while self.device_bytes() > limit {
            if !self.demote_lru() {
                break; // only pinned or busy caches left
            }
        }
    }

    /// Move the least recently used idle, unpinned device cache down (or drop the
    /// oldest anonymous one). False when there is none.
    fn demote_lru(&mut self) -> bool {
        let anon = self
            .anon
            .iter()
            .enumerate()
            .map(|(i, a)| (a.lru, None, Some(i)));
        let named = self
            .sessions
            .iter()
            .filter(|(_, e)| matches!(e.slot, Slot::Device(_)) && !e.pinned)
            .map(|(k, e)| (e.lru, Some(k.clone()), None));
        let Some((_, name, idx)) = anon.chain(named).min_by_key(|c| c.0) else {
            return false;
        };
        match (name, idx) {
            (Some(k), _) => self.demote(&k),
            (None, Some(i)) => {
                self.anon.swap_remove(i);
                self.evictions += 1;
                self.counters.evicted_lru += 1;
            }
            _ => return false,
        }
        true
    }

    /// Copy session `k`'s device cache to host RAM and free the device copy. Where the
    /// copy fails, the session is spilled from the device (or dropped) instead.
    fn demote(&mut self, k: &str) {
        let Some(e) = self.sessions.get_mut(k) else {
            return;
        };
        let cache = match std::mem::replace(&mut e.slot, Slot::Busy) {
            Slot::Device(c) => c,
            other => {
                e.slot = other;
                return;
            }
        };
        let t0 = Instant::now();
        match cache.to_device(&Device::Cpu) {
            Ok(host) => {
                e.slot = Slot::Memory(Box::new(host));
                let bytes = e.bytes as u64;
                tracing::debug!(
                    session = k,
                    bytes,
                    secs = t0.elapsed().as_secs_f64(),
                    "session cache moved to host RAM"
                );
                self.count_move(Tier::Device, Tier::Host, bytes);
            }
            Err(err) => {
                tracing::warn!("could not move session `{k}` to host RAM, spilling it: {err}");
                e.slot = Slot::Device(cache);
                self.spill_one(k);
            }
        }
    }

    /// Bring session `k`'s host cache back to `device` for its turn. Where device memory
    /// is short, idle unpinned device caches move down one by one until it fits; if it
    /// still does not, the host copy stays in place and the turn is refused.
    pub(super) fn promote(&mut self, k: &str, cache: SeqCache) -> Result<SeqCache, KvError> {
        let Some(device) = self.device.as_ref().map(|d| d.device.clone()) else {
            return Ok(cache);
        };
        let bytes = cache.allocated_bytes() as u64;
        let t0 = Instant::now();
        loop {
            match cache.to_device(&device) {
                Ok(c) => {
                    tracing::debug!(
                        session = k,
                        bytes,
                        secs = t0.elapsed().as_secs_f64(),
                        "session cache moved back to the device"
                    );
                    self.count_move(Tier::Host, Tier::Device, bytes);
                    return Ok(c);
                }
                Err(err) => {
                    if self.demote_lru() {
                        continue;
                    }
                    tracing::warn!("could not move session `{k}` back to the device: {err}");
                    if let Some(e) = self.sessions.get_mut(k) {
                        e.slot = Slot::Memory(Box::new(cache));
                    }
                    return Err(KvError::DeviceFull(k.to_string(), err.to_string()));
                }
            }
        }
    }
}

/// The device tier's budget as configured: bytes, or a share of the device memory
/// that is free once the model is loaded (known only then).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceBudget {
    Bytes(usize),
    /// In (0, 1].
    Share(f64),
}

impl Default for DeviceBudget {
    /// Half of the free device memory: the other half stays for the caches of the
    /// requests running and the forward passes' scratch.
    fn default() -> Self {
        Self::Share(0.5)
    }
}

impl DeviceBudget {
    /// Bytes, given the device memory free after loading.
    pub fn resolve(self, free: usize) -> usize {
        match self {
            Self::Bytes(b) => b,
            Self::Share(f) => (free as f64 * f) as usize,
        }
    }

    /// One of `n` models' even share.
    pub fn split(self, n: usize) -> Self {
        let n = n.max(1);
        match self {
            Self::Bytes(b) => Self::Bytes(b / n),
            Self::Share(f) => Self::Share(f / n as f64),
        }
    }
}

impl std::fmt::Display for DeviceBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "{b} bytes"),
            Self::Share(s) => write!(f, "{s} of free device memory"),
        }
    }
}

#[cfg(test)]
mod tests;

//! KV-cache metrics: resident bytes against the budget, sessions by state, lookups by
//! result and token-level reuse. Registered into the crate registry on first use.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use prometheus::{
    Counter, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::kv::store::tiers::{move_index, Tier};
use crate::kv::store::{StoreCounters, StoreStats};

struct KvMetrics {
    bytes: IntGaugeVec,
    budget: IntGauge,
    device_budget: IntGauge,
    disk_budget: IntGauge,
    moves: IntCounterVec,
    move_bytes: IntCounterVec,
    usage: prometheus::Gauge,
    sessions: IntGaugeVec,
    lookups: IntCounterVec,
    query_tokens: IntCounter,
    hit_tokens: IntCounter,
    evictions: IntCounterVec,
    spill_bytes: IntCounter,
    spill_seconds: Counter,
    restore_bytes: IntCounter,
    restore_seconds: Counter,
    session_tokens: Histogram,
    bytes_per_token: IntGaugeVec,
    shared: IntCounterVec,
    write_behind_seconds: Counter,
}

/// Events of a spill dir shared by replicas (`candela_kv_shared_events_total{event}`).
pub const SHARED_EVENTS: [&str; 5] = ["written", "write_failed", "busy", "takeover", "foreign"];

fn build() -> prometheus::Result<KvMetrics> {
    let m = KvMetrics {
        bytes: IntGaugeVec::new(
            Opts::new(
                "candela_kv_cache_bytes",
                "Bytes held by idle session caches, by tier",
            ),
            &["tier"],
        )?,
        budget: IntGauge::new(
            "candela_kv_cache_budget_bytes",
            "Byte budget of the session caches in host memory",
        )?,
        device_budget: IntGauge::new(
            "candela_kv_cache_device_budget_bytes",
            "Byte budget of the session caches in GPU memory (0 without a device tier)",
        )?,
        moves: IntCounterVec::new(
            Opts::new(
                "candela_kv_tier_moves_total",
                "Session caches moved from one tier to another (device, host or memory, disk)",
            ),
            &["from", "to"],
        )?,
        move_bytes: IntCounterVec::new(
            Opts::new(
                "candela_kv_tier_move_bytes_total",
                "Bytes of session caches moved from one tier to another",
            ),
            &["from", "to"],
        )?,
        disk_budget: IntGauge::new(
            "candela_kv_cache_disk_budget_bytes",
            "Byte budget of the spill dir",
        )?,
        usage: prometheus::Gauge::new(
            "candela_kv_cache_usage_ratio",
            "Share of the KV budget held by session caches in memory, in [0, 1]",
        )?,
        sessions: IntGaugeVec::new(
            Opts::new(
                "candela_kv_sessions",
                "Sessions by state (busy, idle, anonymous)",
            ),
            &["state"],
        )?,
        lookups: IntCounterVec::new(
            Opts::new(
                "candela_kv_lookups_total",
                "Cache lookups by result (hit, partial, miss)",
            ),
            &["result"],
        )?,
        query_tokens: IntCounter::new(
            "candela_kv_query_tokens_total",
            "Prompt tokens looked up in the cache",
        )?,
        hit_tokens: IntCounter::new(
            "candela_kv_hit_tokens_total",
            "Prompt tokens served from the cache",
        )?,
        evictions: IntCounterVec::new(
            Opts::new(
                "candela_kv_evictions_total",
                "Caches moved out of memory, by reason (lru, pressure, explicit)",
            ),
            &["reason"],
        )?,
        shared: IntCounterVec::new(
            Opts::new(
                "candela_kv_shared_events_total",
                "Shared spill dir events: sessions written behind a turn, writes failed, requests refused because another replica holds the session, stale leases taken over, foreign or torn files not loaded",
            ),
            &["event"],
        )?,
        write_behind_seconds: Counter::new(
            "candela_kv_write_behind_seconds_total",
            "Time the writer thread spent writing sessions behind their turns",
        )?,
        spill_bytes: IntCounter::new(
            "candela_kv_spill_bytes_total",
            "Bytes written to spill files",
        )?,
        spill_seconds: Counter::new(
            "candela_kv_spill_seconds_total",
            "Time spent writing spill files",
        )?,
        restore_bytes: IntCounter::new(
            "candela_kv_restore_bytes_total",
            "Bytes read back from spill files",
        )?,
        restore_seconds: Counter::new(
            "candela_kv_restore_seconds_total",
            "Time spent restoring spilled sessions",
        )?,
        session_tokens: Histogram::with_opts(
            HistogramOpts::new(
                "candela_kv_session_tokens",
                "Tokens a session cache holds when its request ends",
            )
            .buckets(vec![
                64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
            ]),
        )?,
        bytes_per_token: IntGaugeVec::new(
            Opts::new(
                "candela_kv_bytes_per_token",
                "Cache bytes one token takes (all layers, K and V), by the kv dtype in use",
            ),
            &["dtype"],
        )?,
    };
    let r = &super::get().registry;
    r.register(Box::new(m.bytes.clone()))?;
    r.register(Box::new(m.budget.clone()))?;
    r.register(Box::new(m.device_budget.clone()))?;
    r.register(Box::new(m.moves.clone()))?;
    r.register(Box::new(m.move_bytes.clone()))?;
    r.register(Box::new(m.disk_budget.clone()))?;
    r.register(Box::new(m.usage.clone()))?;
    r.register(Box::new(m.sessions.clone()))?;
    r.register(Box::new(m.lookups.clone()))?;
    r.register(Box::new(m.query_tokens.clone()))?;
    r.register(Box::new(m.hit_tokens.clone()))?;
    r.register(Box::new(m.evictions.clone()))?;
    r.register(Box::new(m.spill_bytes.clone()))?;
    r.register(Box::new(m.spill_seconds.clone()))?;
    r.register(Box::new(m.restore_bytes.clone()))?;
    r.register(Box::new(m.restore_seconds.clone()))?;
    r.register(Box::new(m.session_tokens.clone()))?;
    r.register(Box::new(m.bytes_per_token.clone()))?;
    r.register(Box::new(m.shared.clone()))?;
    r.register(Box::new(m.write_behind_seconds.clone()))?;
    for reason in ["lru", "pressure", "explicit"] {
        m.evictions.with_label_values(&[reason]);
    }
    for event in SHARED_EVENTS {
        m.shared.with_label_values(&[event]);
    }
    Ok(m)
}

fn get() -> &'static KvMetrics {
    static M: OnceLock<KvMetrics> = OnceLock::new();
    // Start-up code: the names and labels are constants, so registration fails only on
    // a programming error, which the first test run shows.
    #[allow(clippy::expect_used)]
    M.get_or_init(|| build().expect("kv metric registration"))
}

/// Gauges from the latest stats of every model's store (`model` names the reporting
/// one), summed; counters advance by `delta` (the store's increments since its last report).
pub fn store(model: &str, s: &StoreStats, delta: &StoreCounters) {
    counters(delta, s.device_tier);
    static LAST: OnceLock<Mutex<HashMap<String, StoreStats>>> = OnceLock::new();
    let s = {
        let mut last = LAST
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        last.insert(model.to_string(), *s);
        last.values()
            .fold(StoreStats::default(), |a, b| StoreStats {
                resident_bytes: a.resident_bytes + b.resident_bytes,
                budget_bytes: a.budget_bytes + b.budget_bytes,
                device_tier: a.device_tier || b.device_tier,
                device_bytes: a.device_bytes + b.device_bytes,
                device_budget_bytes: a.device_budget_bytes + b.device_budget_bytes,
                sessions_host: a.sessions_host + b.sessions_host,
                disk_bytes: a.disk_bytes + b.disk_bytes,
                disk_budget_bytes: a.disk_budget_bytes + b.disk_budget_bytes,
                sessions_busy: a.sessions_busy + b.sessions_busy,
                sessions_idle: a.sessions_idle + b.sessions_idle,
                sessions_disk: a.sessions_disk + b.sessions_disk,
                anon: a.anon + b.anon,
                counters: StoreCounters::default(),
            })
    };
    let m = get();
    // A CPU server has one memory tier, `memory`, as it always had; with a GPU the
    // tiers are `device`, `host` and `disk`.
    let host = Tier::Host.name(s.device_tier);
    m.bytes
        .with_label_values(&[host])
        .set(s.resident_bytes as i64);
    if s.device_tier {
        m.bytes
            .with_label_values(&["device"])
            .set(s.device_bytes as i64);
        m.sessions
            .with_label_values(&["host"])
            .set(s.sessions_host as i64);
    }
    m.budget.set(s.budget_bytes as i64);
    m.device_budget.set(s.device_budget_bytes as i64);
    m.bytes
        .with_label_values(&["disk"])
        .set(s.disk_bytes as i64);
    m.disk_budget.set(s.disk_budget_bytes as i64);
    m.sessions
        .with_label_values(&["disk"])
        .set(s.sessions_disk as i64);
    // Routers read how full the tier that decodes is: the device's, where there is one.
    m.usage.set(if s.device_tier {
        usage_ratio(s.device_bytes, s.device_budget_bytes)
    } else {
        usage_ratio(s.resident_bytes, s.budget_bytes)
    });
    m.sessions
        .with_label_values(&["busy"])
        .set(s.sessions_busy as i64);
    m.sessions
        .with_label_values(&["idle"])
        .set(s.sessions_idle as i64);
    m.sessions
        .with_label_values(&["anonymous"])
        .set(s.anon as i64);
}

/// KV utilisation as routers read it (the Gateway API Inference Extension's
/// `KVCacheUtilization`, vLLM's `kv_cache_usage_perc`): a fraction in [0, 1]. Pinned
/// sessions may hold more than the budget for a while; that still reads 1 (full).
fn usage_ratio(resident: usize, budget: usize) -> f64 {
    if budget == 0 {
        return 0.0;
    }
    (resident as f64 / budget as f64).clamp(0.0, 1.0)
}

/// One event of a shared spill dir (one of [`SHARED_EVENTS`]).
pub fn shared_event(event: &'static str) {
    get().shared.with_label_values(&[event]).inc();
}

/// Time the writer thread spent on one write-behind.
pub fn write_behind_seconds(secs: f64) {
    get().write_behind_seconds.inc_by(secs.max(0.0));
}

pub fn lookup(result: &str, prompt_tokens: usize, reused: usize) {
    let m = get();
    m.lookups.with_label_values(&[result]).inc();
    m.query_tokens.inc_by(prompt_tokens as u64);
    m.hit_tokens.inc_by(reused as u64);
}

/// The cache element type in use and what one token costs in it (set once at load).
pub fn layout(dtype: &str, bytes_per_token: usize) {
    get()
        .bytes_per_token
        .with_label_values(&[dtype])
        .set(bytes_per_token as i64);
}

/// Tokens held by a session cache as its request ends.
pub fn session_tokens(tokens: usize) {
    get().session_tokens.observe(tokens as f64);
}

/// The tier moves a store of this kind makes, so their counters show from the start.
fn move_pairs(device_tier: bool) -> &'static [(Tier, Tier)] {
    use Tier::*;
    if device_tier {
        &[
            (Device, Host),
            (Host, Device),
            (Host, Disk),
            (Device, Disk),
            (Disk, Device),
        ]
    } else {
        &[(Host, Disk), (Disk, Host)]
    }
}

fn counters(d: &StoreCounters, device_tier: bool) {
    let m = get();
    for &(from, to) in move_pairs(device_tier) {
        let labels = [from.name(device_tier), to.name(device_tier)];
        let i = move_index(from, to);
        m.moves.with_label_values(&labels).inc_by(d.moves[i]);
        m.move_bytes
            .with_label_values(&labels)
            .inc_by(d.move_bytes[i]);
    }
    m.evictions
        .with_label_values(&["lru"])
        .inc_by(d.evicted_lru);
    m.evictions
        .with_label_values(&["pressure"])
        .inc_by(d.evicted_pressure);
    m.evictions
        .with_label_values(&["explicit"])
        .inc_by(d.evicted_explicit);
    m.spill_bytes.inc_by(d.spilled_bytes);
    m.restore_bytes.inc_by(d.restored_bytes);
    m.spill_seconds.inc_by(d.spill_seconds.max(0.0));
    m.restore_seconds.inc_by(d.restore_seconds.max(0.0));
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_ratio_is_a_fraction_in_0_1() {
        assert_eq!(super::usage_ratio(0, 0), 0.0);
        assert_eq!(super::usage_ratio(1, 4), 0.25);
        assert_eq!(super::usage_ratio(9, 4), 1.0);
    }
}

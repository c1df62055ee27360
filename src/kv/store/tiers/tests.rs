//! The tier policy without a GPU: the "device" tier is the CPU itself (tensor caches,
//! which [`SeqCache::to_device`] copies like any device's), so every move, budget and
//! counter runs as on a GPU server; the copies themselves are checked on a GPU by
//! `tests/tiers.rs` with `CANDELA_TEST_DEVICE=cuda`.

use candle_core::{Device, Tensor};

use super::super::{SessionStore, SpillConfig};
use super::{move_index, Tier};
use crate::kv::{CacheLayout, KvDtype, SeqCache};

fn layout() -> CacheLayout {
    CacheLayout {
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 4,
        dtype: KvDtype::F32,
        window: None,
    }
}

/// Bytes of one session of up to 256 tokens.
fn per() -> usize {
    layout().bytes_for(1)
}

/// Pretend a request computed `tokens`: each position's K/V holds values derived from
/// its token and layer, so a mixed-up cache shows.
fn fill(c: &mut SeqCache, tokens: &[u32]) {
    let pos = c.len();
    c.reserve(tokens.len()).unwrap();
    for layer in 0..layout().n_layers {
        let vals: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| (0..4).map(move |d| (t * 10 + d) as f32 + layer as f32 * 0.5))
            .collect();
        let k = Tensor::from_vec(vals, (1, 1, tokens.len(), 4), &Device::Cpu).unwrap();
        let v = (&k * -1.0).unwrap();
        c.write_layer(layer, pos, &k, &v).unwrap();
    }
    c.commit(tokens);
}

fn turn(s: &mut SessionStore, key: Option<&str>, prompt: &[u32]) -> usize {
    let (mut co, _) = s.checkout(key, prompt, layout(), &Device::Cpu).unwrap();
    let reused = co.reused;
    fill(&mut co.cache, &prompt[reused..]);
    s.checkin(key, co.cache);
    reused
}

fn values(c: &SeqCache) -> Vec<Vec<f32>> {
    c.export_layers()
        .unwrap()
        .into_iter()
        .flat_map(|(k, v)| [k, v])
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn store(device_budget: usize, host_budget: usize) -> SessionStore {
    let mut s = SessionStore::new(host_budget);
    s.enable_device_tier(Device::Cpu, device_budget);
    s
}

fn spill(s: &mut SessionStore, dir: &std::path::Path) {
    s.enable_spill(SpillConfig {
        dir: dir.to_path_buf(),
        disk_budget: u64::MAX,
        fingerprint: "m".into(),
        layout: layout(),
        device: Device::Cpu,
        shared: false,
    });
}

fn tier(s: &SessionStore, id: &str) -> &'static str {
    s.get(id).unwrap().tier
}

fn moves(s: &SessionStore, from: Tier, to: Tier) -> u64 {
    s.counters.moves[move_index(from, to)]
}

#[test]
fn idle_caches_move_down_device_host_disk_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(per(), per());
    spill(&mut s, dir.path());
    turn(&mut s, Some("a"), &[1, 2, 3]);
    assert_eq!(tier(&s, "a"), "device");
    turn(&mut s, Some("b"), &[4, 5]);
    assert_eq!((tier(&s, "a"), tier(&s, "b")), ("host", "device"));
    turn(&mut s, Some("c"), &[6]);
    assert_eq!(
        (tier(&s, "a"), tier(&s, "b"), tier(&s, "c")),
        ("disk", "host", "device")
    );
    let st = s.stats();
    assert!(st.device_tier);
    assert_eq!((st.device_bytes, st.device_budget_bytes), (per(), per()));
    assert_eq!((st.resident_bytes, st.budget_bytes), (per(), per()));
    assert!(st.disk_bytes > 0);
    assert_eq!(
        (st.sessions_idle, st.sessions_host, st.sessions_disk),
        (1, 1, 1)
    );
    assert_eq!(moves(&s, Tier::Device, Tier::Host), 2);
    assert_eq!(moves(&s, Tier::Host, Tier::Disk), 1);
    assert_eq!(
        s.counters.move_bytes[move_index(Tier::Device, Tier::Host)],
        2 * per() as u64
    );
    // Demotions are not evictions: nothing left memory but `a`'s trip to disk.
    assert_eq!(s.counters.evicted_lru, 1);
}

#[test]
fn a_session_comes_back_to_the_device_from_either_tier_with_its_cache_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(per(), per());
    spill(&mut s, dir.path());
    let (a, b): (Vec<u32>, Vec<u32>) = ((1..40).collect(), (100..130).collect());
    // Reference: the same caches computed with no tier in the way.
    let mut ref_a = SeqCache::new(layout(), &Device::Cpu);
    fill(&mut ref_a, &a);
    let mut ref_b = SeqCache::new(layout(), &Device::Cpu);
    fill(&mut ref_b, &b);
    turn(&mut s, Some("a"), &a);
    turn(&mut s, Some("b"), &b);
    turn(&mut s, Some("c"), &[7; 5]);
    assert_eq!((tier(&s, "a"), tier(&s, "b")), ("disk", "host"));
    for (id, prompt, want) in [("b", &b, &ref_b), ("a", &a, &ref_a)] {
        let mut next = prompt.clone();
        next.push(999);
        let (co, _) = s.checkout(Some(id), &next, layout(), &Device::Cpu).unwrap();
        assert_eq!(co.reused, prompt.len(), "{id}: whole prefix reused");
        assert_eq!(co.cache.tokens(), want.tokens());
        assert_eq!(
            values(&co.cache),
            values(want),
            "{id}: K/V after the round trip"
        );
        assert_eq!(s.get(id).unwrap().tier, "device", "busy: where it computes");
        s.checkin(Some(id), co.cache);
        assert_eq!(tier(&s, id), "device");
    }
    assert_eq!(moves(&s, Tier::Host, Tier::Device), 1);
    assert_eq!(moves(&s, Tier::Disk, Tier::Device), 1);
}

#[test]
fn pinned_sessions_stay_on_the_device_over_its_budget() {
    let mut s = store(per(), usize::MAX);
    turn(&mut s, Some("p"), &[1, 2]);
    s.set_pinned("p", true).unwrap();
    turn(&mut s, Some("x"), &[3]);
    turn(&mut s, Some("y"), &[4]);
    assert_eq!(tier(&s, "p"), "device");
    assert_eq!((tier(&s, "x"), tier(&s, "y")), ("host", "host"));
    assert_eq!(s.device_bytes(), per());
    // Unpinned, it goes down like any other at the next check-in.
    s.set_pinned("p", false).unwrap();
    turn(&mut s, Some("z"), &[5]);
    assert_eq!((tier(&s, "p"), tier(&s, "z")), ("host", "device"));
}

#[test]
fn anonymous_caches_count_against_the_device_and_are_dropped_past_it() {
    let mut s = store(per(), usize::MAX);
    let long: Vec<u32> = (0..40).collect();
    turn(&mut s, None, &long);
    assert_eq!((s.device_bytes(), s.resident_bytes()), (per(), 0));
    turn(&mut s, Some("a"), &[1]);
    // The older anonymous cache made room for the session.
    assert_eq!(s.stats().anon, 0);
    assert_eq!(tier(&s, "a"), "device");
    assert_eq!(s.counters.evicted_lru, 1);
}

#[test]
fn host_memory_pressure_moves_host_caches_and_leaves_the_device_alone() {
    let mut s = store(per(), usize::MAX);
    turn(&mut s, Some("a"), &[1]);
    turn(&mut s, Some("b"), &[2]);
    assert_eq!(s.relieve(1), per());
    assert!(s.get("a").is_err(), "no spill dir: dropped from host RAM");
    assert_eq!(tier(&s, "b"), "device");
    assert_eq!(s.counters.evicted_pressure, 1);
}

#[test]
fn a_device_budget_of_zero_keeps_no_idle_cache_on_the_device() {
    let mut s = store(0, usize::MAX);
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        turn(&mut s, Some(id), &[i as u32; 3]);
        assert_eq!(tier(&s, id), "host");
    }
    assert_eq!(s.device_bytes(), 0);
    assert_eq!(turn(&mut s, Some("b"), &[1, 1, 1, 8]), 3);
    assert_eq!(moves(&s, Tier::Host, Tier::Device), 1);
    assert_eq!(moves(&s, Tier::Device, Tier::Host), 4);
}

#[test]
fn shutdown_spills_every_tier() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(per(), usize::MAX);
    spill(&mut s, dir.path());
    turn(&mut s, Some("a"), &[1]);
    turn(&mut s, Some("b"), &[2]);
    s.set_pinned("b", true).unwrap();
    assert_eq!(s.spill_all(), 2);
    assert_eq!((tier(&s, "a"), tier(&s, "b")), ("disk", "disk"));
    assert_eq!(moves(&s, Tier::Host, Tier::Disk), 1);
    assert_eq!(moves(&s, Tier::Device, Tier::Disk), 1);
}

#[test]
fn without_a_device_tier_names_and_stats_stay_as_on_a_cpu_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionStore::new(per());
    spill(&mut s, dir.path());
    turn(&mut s, Some("a"), &[1]);
    turn(&mut s, Some("b"), &[2]);
    assert_eq!((tier(&s, "a"), tier(&s, "b")), ("disk", "memory"));
    let st = s.stats();
    assert!(!st.device_tier);
    assert_eq!((st.device_bytes, st.device_budget_bytes), (0, 0));
    assert_eq!((st.sessions_idle, st.sessions_host), (1, 0));
    assert_eq!(moves(&s, Tier::Host, Tier::Disk), 1);
    turn(&mut s, Some("a"), &[1, 3]);
    assert_eq!(moves(&s, Tier::Disk, Tier::Host), 1);
    assert_eq!(Tier::Host.name(false), "memory");
}

#[test]
fn device_budget_shares_resolve_against_free_memory_and_split_per_model() {
    use super::DeviceBudget;
    assert_eq!(DeviceBudget::default().resolve(1000), 500);
    assert_eq!(DeviceBudget::Bytes(7).resolve(1000), 7);
    assert_eq!(DeviceBudget::Share(0.5).split(2), DeviceBudget::Share(0.25));
    assert_eq!(DeviceBudget::Bytes(10).split(3), DeviceBudget::Bytes(3));
}

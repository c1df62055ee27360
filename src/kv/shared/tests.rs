use super::*;
use crate::kv::{CacheLayout, KvDtype};
use candle_core::{Device, Tensor};

fn cache_file(dir: &Path) -> PathBuf {
    dir.join(spill::file_name("s"))
}

fn lease_line(host: &str, pid: u32, expires_ms: u64) -> String {
    format!("{host} {pid} n0nce {expires_ms}\n")
}

#[test]
fn a_lease_excludes_other_replicas_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let a = Shared::start_as(dir.path(), u64::MAX, "host-a");
    let b = Shared::start_as(dir.path(), u64::MAX, "host-b");
    let f = cache_file(dir.path());
    a.acquire(&f).unwrap();
    // A second hold by the same replica (a write-behind still pending) is fine.
    a.acquire(&f).unwrap();
    let held = b.acquire(&f).unwrap_err();
    assert!(held.owner.starts_with("host-a:"), "{held:?}");
    assert!((1..=LEASE_TTL.as_secs()).contains(&held.retry_after));
    a.release(&f);
    assert!(b.acquire(&f).is_err(), "released while a hold remained");
    a.release(&f);
    assert!(!lease_path(&f).exists());
    b.acquire(&f).unwrap();
    assert!(a.acquire(&f).is_err());
}

#[test]
fn expired_and_dead_owners_leases_are_taken_over_live_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let me = Shared::start_as(dir.path(), u64::MAX, "host-me");
    let f = cache_file(dir.path());
    let lease = lease_path(&f);
    // Another host, expired.
    fs::write(&lease, lease_line("host-x", 1, now_ms() - 1)).unwrap();
    me.acquire(&f).unwrap();
    me.release(&f);
    // This host, a process that is gone, not yet expired.
    if cfg!(target_os = "linux") {
        fs::write(
            &lease,
            lease_line("host-me", 999_999_999, now_ms() + 60_000),
        )
        .unwrap();
        me.acquire(&f).unwrap();
        me.release(&f);
    }
    // Another host, live.
    fs::write(&lease, lease_line("host-x", 1, now_ms() + 60_000)).unwrap();
    assert!(me.acquire(&f).is_err());
    // A torn (unparsable) lease is replaced.
    fs::write(&lease, "").unwrap();
    me.acquire(&f).unwrap();
    let text = fs::read_to_string(&lease).unwrap();
    assert!(text.starts_with("host-me "), "{text}");
}

#[test]
fn replicas_racing_for_one_lease_exactly_one_wins() {
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        let f = cache_file(dir.path());
        // Half the rounds race over a stale lease, the others over none.
        if round % 2 == 1 {
            fs::write(lease_path(&f), lease_line("dead", 1, 0)).unwrap();
        }
        let replicas: Vec<Shared> = (0..6)
            .map(|i| Shared::start_as(dir.path(), u64::MAX, &format!("r{i}")))
            .collect();
        let barrier = std::sync::Barrier::new(replicas.len());
        let wins = std::thread::scope(|s| {
            let hs: Vec<_> = replicas
                .iter()
                .map(|r| {
                    let (f, barrier) = (&f, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        r.acquire(f).is_ok()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&w| w)
                .count()
        });
        assert_eq!(wins, 1, "round {round}");
    }
}

fn host_cache(n: usize) -> SeqCache {
    let layout = CacheLayout {
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 4,
        dtype: KvDtype::F16,
        window: None,
    };
    let mut c = SeqCache::new(layout, &Device::Cpu);
    c.reserve(n).unwrap();
    for l in 0..2 {
        let t = Tensor::ones((1, 1, n, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        c.write_layer(l, 0, &t, &t).unwrap();
    }
    c.commit(&(0..n as u32).collect::<Vec<_>>());
    c
}

fn job(dir: &Path, session: &str, n: usize) -> Job {
    Job {
        dir: dir.to_path_buf(),
        cache: host_cache(n),
        meta: spill::SpillMeta {
            session: session.into(),
            fingerprint: "m".into(),
            tokens: n,
            created: 1,
            hits: 0,
            generation: 1,
        },
        notes: [("resp_1".to_string(), "{}".to_string())].into(),
    }
}

#[test]
fn write_behind_lands_releases_its_lease_and_notes_are_found_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let a = Shared::start_as(dir.path(), u64::MAX, "host-a");
    let b = Shared::start_as(dir.path(), u64::MAX, "host-b");
    let f = dir.path().join(spill::file_name("s"));
    a.acquire(&f).unwrap();
    a.write_behind(job(dir.path(), "s", 7));
    a.flush();
    let (m, _) = spill::read_meta(&f).unwrap();
    assert_eq!((m.tokens, m.generation), (7, 1));
    assert!(!lease_path(&f).exists(), "lease kept after the write");
    // No temporary file is left behind.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    let (session, notes) = b.find_note("resp_1").unwrap();
    assert_eq!(session, "s");
    assert!(notes.contains_key("resp_1"));
    assert!(b.find_note("resp_2").is_none());
}

#[test]
fn the_disk_budget_holds_across_writers_and_spares_leased_files() {
    let dir = tempfile::tempdir().unwrap();
    let one = {
        let probe = tempfile::tempdir().unwrap();
        let s = Shared::start_as(probe.path(), u64::MAX, "p");
        s.write_behind(job(probe.path(), "x", 64));
        s.flush();
        let f = probe.path().join(spill::file_name("x"));
        fs::metadata(&f).unwrap().len() + fs::metadata(spill::notes_path(&f)).unwrap().len()
    };
    // Room for three sessions; two writers write five.
    let a = Shared::start_as(dir.path(), 3 * one + one / 2, "host-a");
    let b = Shared::start_as(dir.path(), 3 * one + one / 2, "host-b");
    let oldest = dir.path().join(spill::file_name("s0"));
    for i in 0..5 {
        let w = if i % 2 == 0 { &a } else { &b };
        w.write_behind(job(dir.path(), &format!("s{i}"), 64));
        w.flush();
        std::thread::sleep(std::time::Duration::from_millis(20));
        if i == 0 {
            // s0 is being served by b: its lease protects it.
            b.acquire(&oldest).unwrap();
        }
    }
    let total: u64 = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lease"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total <= 3 * one + one / 2, "{total} > budget");
    assert!(oldest.exists(), "a leased session was deleted");
    assert!(dir.path().join(spill::file_name("s4")).exists());
    assert!(!dir.path().join(spill::file_name("s1")).exists());
}

#[test]
fn a_read_only_dir_is_served_without_leases() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("gone");
    // A directory that does not exist (and cannot be written) stands in for a
    // read-only or vanished volume: acquiring works, writing fails quietly.
    let a = Shared::start_as(&sub, u64::MAX, "host-a");
    let f = sub.join(spill::file_name("s"));
    a.acquire(&f).unwrap();
    a.release(&f);
    a.acquire(&f).unwrap();
    a.write_behind(Job {
        dir: dir.path().join("gone/also-gone\0bad"),
        ..job(&sub, "s", 3)
    });
    a.flush();
    a.acquire(&f).unwrap();
}

#[cfg(target_os = "linux")]
#[test]
fn a_killed_unreaped_process_counts_as_dead() {
    assert!(pid_alive(std::process::id()));
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    assert!(pid_alive(child.id()));
    child.kill().unwrap();
    // Not waited for yet: a zombie until reaped.
    let t0 = std::time::Instant::now();
    while pid_alive(child.id()) {
        assert!(
            t0.elapsed().as_secs() < 5,
            "a killed process still counts as alive"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait().unwrap();
    assert!(!pid_alive(child.id()));
}

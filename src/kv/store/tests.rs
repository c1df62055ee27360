use super::*;
use candle_core::{DType, Tensor};

fn layout() -> CacheLayout {
    CacheLayout {
        n_layers: 1,
        n_kv_heads: 1,
        head_dim: 4,
        dtype: crate::kv::KvDtype::F32,
        window: None,
    }
}

/// Pretend a request computed `tokens` into the cache.
fn fill(c: &mut SeqCache, tokens: &[u32]) {
    let pos = c.len();
    c.reserve(tokens.len()).unwrap();
    let t = Tensor::zeros((1, 1, tokens.len(), 4), DType::F32, &Device::Cpu).unwrap();
    c.write_layer(0, pos, &t, &t).unwrap();
    c.commit(tokens);
}

fn turn(s: &mut SessionStore, key: Option<&str>, prompt: &[u32]) -> usize {
    let (mut co, _) = s.checkout(key, prompt, layout(), &Device::Cpu).unwrap();
    let reused = co.reused;
    fill(&mut co.cache, &prompt[reused..]);
    s.checkin(key, co.cache);
    reused
}

#[test]
fn reuse_after_append_and_cut_back_after_edit() {
    let mut s = SessionStore::new(usize::MAX);
    assert_eq!(turn(&mut s, Some("a"), &[1, 2, 3, 4]), 0);
    assert_eq!(turn(&mut s, Some("a"), &[1, 2, 3, 4, 5, 6]), 4);
    // An edit in the middle: only the shared prefix is reused.
    assert_eq!(turn(&mut s, Some("a"), &[1, 2, 9, 9, 9]), 2);
    // The same prompt again: all but the last token (its logits are needed).
    assert_eq!(turn(&mut s, Some("a"), &[1, 2, 9, 9, 9]), 4);
    assert_eq!(s.get("a").unwrap().tokens, 5);
    assert_eq!(s.get("a").unwrap().hits, 3);
}

#[test]
fn busy_session_is_refused_and_deleted_busy_session_goes_at_checkin() {
    let mut s = SessionStore::new(usize::MAX);
    let (co, _) = s
        .checkout(Some("a"), &[1, 2], layout(), &Device::Cpu)
        .unwrap();
    assert_eq!(
        s.checkout(Some("a"), &[1], layout(), &Device::Cpu)
            .unwrap_err(),
        KvError::Busy("a".into())
    );
    assert!(s.get("a").unwrap().busy);
    s.delete("a").unwrap();
    assert_eq!(s.get("a").unwrap_err(), KvError::NotFound("a".into()));
    assert!(s.list().is_empty());
    s.checkin(Some("a"), co.cache);
    assert_eq!(s.get("a").unwrap_err(), KvError::NotFound("a".into()));
}

#[test]
fn anonymous_pool_reuses_longest_prefix() {
    let mut s = SessionStore::new(usize::MAX);
    let long: Vec<u32> = (0..40).collect();
    turn(&mut s, None, &long);
    let mut next = long.clone();
    next.extend([100, 101]);
    assert_eq!(turn(&mut s, None, &next), 40);
    // A short shared prefix is not worth it.
    assert_eq!(turn(&mut s, None, &[0, 1, 2, 77]), 0);
}

#[test]
fn budget_never_exceeded_lru_first_pinned_kept() {
    let per = 256 * layout().bytes_per_token();
    let mut s = SessionStore::new(2 * per);
    turn(&mut s, Some("old"), &[1; 10]);
    turn(&mut s, Some("pinned"), &[2; 10]);
    s.set_pinned("pinned", true).unwrap();
    turn(&mut s, Some("new"), &[3; 10]);
    assert!(s.resident_bytes() <= s.budget());
    assert!(s.get("old").is_err(), "least recently used goes first");
    assert!(s.get("pinned").is_ok());
    assert!(s.get("new").is_ok());
    // Randomised sequence: the budget holds after every step.
    let mut x = 7u32;
    for _ in 0..200 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let key = format!("s{}", x % 5);
        let len = 1 + (x >> 8) as usize % 300;
        let prompt: Vec<u32> = (0..len as u32).collect();
        turn(&mut s, Some(&key), &prompt);
        assert!(s.resident_bytes() <= s.budget().max(per), "over budget");
    }
}

fn spill_cfg(dir: &std::path::Path, fp: &str) -> SpillConfig {
    SpillConfig {
        dir: dir.to_path_buf(),
        disk_budget: u64::MAX,
        fingerprint: fp.into(),
        layout: layout(),
        device: Device::Cpu,
        shared: false,
    }
}

#[test]
fn evicted_sessions_spill_and_restore_identically() {
    let dir = tempfile::tempdir().unwrap();
    let per = 256 * layout().bytes_per_token();
    let mut s = SessionStore::new(per);
    s.enable_spill(spill_cfg(dir.path(), "m"));
    turn(&mut s, Some("a"), &[1, 2, 3, 4, 5]);
    turn(&mut s, Some("b"), &[9, 9, 9]);
    assert_eq!(s.get("a").unwrap().tier, "disk");
    assert_eq!(s.get("b").unwrap().tier, "memory");
    assert!(s.resident_bytes() <= s.budget());
    // Next turn of `a` restores it and reuses its whole prefix.
    assert_eq!(turn(&mut s, Some("a"), &[1, 2, 3, 4, 5, 6]), 5);
    assert_eq!(s.restores, 1);
    assert_eq!(s.get("a").unwrap().tier, "memory");
    assert_eq!(s.get("b").unwrap().tier, "disk");
}

#[test]
fn sessions_survive_a_restart_and_foreign_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionStore::new(usize::MAX);
    s.enable_spill(spill_cfg(dir.path(), "model-1"));
    turn(&mut s, Some("keep"), &[5, 6, 7]);
    assert_eq!(s.spill_all(), 1);
    std::fs::write(dir.path().join("junk.kv.safetensors"), b"not a file").unwrap();
    std::fs::write(dir.path().join("half.kv.tmp"), b"torn").unwrap();
    // Same model: the session is back, on disk, and restores on use.
    let mut s2 = SessionStore::new(usize::MAX);
    assert_eq!(s2.enable_spill(spill_cfg(dir.path(), "model-1")), 1);
    assert_eq!(s2.get("keep").unwrap().tier, "disk");
    assert_eq!(turn(&mut s2, Some("keep"), &[5, 6, 7, 8]), 3);
    assert!(!dir.path().join("half.kv.tmp").exists());
    // Another model: nothing is loaded.
    s2.spill_all();
    let mut s3 = SessionStore::new(usize::MAX);
    assert_eq!(s3.enable_spill(spill_cfg(dir.path(), "model-2")), 0);
    assert!(s3.get("keep").is_err());
}

#[test]
fn disk_budget_deletes_the_oldest_spilled() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionStore::new(0);
    let mut cfg = spill_cfg(dir.path(), "m");
    cfg.disk_budget = 1;
    s.enable_spill(cfg);
    turn(&mut s, Some("x"), &[1, 2]);
    // Budget 0 in memory, 1 byte on disk: nothing can stay.
    assert!(s.get("x").is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn relieve_frees_lru_first() {
    let mut s = SessionStore::new(usize::MAX);
    turn(&mut s, Some("old"), &[1; 10]);
    turn(&mut s, Some("new"), &[2; 10]);
    let one = s.get("old").unwrap().bytes;
    assert_eq!(s.relieve(1), one);
    assert!(s.get("old").is_err(), "no spill dir: dropped");
    assert!(s.get("new").is_ok());
    assert_eq!(s.relieve(0), 0);
}

#[test]
fn notes_live_and_die_with_their_session_in_every_tier() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SessionStore::new(usize::MAX);
    s.enable_spill(spill_cfg(dir.path(), "m"));
    assert_eq!(
        s.put_note("nobody", "r0", "x".into()),
        Err(KvError::NotFound("nobody".into()))
    );
    turn(&mut s, Some("a"), &[1, 2, 3]);
    turn(&mut s, Some("b"), &[4, 5, 6]);
    s.put_note("a", "r1", "one".into()).unwrap();
    s.put_note("a", "r2", "two".into()).unwrap();
    let (sid, notes) = s.find_note("r2").unwrap();
    assert_eq!(sid, "a");
    assert_eq!(notes.len(), 2);
    assert!(s.find_note("r3").is_none());
    // Spilled with the session (graceful stop), back after a restart, and a note
    // added while the session is on disk reaches the disk too.
    assert_eq!(s.spill_all(), 2);
    s.put_note("a", "r3", "three".into()).unwrap();
    let mut s2 = SessionStore::new(usize::MAX);
    assert_eq!(s2.enable_spill(spill_cfg(dir.path(), "m")), 2);
    assert_eq!(s2.find_note("r3").unwrap().1["r1"], "one");
    // Restoring the cache keeps the notes; a second stop writes them again.
    assert_eq!(turn(&mut s2, Some("a"), &[1, 2, 3, 7]), 3);
    assert_eq!(s2.find_note("r1").unwrap().0, "a");
    s2.spill_all();
    let mut s3 = SessionStore::new(usize::MAX);
    s3.enable_spill(spill_cfg(dir.path(), "m"));
    assert_eq!(s3.find_note("r2").unwrap().1["r2"], "two");
    // Deleting the session deletes its notes, on disk too.
    s3.delete("a").unwrap();
    assert!(s3.find_note("r1").is_none());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| n.starts_with("b.")), "{left:?}");
}

#[test]
fn notes_go_when_an_evicted_session_is_dropped() {
    // No spilling: eviction drops the session and its notes.
    let per = 256 * layout().bytes_per_token();
    let mut s = SessionStore::new(per);
    turn(&mut s, Some("a"), &[1, 2, 3]);
    s.put_note("a", "r1", "one".into()).unwrap();
    turn(&mut s, Some("b"), &[4, 5, 6]);
    assert!(s.get("a").is_err());
    assert!(s.find_note("r1").is_none());
}

/// Two replicas on one shared spill dir, with f16 host caches (written behind by the
/// writer thread).
fn replicas(dir: &std::path::Path) -> (SessionStore, SessionStore) {
    let mk = |host: &str| {
        let mut s = SessionStore::new(usize::MAX);
        s.enable_spill(SpillConfig {
            layout: host_layout(),
            shared: true,
            ..spill_cfg(dir, "m")
        });
        s.share_as(host);
        s
    };
    (mk("replica-a"), mk("replica-b"))
}

fn host_layout() -> CacheLayout {
    CacheLayout {
        dtype: crate::kv::KvDtype::F16,
        ..layout()
    }
}

fn host_turn(s: &mut SessionStore, key: &str, prompt: &[u32]) -> Result<usize, KvError> {
    let (mut co, _) = s.checkout(Some(key), prompt, host_layout(), &Device::Cpu)?;
    let reused = co.reused;
    fill(&mut co.cache, &prompt[reused..]);
    s.checkin(Some(key), co.cache);
    if let Some(sh) = &s.shared {
        sh.flush();
    }
    Ok(reused)
}

#[test]
fn shared_dir_sessions_move_between_replicas_with_their_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = replicas(dir.path());
    assert_eq!(host_turn(&mut a, "s", &[1, 2, 3, 4]).unwrap(), 0);
    // Written behind the turn: the other replica finds it on a miss, without a restart.
    assert_eq!(host_turn(&mut b, "s", &[1, 2, 3, 4, 5, 6]).unwrap(), 4);
    assert_eq!(b.restores, 1);
    // Back on the first replica: its memory copy is older than the file, which wins.
    assert_eq!(
        host_turn(&mut a, "s", &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap(),
        6
    );
    assert_eq!(a.get("s").unwrap().tokens, 8);
    // The file stays after a restore (it is what a crash falls back to).
    assert!(dir.path().join(spill::file_name("s")).exists());
}

#[test]
fn shared_dir_one_replica_at_a_time_and_a_dead_ones_lease_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = replicas(dir.path());
    host_turn(&mut a, "s", &[1, 2, 3]).unwrap();
    let (co, _) = a
        .checkout(Some("s"), &[1, 2, 3, 4], host_layout(), &Device::Cpu)
        .unwrap();
    // Busy on replica a: replica b is refused, as a second request on one replica is.
    assert_eq!(
        host_turn(&mut b, "s", &[1, 2, 3, 4]).unwrap_err(),
        KvError::Busy("s".into())
    );
    a.checkin(Some("s"), co.cache);
    a.shared.as_ref().unwrap().flush();
    assert_eq!(host_turn(&mut b, "s", &[1, 2, 3, 4]).unwrap(), 3);
    // Replica b dies in the middle of a turn (its lease stays, its process is gone):
    // a takes the session over from the last completed turn.
    let (co, _) = b
        .checkout(Some("s"), &[1, 2, 3, 4, 5], host_layout(), &Device::Cpu)
        .unwrap();
    std::mem::forget(co);
    let lease = crate::kv::shared::lease_path(&dir.path().join(spill::file_name("s")));
    let text = std::fs::read_to_string(&lease).unwrap();
    let mut f: Vec<&str> = text.split_whitespace().collect();
    f[0] = "replica-a";
    f[1] = "999999999";
    std::fs::write(&lease, f.join(" ")).unwrap();
    if cfg!(target_os = "linux") {
        assert_eq!(host_turn(&mut a, "s", &[1, 2, 3, 4, 5, 6]).unwrap(), 4);
    }
}

#[test]
fn shared_dir_foreign_and_torn_files_are_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _) = replicas(dir.path());
    let path = dir.path().join(spill::file_name("s"));
    // Another model's file under the session's name.
    let mut other = SessionStore::new(usize::MAX);
    other.enable_spill(SpillConfig {
        layout: host_layout(),
        ..spill_cfg(dir.path(), "other-model")
    });
    turn(&mut other, Some("s"), &[1, 2, 3]);
    let _ = other.spill_all();
    assert!(path.exists());
    let (co, _) = a
        .checkout(Some("s"), &[1, 2, 3, 4], host_layout(), &Device::Cpu)
        .unwrap();
    assert_eq!(co.reused, 0, "loaded another model's file");
    a.checkin(Some("s"), co.cache);
    a.shared.as_ref().unwrap().flush();
    // Torn: half of our own file.
    let full = std::fs::read(&path).unwrap();
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let (_, mut b) = replicas(dir.path());
    let (co, _) = b
        .checkout(Some("s"), &[1, 2, 3, 4, 5], host_layout(), &Device::Cpu)
        .unwrap();
    assert_eq!(co.reused, 0, "loaded a torn file");
}

#[test]
fn shared_dir_stored_responses_are_found_by_other_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = replicas(dir.path());
    host_turn(&mut a, "s", &[1, 2, 3]).unwrap();
    a.put_note("s", "resp_1", "{\"x\":1}".into()).unwrap();
    a.shared.as_ref().unwrap().flush();
    let (id, notes) = b.find_note("resp_1").unwrap();
    assert_eq!(id, "s");
    assert_eq!(notes["resp_1"], "{\"x\":1}");
    // b serves the next turn, stores another response; a sees both after b's turn.
    host_turn(&mut b, "s", &[1, 2, 3, 4]).unwrap();
    b.put_note("s", "resp_2", "{}".into()).unwrap();
    b.shared.as_ref().unwrap().flush();
    host_turn(&mut b, "s", &[1, 2, 3, 4, 5]).unwrap();
    assert_eq!(host_turn(&mut a, "s", &[1, 2, 3, 4, 5, 6]).unwrap(), 5);
    let (_, notes) = a.find_note("resp_2").unwrap();
    assert!(notes.contains_key("resp_1") && notes.contains_key("resp_2"));
}

//! kill -9 while the server spills its sessions (SIGTERM starts the spill, SIGKILL lands
//! as soon as the first file is complete). On restart every intact session is restored
//! and served, a torn file is discarded with a warning, a half-written temp file is
//! removed, and nothing panics.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const SESSIONS: usize = 8;

fn prompt(i: usize) -> String {
    let mut p = format!("Notes of session {i}.");
    for j in 0..24 {
        p.push_str(&format!(
            " Item {i}-{j}: the quick brown fox jumps over the lazy dog."
        ));
    }
    p
}

fn spilled(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".kv.safetensors"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn complete(url: &str, key: &str, prompt: &str) -> Value {
    let (status, body) = common::post_json(
        &format!("{url}/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "prompt_cache_key": key}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

#[test]
fn kill_9_during_spill_loses_nothing_intact_and_never_panics() {
    let spill = tempfile::tempdir().unwrap();
    let args = [
        "--ctx-size".as_ref(),
        "2048".as_ref(),
        "--kv-spill-dir".as_ref(),
        spill.path().as_os_str(),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. Sessions with a few hundred tokens each, all resident in memory.
    let mut first = common::Child::spawn(&args);
    rt.block_on(async {
        for i in 0..SESSIONS {
            complete(&first.url, &format!("crash-{i}"), &prompt(i)).await;
        }
    });
    assert!(
        spilled(spill.path()).is_empty(),
        "nothing spills before the stop"
    );

    // 2. SIGTERM starts the spill; SIGKILL as soon as two files are complete.
    first.signal("TERM");
    let t0 = Instant::now();
    while spilled(spill.path()).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "spill never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    first.signal("KILL");
    first.wait(10);
    let first_log = first.log_text();
    assert!(!first_log.contains("panicked"), "{first_log}");
    let files = spilled(spill.path());
    eprintln!("killed with {}/{SESSIONS} sessions spilled", files.len());

    // 3. A torn file (what a non-atomic filesystem could leave): header intact, data cut.
    let torn_name = files[0].clone();
    let torn = spill.path().join(&torn_name);
    let len = std::fs::metadata(&torn).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&torn)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let torn_key = torn_name.trim_end_matches(".kv.safetensors").to_string();
    std::fs::write(spill.path().join("crash-x.kv.tmp"), b"half a file").unwrap();

    // 4. Restart: every intact session restores; the torn one starts afresh.
    let second = common::Child::spawn(&args);
    let restored = rt.block_on(async {
        let mut restored = 0;
        for i in 0..SESSIONS {
            let key = format!("crash-{i}");
            let intact = key != torn_key && files.contains(&format!("{key}.kv.safetensors"));
            let turn2 = format!("{} And one more thing.", prompt(i));
            let body = complete(&second.url, &key, &turn2).await;
            if intact {
                assert!(cached(&body) > 100, "session {i} not restored: {body}");
                let fresh = complete(&second.url, &format!("fresh-{i}"), &turn2).await;
                assert_eq!(cached(&fresh), 0);
                assert_eq!(
                    body["choices"][0]["text"], fresh["choices"][0]["text"],
                    "restored session {i} continues differently"
                );
                restored += 1;
            } else {
                assert_eq!(cached(&body), 0, "session {i} had no intact file: {body}");
            }
        }
        restored
    });
    assert!(restored >= 1, "no intact session to restore");
    assert_eq!(common::get_status(&second.url, "/health"), Some(200));
    assert!(!spill.path().join("crash-x.kv.tmp").exists());
    let log = second.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains(&torn_key),
        "no warning about the torn file:\n{log}"
    );
}

//! The real `candela` binary: flags, start-up message, SIGTERM → graceful stop that
//! spills sessions and exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigterm_spills_sessions_and_exits_cleanly() {
    let spill = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(["serve", "--port", "0", "--ctx-size", "1024", "--model"])
        .arg(common::model_path())
        .arg("--data-dir")
        .arg(common::data_dir())
        .arg("--kv-spill-dir")
        .arg(spill.path())
        .env("CANDELA_CONFIG", "/dev/null")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "candela: listening on http://127.0.0.1:PORT (...)"
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("stderr closed before the listen line")
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Ok(r) = c.get(format!("{url}/health")).send().await {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never became healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = c
            .post(format!("{url}/v1/completions"))
            .json(&serde_json::json!({"prompt": "Keep me", "max_tokens": 3, "prompt_cache_key": "sigterm-session"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    });
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    assert!(
        spill.path().join("sigterm-session.kv.safetensors").exists(),
        "session not spilled"
    );
}

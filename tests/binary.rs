//! The real `candela` binary: flags, start-up message, SIGTERM → graceful stop that
//! spills sessions and exits 0.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn sigterm_spills_sessions_and_exits_cleanly() {
    let spill = tempfile::tempdir().unwrap();
    let mut server = common::Child::spawn(&[
        "--ctx-size".as_ref(),
        "1024".as_ref(),
        "--kv-spill-dir".as_ref(),
        spill.path().as_os_str(),
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (status, _) = common::post_json(
            &format!("{}/v1/completions", server.url),
            &serde_json::json!({"prompt": "Keep me", "max_tokens": 3, "prompt_cache_key": "sigterm-session"}),
        )
        .await;
        assert_eq!(status, 200);
    });
    server.signal("TERM");
    let status = server.wait(30);
    assert!(status.success(), "exit status {status}");
    assert!(
        spill.path().join("sigterm-session.kv.safetensors").exists(),
        "session not spilled"
    );
}

/// `candela doctor --device cpu` on the default model with `args`: its stdout, once it
/// exited successfully.
fn doctor_on_the_cpu(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(["doctor", "--device", "cpu"])
        .args(args)
        .arg("--model")
        .arg(common::model_path())
        .arg("--data-dir")
        .arg(common::data_dir())
        .output()
        .expect("run candela doctor");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "doctor failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `candela doctor` on the CPU: it decodes greedily through `Model::forward` and prints
/// per-run lines (a GPU build adds the fused-path and CPU-comparison lines).
#[test]
fn doctor_runs_on_the_cpu() {
    let stdout = doctor_on_the_cpu(&["--tokens", "4", "--ctx-size", "1024"]);
    assert!(stdout.contains("fused GPU decode: no"), "{stdout}");
    assert!(stdout.contains("-- short prompt:"), "{stdout}");
    assert!(stdout.contains("-- long prompt:"), "{stdout}");
    assert!(stdout.contains("8 sequences stepped together:"), "{stdout}");
}

/// `candela doctor --prefill` compares the fused GPU path's ways of prefilling only: on
/// the CPU it says there is nothing to compare and runs no decoding.
#[test]
fn doctor_prefill_on_the_cpu_says_it_needs_a_gpu() {
    let stdout = doctor_on_the_cpu(&["--prefill", "--ctx-size", "128"]);
    let needs = "this device has none (try --device cuda)";
    assert!(stdout.contains(needs), "{stdout}");
    assert!(!stdout.contains("-- short prompt:"), "{stdout}");
    assert!(
        !stdout.contains("8 sequences stepped together:"),
        "{stdout}"
    );
}

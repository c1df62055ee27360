//! The official `openai` Python package, unmodified, against a real server.
//! Needs `python3 -m pip install openai` (`.ci/run` installs it); a missing package is
//! a failure, not a skip.

mod common;

#[test]
fn official_openai_python_client_works() {
    let base = common::server();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_check.py");
    let python = std::env::var("CANDELA_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&base)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai SDK check failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("openai sdk ok"), "{stdout}");
}

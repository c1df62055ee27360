//! The official `openai` Python package, unmodified, against a real server.
//! Needs `python3 -m pip install openai` (`.ci/run` installs it); a missing package is
//! a failure, not a skip.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn official_openai_python_client_works() {
    let base = common::server();
    let stdout = common::run_sdk_script("openai_sdk_check.py", &[&base]);
    assert!(stdout.contains("openai sdk ok"), "{stdout}");
}

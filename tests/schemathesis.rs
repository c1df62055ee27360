//! Schemathesis (PyPI) fuzzes the real binary from its own `/openapi.json`: every
//! operation, schema-driven and random bodies, stateful sequences. No response may be a
//! 5xx or carry an undocumented status or content type, and the server must still be
//! healthy afterwards without a panic in its log. `.ci/run` installs schemathesis.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

#[test]
fn schemathesis_finds_no_server_error() {
    let spill = tempfile::tempdir().unwrap();
    // A tiny context keeps every generated request cheap to serve.
    let server = common::Child::spawn(&[
        "--ctx-size".as_ref(),
        "96".as_ref(),
        "--kv-spill-dir".as_ref(),
        spill.path().as_os_str(),
    ]);
    // Through the interpreter, so no console-script shim has to be on PATH.
    let out = Command::new(common::python())
        .args([
            "-m",
            "schemathesis.cli",
            "run",
            &format!("{}/openapi.json", server.url),
        ])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
            // A request may wait behind others for the one engine; on a slow or busy
            // machine that is more than schemathesis's default 10 s read timeout.
            "--request-timeout",
            "120",
            "--no-color",
        ])
        .output()
        .expect("schemathesis is not installed (pip install schemathesis)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert_eq!(
        common::get_status(&server.url, "/health"),
        Some(200),
        "{text}"
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!(
        "{}",
        text.lines().rev().take(12).collect::<Vec<_>>().join("\n")
    );
}

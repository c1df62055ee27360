//! `/dashboard` in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `.ci/run`) loads the page against a live server; the DOM after its scripts ran must
//! show fresh values, and a screenshot is taken.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

fn chromium() -> String {
    std::env::var("CANDELA_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

fn headless(extra: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=6000",
    ];
    args.extend_from_slice(extra);
    Command::new(chromium())
        .args(args)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); install it: apt-get install -y chromium",
                chromium()
            )
        })
}

#[test]
fn dashboard_renders_live_values_in_chromium() {
    let base = common::server();
    let url = format!("{base}/dashboard");
    let dom = headless(&["--dump-dom"], &url);
    let html = String::from_utf8_lossy(&dom.stdout);
    let status = html.split("<div id=\"status\">").nth(1).unwrap_or_default();
    let status = &status[..status.find('<').unwrap_or(0)];
    assert!(
        status.starts_with("updated "),
        "the page did not read /metrics: status {status:?}"
    );
    // Host memory is always there: its card must show a byte value, not a placeholder.
    let mem = html.split("id=\"v-mem\">").nth(1).unwrap_or_default();
    let shown = &mem[..mem.find('<').unwrap_or(0)];
    assert!(
        shown.ends_with("GiB") || shown.ends_with("MiB"),
        "host memory card shows {shown:?}"
    );

    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&out);
    let shot = format!("--screenshot={}", out.display());
    headless(&[&shot, "--window-size=1200,900"], &url);
    let png = std::fs::read(&out).expect("no screenshot written");
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 10_000,
        "screenshot suspiciously small: {} bytes",
        png.len()
    );
}

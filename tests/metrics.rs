//! `/metrics` against a real server and the real default model: counters move by the
//! right amounts, host gauges match /proc/meminfo, and every metric the Grafana
//! dashboard queries exists.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Tests here compare counters before and after their own traffic, so they take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn scrape() -> String {
    let url = format!("{}/metrics", common::server());
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.unwrap()
}

/// Sum of the samples of `name` whose labels include every pair in `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (lbls, v) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels
            .iter()
            .all(|(k, want)| lbls.contains(&format!("{k}=\"{want}\"")))
        {
            *found.get_or_insert(0.0) += v.trim().parse::<f64>().unwrap();
        }
    }
    found
}

/// Names of all samples in a scrape (`x_bucket`, `x_sum`, `x_count` for histograms).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

fn meminfo_kb(key: &str) -> f64 {
    let t = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = t.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        * 1024.0
}

/// Scrape until `name` is present (the sampler runs in the background), up to ~5 s.
async fn scrape_with(name: &str) -> String {
    let t0 = Instant::now();
    loop {
        let s = scrape().await;
        if value(&s, name, &[]).is_some() || t0.elapsed() > Duration::from_secs(5) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn completion(prompt: &str, max_tokens: u32) -> (usize, usize, Value) {
    let body = serde_json::to_vec(&json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0
    }))
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", common::server()))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    (body.len(), text.len(), serde_json::from_str(&text).unwrap())
}

#[tokio::test]
async fn one_completion_moves_counters_by_its_usage() {
    let _turn = TURN.lock().await;
    let ok = [("endpoint", "/v1/completions"), ("status", "200")];
    let before = scrape().await;
    let (req_len, resp_len, r) = completion("The capital of France is", 6).await;
    let after = scrape().await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels).unwrap_or(0.0) - value(&before, name, labels).unwrap_or(0.0)
    };
    let usage = &r["usage"];
    let completion_tokens = usage["completion_tokens"].as_f64().unwrap();
    assert!(completion_tokens >= 1.0);
    assert_eq!(delta("candela_http_requests_total", &ok), 1.0);
    assert_eq!(
        delta("candela_generated_tokens_total", &[]),
        completion_tokens
    );
    assert_eq!(
        delta("candela_prompt_tokens_total", &[]),
        usage["prompt_tokens"].as_f64().unwrap()
    );
    assert_eq!(delta("candela_time_to_first_token_seconds_count", &[]), 1.0);
    let finish = r["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(
        delta("candela_request_finish_total", &[("reason", finish)]),
        1.0
    );
    // Bytes from 127.0.0.1: our request body; the first scrape's and the completion's
    // response bodies (both counted before the second scrape was rendered).
    let peer = [("peer", "loopback")];
    assert_eq!(
        delta("candela_http_request_bytes_total", &peer),
        req_len as f64
    );
    assert_eq!(
        delta("candela_http_response_bytes_total", &peer),
        (before.len() + resp_len) as f64
    );
    assert_eq!(
        delta("candela_http_request_bytes_total", &[("peer", "lan")]),
        0.0
    );
}

/// Concurrent generations share batched decode steps whose sampling runs on the thread
/// pool; their tokens must still be counted under the model's label, never an empty one.
#[tokio::test]
async fn concurrent_completions_count_under_the_model_label() {
    let _turn = TURN.lock().await;
    let before = scrape().await;
    let prompts = [
        "One, two, three,",
        "The sky is",
        "def add(a, b):",
        "Dear diary,",
    ];
    let runs = futures::future::join_all(prompts.iter().map(|p| completion(p, 12))).await;
    let after = scrape().await;
    let model = runs[0].2["model"].as_str().unwrap().to_string();
    let sum = |key: &str| -> f64 {
        runs.iter()
            .map(|(_, _, r)| r["usage"][key].as_f64().unwrap())
            .sum()
    };
    let delta = |name: &str| {
        let l = [("model", model.as_str())];
        value(&after, name, &l).unwrap_or(0.0) - value(&before, name, &l).unwrap_or(0.0)
    };
    assert_eq!(
        delta("candela_generated_tokens_total"),
        sum("completion_tokens")
    );
    assert_eq!(delta("candela_prompt_tokens_total"), sum("prompt_tokens"));
    assert!(
        !after.contains("model=\"\""),
        "a series with an empty model label:\n{}",
        after
            .lines()
            .filter(|l| l.contains("model=\"\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn streamed_response_bytes_are_counted() {
    let _turn = TURN.lock().await;
    let peer = [("peer", "loopback")];
    let before = scrape().await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", common::server()))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 5, "stream": true}))
        .send()
        .await
        .unwrap();
    let streamed = r.text().await.unwrap();
    assert!(streamed.contains("data: [DONE]"));
    let after = scrape().await;
    let delta = value(&after, "candela_http_response_bytes_total", &peer).unwrap()
        - value(&before, "candela_http_response_bytes_total", &peer).unwrap();
    assert_eq!(delta, (before.len() + streamed.len()) as f64);
}

#[tokio::test]
async fn host_memory_gauges_match_proc_meminfo() {
    let _turn = TURN.lock().await;
    let s = scrape_with("candela_host_memory_total_bytes").await;
    let total = meminfo_kb("MemTotal:");
    let avail = meminfo_kb("MemAvailable:");
    let swap_total = meminfo_kb("SwapTotal:");
    let swap_used = swap_total - meminfo_kb("SwapFree:");
    let got = |n: &str| value(&s, n, &[]).unwrap_or_else(|| panic!("{n} missing"));
    // Available memory moves between the sample and our read; 1% of total is the bound.
    let close = |a: f64, b: f64| (a - b).abs() <= 0.01 * total;
    assert!((got("candela_host_memory_total_bytes") - total).abs() <= 0.01 * total);
    // Memory moves while tests load models: retry until a sample and a read of
    // /proc/meminfo taken close together agree (the sampler runs every 2 s).
    let mut agreed = close(got("candela_host_memory_available_bytes"), avail)
        && close(got("candela_host_memory_used_bytes"), total - avail);
    for _ in 0..30 {
        if agreed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let s2 = scrape().await;
        let avail2 = meminfo_kb("MemAvailable:");
        let g = |n: &str| value(&s2, n, &[]).unwrap_or(f64::NAN);
        agreed = close(g("candela_host_memory_available_bytes"), avail2)
            && close(g("candela_host_memory_used_bytes"), total - avail2);
    }
    assert!(
        agreed,
        "host memory gauges never agreed with /proc/meminfo within 1%"
    );
    assert!(close(got("candela_host_swap_total_bytes"), swap_total));
    assert!(close(got("candela_host_swap_used_bytes"), swap_used));
    if std::path::Path::new("/proc/pressure/memory").exists() {
        assert_eq!(
            value(&s, "candela_collector_up", &[("source", "psi")]),
            Some(1.0)
        );
        let some = [("kind", "some")];
        assert!(value(
            &s,
            "candela_host_memory_pressure_stall_seconds_total",
            &some
        )
        .is_some());
    }
    // The prometheus crate's process collector.
    assert!(value(&s, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
}

#[tokio::test]
async fn collectors_report_which_sources_are_up() {
    let _turn = TURN.lock().await;
    let s = scrape_with("candela_collector_up").await;
    assert_eq!(
        value(&s, "candela_collector_up", &[("source", "meminfo")]),
        Some(1.0)
    );
    // The CPU build runs on machines without an NVIDIA GPU; the cuda build needs one.
    let want_nvml = if cfg!(feature = "cuda") { 1.0 } else { 0.0 };
    assert_eq!(
        value(&s, "candela_collector_up", &[("source", "nvml")]),
        Some(want_nvml)
    );
}

/// The PromQL of every panel of the Grafana dashboard.
fn dashboard_exprs() -> Vec<String> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana/candela.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&d, &mut exprs);
    assert!(exprs.len() >= 10, "dashboard has {} queries", exprs.len());
    exprs
}

/// Every `candela_*` / `process_*` name in the dashboard's queries.
fn dashboard_metric_names() -> BTreeSet<String> {
    let exprs = dashboard_exprs();
    let mut names = BTreeSet::new();
    for e in exprs {
        for prefix in ["candela_", "process_"] {
            let mut rest = e.as_str();
            while let Some(i) = rest.find(prefix) {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    names
}

#[tokio::test]
async fn dashboard_queries_only_existing_metrics() {
    let _turn = TURN.lock().await;
    completion("Hello", 3).await;
    let s = scrape_with("candela_host_memory_total_bytes").await;
    let have = sample_names(&s);
    let nvml_up = value(&s, "candela_collector_up", &[("source", "nvml")]) == Some(1.0);
    let names = dashboard_metric_names();
    assert!(names.contains("candela_generated_tokens_total"));
    for n in &names {
        // Histogram series are queried as `_bucket`; its family must be a histogram.
        if let Some(base) = n.strip_suffix("_bucket") {
            assert!(
                s.contains(&format!("# TYPE {base} histogram")),
                "{base} is not a histogram"
            );
        }
        // Per-GPU gauges exist only where a GPU was read.
        if !nvml_up && candela::metrics::probes::GPU_METRICS.contains(&n.as_str()) {
            continue;
        }
        assert!(have.contains(n), "dashboard queries {n}, not in /metrics");
    }
}

fn promtool_skipped() -> bool {
    let skip = std::env::var_os("CANDELA_SKIP_PROMTOOL").is_some();
    if skip {
        eprintln!("CANDELA_SKIP_PROMTOOL set: promtool check skipped");
    }
    skip
}

/// Run promtool with `input` on stdin; its exit status and everything it printed.
fn promtool(args: &[&str], input: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool not found: apt-get install -y prometheus (or set CANDELA_SKIP_PROMTOOL=1)",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// Every dashboard query is valid PromQL: promtool parses them as recording rules
/// (Grafana's `$__rate_interval` and `$job` replaced by plain values).
#[test]
fn dashboard_queries_are_valid_promql() {
    if promtool_skipped() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yml");
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        let e = e.replace("$__rate_interval", "1m").replace("$job", ".*");
        let e = serde_json::to_string(&e).unwrap();
        rules.push_str(&format!("  - record: dashboard:q{i}\n    expr: {e}\n"));
    }
    std::fs::write(&path, rules).unwrap();
    let (ok, report) = promtool(&["check", "rules", path.to_str().unwrap()], "");
    assert!(ok, "promtool check rules:\n{report}");
}

/// A real scrape (after traffic) passes `promtool check metrics`: valid exposition
/// format and Prometheus naming conventions. CI installs promtool (Debian package
/// `prometheus`); set `CANDELA_SKIP_PROMTOOL=1` to skip where it is not installed.
#[tokio::test]
async fn scrape_passes_promtool_check_metrics() {
    if promtool_skipped() {
        return;
    }
    let _turn = TURN.lock().await;
    completion("Hello", 3).await;
    let s = scrape_with("candela_host_memory_total_bytes").await;
    let (ok, report) = promtool(&["check", "metrics"], &s);
    assert!(ok, "promtool check metrics:\n{report}");
    assert!(
        report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

/// A chunked request (no Content-Length) is counted as the handler reads it.
#[tokio::test]
async fn chunked_request_bytes_are_counted() {
    let _turn = TURN.lock().await;
    let peer = [("peer", "loopback")];
    let parts: Vec<&'static [u8]> = vec![b"{\"content\": ", b"\"Hello, chunked ", b"world\"}"];
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let stream = futures::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
    let before = scrape().await;
    let r = reqwest::Client::new()
        .post(format!("{}/tokenize", common::server()))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let after = scrape().await;
    let delta = value(&after, "candela_http_request_bytes_total", &peer).unwrap()
        - value(&before, "candela_http_request_bytes_total", &peer).unwrap_or(0.0);
    assert_eq!(delta, len as f64);
}

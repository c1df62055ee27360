//! A real Prometheus server (Debian's `prometheus`, installed by `.ci/run`) scrapes a
//! real candela on loopback, and its query API returns candela's series.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_candela() {
    let base = common::server();
    let target = base.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: candela\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom =
        Command::new(std::env::var("CANDELA_PROMETHEUS").unwrap_or_else(|_| "prometheus".into()))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (apt-get install -y prometheus)");
    let _guard = Kill(prom);
    let c = reqwest::Client::new();
    let _ = c
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await;
    let t0 = Instant::now();
    loop {
        let q = format!("http://127.0.0.1:{port}/api/v1/query?query=candela_build_info");
        if let Ok(r) = c.get(&q).send().await {
            if let Ok(v) = r.json::<Value>().await {
                let res = &v["data"]["result"];
                if res.as_array().is_some_and(|a| !a.is_empty()) {
                    assert_eq!(res[0]["metric"]["job"], "candela");
                    assert_eq!(res[0]["value"][1], "1");
                    break;
                }
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "Prometheus never returned candela's series"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And `up` says the scrape itself succeeds.
    let v: Value = c
        .get(format!(
            "http://127.0.0.1:{port}/api/v1/query?query=up{{job=\"candela\"}}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{v}");
}

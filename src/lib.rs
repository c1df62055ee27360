//! candela: a local OpenAI-compatible LLM server on candle, with per-session KV caches
//! and Prometheus metrics.
//!
//! Module dependencies run one way: `api → engine → kv`; `metrics` is a leaf anyone
//! may call.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod kv;
pub mod metrics;

use std::net::SocketAddr;

use tokio::net::TcpListener;

pub use config::Config;
pub use error::Error;

use engine::{Engine, EngineConfig};

/// The server: listener bound, one engine per configured model started (loading in
/// the background).
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    engines: Vec<Engine>,
}

impl App {
    /// Bind the listener and start the engine thread. `/health` answers 503 until the
    /// model is loaded.
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let mut served: Vec<api::models::Served> = Vec::new();
        for (i, spec) in cfg.models.iter().enumerate() {
            let id = engine::fetch::served_id(spec);
            if served.iter().any(|s| s.id == id) {
                return Err(Error::Config(format!(
                    "model `{id}` is configured twice (models: {:?})",
                    cfg.models
                )));
            }
            let engine = Engine::start(engine_config(&cfg, i));
            served.push(api::models::Served { id, engine });
        }
        let engines: Vec<Engine> = served.iter().map(|s| s.engine.clone()).collect();
        let models = api::models::Models::new(served)
            .ok_or_else(|| Error::Config("no model configured".into()))?;
        let listener = TcpListener::bind((cfg.host.as_str(), cfg.port)).await?;
        // Host/GPU probes sample in the background so a scrape never waits on them.
        metrics::probes::start(metrics::probes::DEFAULT_INTERVAL)?;
        if !cfg.api_keys.is_empty() {
            tracing::info!(keys = cfg.api_keys.len(), "API keys required on /v1");
        } else if !is_loopback(&cfg.host) {
            tracing::warn!(host = %cfg.host, "listening beyond this machine without an API key: anyone who can reach it can use it (set --api-key)");
        }
        let router = api::router(api::AppState {
            models,
            auth: std::sync::Arc::new(api::auth::Auth::new(&cfg.api_keys, cfg.metrics_auth)),
            limiter: api::limits::Limiter::new(cfg.max_concurrent_per_key),
            stream_idle_timeout: (cfg.stream_idle_timeout > 0)
                .then(|| std::time::Duration::from_secs(cfg.stream_idle_timeout)),
        });
        Ok(Self {
            listener,
            router,
            engines,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// The default (first) model's engine.
    pub fn engine(&self) -> &Engine {
        // `build` refuses an empty model list.
        &self.engines[0]
    }

    /// Every model's engine, in configuration order.
    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    /// Wait until every model is loaded (or the first failure).
    pub async fn wait_ready(&self) -> Result<(), Error> {
        for e in &self.engines {
            e.wait_ready().await?;
        }
        Ok(())
    }

    /// Serve until Ctrl-C / SIGTERM, or until the model fails to load.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(shutdown_signal()).await
    }

    /// Serve until `stop` resolves (or the model fails to load): stop accepting, let
    /// in-flight requests finish, then write the idle sessions to the spill dir so they
    /// survive a restart.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let engines = self.engines.clone();
        let failed = async move {
            // Any model failing to load stops the server, as a single one always did.
            let (tx, mut rx) = tokio::sync::mpsc::channel(engines.len());
            for engine in engines {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = engine.wait_ready().await {
                        let _ = tx.send(e).await;
                    }
                });
            }
            drop(tx);
            match rx.recv().await {
                Some(e) => Error::Engine(e),
                None => std::future::pending::<Error>().await,
            }
        };
        use axum::serve::ListenerExt;
        let listener = self.listener.tap_io(tune_connection);
        let server = axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop);
        let result = tokio::select! {
            r = server => r.map_err(Error::Io),
            e = failed => return Err(e),
        };
        let engines = self.engines.clone();
        let mut n = 0;
        for e in &engines {
            n += e.spill_all().await;
        }
        tracing::info!(sessions = n, "sessions spilled; bye");
        result
    }
}

/// Kernel send buffer per connection. Linux grows it up to 4 MiB by default (and a
/// loopback segment is 64 KiB), which would let a client that stopped reading park
/// megabytes of a stream in the kernel before back-pressure reaches the generation;
/// token streams need far less.
const SEND_BUFFER: usize = 256 << 10;

/// Per accepted connection: no Nagle delay on small SSE chunks, a bounded send buffer.
fn tune_connection(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    if let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(SEND_BUFFER) {
        tracing::debug!("SO_SNDBUF: {e}");
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The engine settings of the `index`-th configured model. With several models the KV
/// budgets (memory and disk) are split evenly between them, so the configured totals
/// hold; the first model spills into `kv_spill_dir` itself (a single-model setup is
/// unchanged), every other model into `kv_spill_dir/<model id>`, so that sessions of
/// the same name never share a file.
pub fn engine_config(cfg: &Config, index: usize) -> EngineConfig {
    let n = cfg.models.len().max(1);
    let spec = cfg.models.get(index).cloned().unwrap_or_default();
    let kv_spill_dir = if index == 0 {
        cfg.kv_spill_dir.clone()
    } else {
        let id = engine::fetch::served_id(&spec);
        let safe: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        // Never `.` or `..`: a leading dot gets an underscore before it.
        let safe = if safe.starts_with('.') {
            format!("_{safe}")
        } else {
            safe
        };
        cfg.kv_spill_dir.join(safe)
    };
    EngineConfig {
        model: spec,
        data_dir: cfg.data_dir.clone(),
        ctx_size: cfg.ctx_size,
        threads: cfg.threads,
        queue_size: cfg.queue_size,
        max_batch: cfg.max_batch,
        kv_budget: cfg.kv_budget / n,
        kv_device_budget: cfg.kv_device_budget.split(n),
        kv_dtype: cfg.kv_dtype,
        kv_spill_dir,
        kv_disk_budget: cfg.kv_disk_budget / n as u64,
        kv_shared: cfg.kv_shared,
        device: cfg.device.clone(),
        kv_min_free: cfg.kv_min_free,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}

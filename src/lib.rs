//! candela: a local OpenAI-compatible LLM server on candle, with per-session KV caches
//! and Prometheus metrics.
//!
//! Module dependencies run one way: `api → engine → kv`; `metrics` is a leaf anyone
//! may call.

pub mod api;
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

/// The server: listener bound, engine started (loading in the background).
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    engine: Engine,
}

impl App {
    /// Bind the listener and start the engine thread. `/health` answers 503 until the
    /// model is loaded.
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let engine = Engine::start(engine_config(&cfg));
        let listener = TcpListener::bind((cfg.host.as_str(), cfg.port)).await?;
        // Host/GPU probes sample in the background so a scrape never waits on them.
        metrics::probes::start(metrics::probes::DEFAULT_INTERVAL)?;
        if !cfg.api_keys.is_empty() {
            tracing::info!(keys = cfg.api_keys.len(), "API keys required on /v1");
        } else if !is_loopback(&cfg.host) {
            tracing::warn!(host = %cfg.host, "listening beyond this machine without an API key: anyone who can reach it can use it (set --api-key)");
        }
        let router = api::router(api::AppState {
            engine: engine.clone(),
            auth: std::sync::Arc::new(api::auth::Auth::new(&cfg.api_keys, cfg.metrics_auth)),
            limiter: api::limits::Limiter::new(cfg.max_concurrent_per_key),
        });
        Ok(Self {
            listener,
            router,
            engine,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
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
        let engine = self.engine.clone();
        let failed = async move {
            match engine.wait_ready().await {
                Ok(_) => std::future::pending::<Error>().await,
                Err(e) => Error::Engine(e),
            }
        };
        let server = axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop);
        let result = tokio::select! {
            r = server => r.map_err(Error::Io),
            e = failed => return Err(e),
        };
        let engine = self.engine.clone();
        let n = tokio::task::spawn_blocking(move || engine.spill_all())
            .await
            .unwrap_or(0);
        tracing::info!(sessions = n, "sessions spilled; bye");
        result
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

pub fn engine_config(cfg: &Config) -> EngineConfig {
    EngineConfig {
        model: cfg.model.clone(),
        data_dir: cfg.data_dir.clone(),
        ctx_size: cfg.ctx_size,
        threads: cfg.threads,
        queue_size: cfg.queue_size,
        max_batch: cfg.max_batch,
        kv_budget: cfg.kv_budget,
        kv_dtype: cfg.kv_dtype,
        kv_spill_dir: cfg.kv_spill_dir.clone(),
        kv_disk_budget: cfg.kv_disk_budget,
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

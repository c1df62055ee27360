//! Prometheus metrics: one registry, every metric name in this module, helpers that
//! any layer calls to record an event. Labels are bounded (endpoint, status class,
//! finish reason, configured model): never a session id, request id or raw path.
//!
//! With several models, per-model series carry a `model` label (token counters,
//! running/waiting, weights, context); the worker thread of each model says which
//! model it serves once ([`bind_model`]), so its events are labelled without passing
//! the name through every call. KV gauges are sums over the models' stores.
//!
//! Reads only plain stat structs of other modules (e.g. `kv::store::StoreStats`).
//! Host and GPU probes live in [`probes`].

#[cfg(target_os = "macos")]
mod apple;
mod kv;
pub mod probes;

pub use kv::{
    layout as kv_layout, lookup as kv_lookup, session_tokens as kv_session_tokens,
    shared_event as kv_shared_event, store as kv_store,
    write_behind_seconds as kv_write_behind_seconds,
};

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    finish: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    cancelled: IntCounter,
    stream_idle: IntCounter,
    ttft: Histogram,
    itl: Histogram,
    queue_wait: Histogram,
    prefill: Histogram,
    decode_step: HistogramVec,
    constraint_mask: Histogram,
    request_duration: HistogramVec,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    model_info: IntGaugeVec,
    model_weight_bytes: IntGaugeVec,
    model_ctx: IntGaugeVec,
    http_request_bytes: IntCounterVec,
    http_response_bytes: IntCounterVec,
    probes: probes::ProbeMetrics,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

fn build() -> prometheus::Result<Metrics> {
    let r = Registry::new();
    let hist = |name: &str, help: &str| -> prometheus::Result<Histogram> {
        let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))?;
        r.register(Box::new(h.clone()))?;
        Ok(h)
    };
    let m = Metrics {
        requests: IntCounterVec::new(
            Opts::new(
                "candela_http_requests_total",
                "HTTP requests by endpoint and status code",
            ),
            &["endpoint", "status"],
        )?,
        finish: IntCounterVec::new(
            Opts::new(
                "candela_request_finish_total",
                "Finished generations by finish reason",
            ),
            &["reason"],
        )?,
        prompt_tokens: IntCounterVec::new(
            Opts::new(
                "candela_prompt_tokens_total",
                "Prompt tokens of finished generations, by model",
            ),
            &["model"],
        )?,
        generated_tokens: IntCounterVec::new(
            Opts::new(
                "candela_generated_tokens_total",
                "Generated tokens, by model",
            ),
            &["model"],
        )?,
        cancelled: IntCounter::new(
            "candela_requests_cancelled_total",
            "Generations stopped because the client went away",
        )?,
        stream_idle: IntCounter::new(
            "candela_stream_idle_timeouts_total",
            "Streams cut because the client left its events unread past --stream-idle-timeout",
        )?,
        ttft: hist(
            "candela_time_to_first_token_seconds",
            "Time from enqueue to first token",
        )?,
        itl: hist(
            "candela_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream",
        )?,
        queue_wait: hist(
            "candela_queue_wait_seconds",
            "Time a request waited before the worker took it",
        )?,
        prefill: hist(
            "candela_prefill_seconds",
            "Duration of one prefill forward pass",
        )?,
        constraint_mask: {
            let h = Histogram::with_opts(
                HistogramOpts::new(
                    "candela_constraint_mask_seconds",
                    "Time to compute one token mask for grammar-constrained decoding",
                )
                .buckets(vec![
                    0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1,
                ]),
            )?;
            r.register(Box::new(h.clone()))?;
            h
        },
        decode_step: HistogramVec::new(
            HistogramOpts::new(
                "candela_decode_step_seconds",
                "Duration of one batched decode step",
            )
            .buckets(latency_buckets()),
            &["batch"],
        )?,
        request_duration: HistogramVec::new(
            HistogramOpts::new("candela_request_duration_seconds", "HTTP request duration")
                .buckets(latency_buckets()),
            &["endpoint"],
        )?,
        running: IntGaugeVec::new(
            Opts::new(
                "candela_requests_running",
                "Sequences live in the engine, by model",
            ),
            &["model"],
        )?,
        waiting: IntGaugeVec::new(
            Opts::new(
                "candela_requests_waiting",
                "Requests queued for the engine, by model",
            ),
            &["model"],
        )?,
        model_info: IntGaugeVec::new(
            Opts::new("candela_model_info", "The loaded model (value 1)"),
            &["model", "arch"],
        )?,
        model_weight_bytes: IntGaugeVec::new(
            Opts::new("candela_model_weight_bytes", "Bytes of model weights"),
            &["model"],
        )?,
        model_ctx: IntGaugeVec::new(
            Opts::new("candela_model_context_tokens", "Context size in tokens"),
            &["model"],
        )?,
        http_request_bytes: IntCounterVec::new(
            Opts::new(
                "candela_http_request_bytes_total",
                "HTTP request body bytes by peer class (loopback|lan|internet|unknown)",
            ),
            &["peer"],
        )?,
        http_response_bytes: IntCounterVec::new(
            Opts::new(
                "candela_http_response_bytes_total",
                "HTTP response body bytes by peer class (loopback|lan|internet|unknown)",
            ),
            &["peer"],
        )?,
        probes: probes::ProbeMetrics::register(&r)?,
        registry: r,
    };
    let build_info = IntGaugeVec::new(
        Opts::new("candela_build_info", "Build information (value 1)"),
        &["version"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    for c in [
        Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(m.finish.clone()),
        Box::new(m.prompt_tokens.clone()),
        Box::new(m.generated_tokens.clone()),
        Box::new(m.cancelled.clone()),
        Box::new(m.stream_idle.clone()),
        Box::new(m.decode_step.clone()),
        Box::new(m.request_duration.clone()),
        Box::new(m.running.clone()),
        Box::new(m.waiting.clone()),
        Box::new(m.model_info.clone()),
        Box::new(m.model_weight_bytes.clone()),
        Box::new(m.model_ctx.clone()),
        Box::new(m.http_request_bytes.clone()),
        Box::new(m.http_response_bytes.clone()),
        Box::new(build_info),
    ] {
        m.registry.register(c)?;
    }
    // Standard process_* metrics (RSS, CPU seconds, open fds, threads).
    #[cfg(target_os = "linux")]
    m.registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(m)
}

/// The process-wide metrics. Registration of fixed, distinct names cannot fail; if it
/// somehow did, that is a programming error found by the first test.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    // Start-up code: the names and labels are constants, so registration fails only on
    // a programming error, which the first test run shows.
    #[allow(clippy::expect_used)]
    M.get_or_init(|| build().expect("metric registration"))
}

/// Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    let enc = TextEncoder::new();
    if let Err(e) = enc.encode(&get().registry.gather(), &mut buf) {
        tracing::error!("metrics encoding failed: {e}");
    }
    String::from_utf8(buf).unwrap_or_default()
}

pub fn http_request(endpoint: &str, status: u16, dur: Duration) {
    let m = get();
    m.requests
        .with_label_values(&[endpoint, &status.to_string()])
        .inc();
    m.request_duration
        .with_label_values(&[endpoint])
        .observe(dur.as_secs_f64());
}

/// Request body bytes from one peer class (see `api::net`).
pub fn http_request_bytes(peer: &str, n: u64) {
    get()
        .http_request_bytes
        .with_label_values(&[peer])
        .inc_by(n);
}

/// The response-bytes counter of one peer class, for a body wrapper to advance per
/// chunk without a label lookup each time.
pub fn http_response_bytes(peer: &str) -> IntCounter {
    get().http_response_bytes.with_label_values(&[peer])
}

thread_local! {
    static MODEL: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Called once by a model's worker thread: later events recorded on this thread carry
/// `model="<id>"`. The ids are the configured models' names, so the label stays bounded.
pub fn bind_model(id: &str) {
    MODEL.with(|m| *m.borrow_mut() = id.to_string());
}

fn model_label() -> String {
    MODEL.with(|m| m.borrow().clone())
}

pub fn model_loaded(id: &str, arch: &str, weight_bytes: usize, ctx: usize) {
    let m = get();
    m.model_info.with_label_values(&[id, arch]).set(1);
    m.model_weight_bytes
        .with_label_values(&[id])
        .set(weight_bytes as i64);
    m.model_ctx.with_label_values(&[id]).set(ctx as i64);
    // Series exist (at 0) from the start, so rates and sums need no special case.
    m.prompt_tokens.with_label_values(&[id]);
    m.generated_tokens.with_label_values(&[id]);
    m.running.with_label_values(&[id]).set(0);
    m.waiting.with_label_values(&[id]).set(0);
}

/// Live and queued sequences of the calling worker's model.
pub fn set_running(running: usize, waiting: usize) {
    let model = model_label();
    get()
        .running
        .with_label_values(&[&model])
        .set(running as i64);
    get()
        .waiting
        .with_label_values(&[&model])
        .set(waiting as i64);
}

pub fn observe_queue_wait(d: Duration) {
    get().queue_wait.observe(d.as_secs_f64());
}

pub fn observe_prefill(_tokens: usize, d: Duration) {
    get().prefill.observe(d.as_secs_f64());
}

/// Batch sizes are bucketed so the label stays bounded.
pub fn observe_decode_step(batch: usize, d: Duration) {
    let b = match batch {
        1 => "1",
        2..=4 => "2-4",
        5..=8 => "5-8",
        _ => "9+",
    };
    get()
        .decode_step
        .with_label_values(&[b])
        .observe(d.as_secs_f64());
}

pub fn observe_constraint_mask(d: Duration) {
    get().constraint_mask.observe(d.as_secs_f64());
}

pub fn observe_ttft(d: Duration) {
    get().ttft.observe(d.as_secs_f64());
}

pub fn observe_itl(d: Duration) {
    get().itl.observe(d.as_secs_f64());
}

pub fn cancelled() {
    get().cancelled.inc();
}

pub fn stream_idle_timeout() {
    get().stream_idle.inc();
}

pub fn finished(reason: &str, prompt_tokens: usize, completion_tokens: usize) {
    let m = get();
    m.finish.with_label_values(&[reason]).inc();
    let model = model_label();
    m.prompt_tokens
        .with_label_values(&[&model])
        .inc_by(prompt_tokens as u64);
    m.generated_tokens
        .with_label_values(&[&model])
        .inc_by(completion_tokens as u64);
}

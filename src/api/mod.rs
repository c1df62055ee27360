//! HTTP layer: the axum router, OpenAI-compatible handlers, Anthropic's Messages API
//! (`anthropic`), SSE, and the single place where errors are mapped to HTTP (`error`). Talks to the model only through
//! [`crate::engine::Engine`].

pub mod anthropic;
pub mod auth;
pub mod error;
mod generate;
pub mod limits;
mod misc;
pub mod models;
pub mod net;
pub mod openapi;
mod responses;
mod sessions;
pub mod tools;
pub mod types;
pub mod validate;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::metrics;

/// Route paths, in one place.
pub mod routes {
    pub const CHAT: &str = "/v1/chat/completions";
    pub const COMPLETIONS: &str = "/v1/completions";
    pub const MESSAGES: &str = "/v1/messages";
    pub const COUNT_TOKENS: &str = "/v1/messages/count_tokens";
    pub const MODELS: &str = "/v1/models";
    pub const MODEL: &str = "/v1/models/{id}";
    pub const HEALTH: &str = "/health";
    pub const TOKENIZE: &str = "/tokenize";
    pub const DETOKENIZE: &str = "/detokenize";
    pub const METRICS: &str = "/metrics";
    pub const DASHBOARD: &str = "/dashboard";
    pub const SESSIONS: &str = "/v1/sessions";
    pub const SESSION: &str = "/v1/sessions/{id}";
    pub const OPENAPI: &str = "/openapi.json";
    pub const RESPONSES: &str = "/v1/responses";
    pub const RESPONSE: &str = "/v1/responses/{id}";

    /// Every route, for the OpenAPI coverage test.
    pub const ALL: &[&str] = &[
        CHAT,
        COMPLETIONS,
        MESSAGES,
        COUNT_TOKENS,
        MODELS,
        MODEL,
        HEALTH,
        TOKENIZE,
        DETOKENIZE,
        METRICS,
        DASHBOARD,
        SESSIONS,
        SESSION,
        OPENAPI,
        RESPONSES,
        RESPONSE,
    ];
}

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    /// The served models; a request picks one by its `model` field.
    pub models: models::Models,
    pub auth: std::sync::Arc<auth::Auth>,
    pub limiter: std::sync::Arc<limits::Limiter>,
    /// A stream whose events sit unread this long is cut and its generation cancelled.
    pub stream_idle_timeout: Option<std::time::Duration>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(routes::CHAT, post(generate::chat))
        .route(routes::COMPLETIONS, post(generate::completions))
        .route(routes::MESSAGES, post(anthropic::messages))
        .route(routes::COUNT_TOKENS, post(anthropic::count_tokens))
        .route(routes::RESPONSES, post(responses::create))
        .route(
            routes::RESPONSE,
            get(responses::get).delete(responses::delete),
        )
        .route(routes::MODELS, get(misc::models))
        .route(routes::MODEL, get(misc::model))
        .route(routes::HEALTH, get(misc::health))
        .route(routes::TOKENIZE, post(misc::tokenize))
        .route(routes::DETOKENIZE, post(misc::detokenize))
        .route(routes::METRICS, get(misc::metrics))
        .route(routes::DASHBOARD, get(misc::dashboard))
        .route(routes::OPENAPI, get(misc::openapi))
        .route(routes::SESSIONS, get(sessions::list))
        .route(
            routes::SESSION,
            get(sessions::get)
                .delete(sessions::delete)
                .patch(sessions::patch),
        )
        .fallback(misc::not_found)
        .method_not_allowed_fallback(misc::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(net::refuse_oversize))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn(net::count_bytes))
        .with_state(state)
}

/// Count every request by route template (bounded) and status.
async fn track(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".to_string());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    metrics::http_request(&endpoint, resp.status().as_u16(), t0.elapsed());
    resp
}

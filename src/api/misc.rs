//! Small endpoints: models, health, tokenize/detokenize, metrics, fallbacks.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::engine::EngineState;
use crate::metrics;

use super::error::{ApiError, Json, Shape};
use super::types::{
    DetokenizeRequest, DetokenizeResponse, Health, ModelCard, ModelList, TokenEntry,
    TokenizeRequest, TokenizeResponse,
};
use super::{validate, AppState};

fn card(info: &crate::engine::ModelInfo) -> ModelCard {
    ModelCard {
        id: info.id.clone(),
        object: "model",
        created: info.created,
        owned_by: "candela",
        context_length: info.ctx_size,
    }
}

/// Every configured model, the default first. A model still loading is left out until
/// it is ready; while none is, the answer is 503 like `/health`'s.
pub async fn models(State(st): State<AppState>) -> Result<axum::Json<ModelList>, ApiError> {
    let data: Vec<ModelCard> = st
        .models
        .all()
        .iter()
        .filter_map(|s| s.engine.loaded().ok())
        .map(|l| card(&l.info))
        .collect();
    if data.is_empty() {
        st.models.first().engine.loaded()?;
    }
    Ok(axum::Json(ModelList {
        object: "list",
        data,
    }))
}

pub async fn model(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<ModelCard>, ApiError> {
    let loaded = st.models.pick(Some(&id))?.engine.loaded()?;
    Ok(axum::Json(card(&loaded.info)))
}

/// 200 once every configured model is loaded; 503 while one loads or if one failed.
pub async fn health(State(st): State<AppState>) -> Response {
    let mut ids = Vec::new();
    for s in st.models.all() {
        match s.engine.state() {
            EngineState::Ready(l) => ids.push(l.info.id.clone()),
            EngineState::Loading => {
                return ApiError::from(crate::engine::EngineError::Loading).into_response()
            }
            EngineState::Failed(e) => {
                return ApiError::from(crate::engine::EngineError::Unavailable(e)).into_response()
            }
        }
    }
    axum::Json(Health {
        status: "ok",
        model: ids.first().cloned(),
        models: ids,
    })
    .into_response()
}

/// Text, or a chat rendered by the model's template, to token ids (on the blocking
/// pool: rendering and tokenizing a long input is CPU work).
pub async fn tokenize(
    State(st): State<AppState>,
    Json(req): Json<TokenizeRequest>,
) -> Result<axum::Json<TokenizeResponse>, ApiError> {
    let loaded = st.models.pick(req.model.as_deref())?.engine.loaded()?;
    validate::off_executor(move || {
        let text = match (&req.content, &req.messages) {
            (Some(c), None) => c.clone(),
            (None, Some(m)) => {
                loaded
                    .template
                    .render(&validate::template_messages(m)?, None, true)?
            }
            _ => {
                return Err(ApiError::invalid(
                    "content",
                    "give exactly one of `content` or `messages`",
                ))
            }
        };
        let ids = loaded.tok.encode(&text, req.add_special.unwrap_or(false))?;
        let tokens = if req.with_pieces.unwrap_or(false) {
            ids.iter()
                .map(|&id| TokenEntry::Piece {
                    id,
                    piece: loaded.tok.decode(&[id], true).unwrap_or_default(),
                })
                .collect()
        } else {
            ids.iter().map(|&id| TokenEntry::Id(id)).collect()
        };
        Ok(axum::Json(TokenizeResponse {
            tokens,
            count: ids.len(),
        }))
    })
    .await
}

/// Token ids to text (on the blocking pool, as `tokenize`).
pub async fn detokenize(
    State(st): State<AppState>,
    Json(req): Json<DetokenizeRequest>,
) -> Result<axum::Json<DetokenizeResponse>, ApiError> {
    let loaded = st.models.pick(req.model.as_deref())?.engine.loaded()?;
    if let Some(bad) = req
        .tokens
        .iter()
        .find(|&&t| t as usize >= loaded.info.vocab_size)
    {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "token id {bad} is out of range (vocabulary has {} ids)",
                loaded.info.vocab_size
            ),
        ));
    }
    validate::off_executor(move || {
        let content = loaded.tok.decode(&req.tokens, true)?;
        Ok(axum::Json(DetokenizeResponse { content }))
    })
    .await
}

pub async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
        .into_response()
}

/// The OpenAPI document (see `openapi`).
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
        .into_response()
}

/// A live page of the vitals, drawn in the browser from `/metrics` (no CDN).
pub async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!("no route for {}", uri.path()))
        .into_shaped(Shape::of_path(uri.path()))
}

pub async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "method not allowed on this route".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
    .into_shaped(Shape::of_path(uri.path()))
}

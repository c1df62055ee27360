//! Sessions API: list, inspect, delete and pin the per-session KV caches.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, Json};
use super::AppState;

pub async fn list(State(st): State<AppState>) -> Response {
    let data = st.engine.list_sessions();
    let stats = st.engine.kv_stats();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "resident_bytes": stats.resident_bytes,
        "budget_bytes": stats.budget_bytes,
    }))
    .into_response()
}

pub async fn get(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(st.engine.session(&id)?).into_response())
}

pub async fn delete(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.engine.delete_session(&id)?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({"id": id, "object": "session", "deleted": true})),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct Patch {
    /// Pinned sessions are never evicted to make room.
    pub pinned: bool,
}

pub async fn patch(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(p): Json<Patch>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(st.engine.pin_session(&id, p.pinned)?).into_response())
}

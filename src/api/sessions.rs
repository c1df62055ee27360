//! Sessions API: list, inspect, delete and pin the per-session KV caches.

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::Principal;
use super::error::{ApiError, Json};
use super::AppState;

pub async fn list(State(st): State<AppState>, Extension(who): Extension<Principal>) -> Response {
    // Each key sees only its own sessions, under the ids it chose.
    let data: Vec<_> = st
        .engine
        .list_sessions()
        .into_iter()
        .filter_map(|mut s| {
            let id = who.unscope(&s.id)?.to_string();
            s.id = id;
            Some(s)
        })
        .collect();
    let stats = st.engine.kv_stats();
    let (dtype, per_token) = match st.engine.loaded() {
        Ok(l) => (
            Some(l.info.kv_dtype.name()),
            Some(l.info.kv_bytes_per_token),
        ),
        Err(_) => (None, None),
    };
    axum::Json(json!({
        "object": "list",
        "data": data,
        "resident_bytes": stats.resident_bytes,
        "budget_bytes": stats.budget_bytes,
        "kv_dtype": dtype,
        "kv_bytes_per_token": per_token,
    }))
    .into_response()
}

pub async fn get(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut s = st.engine.session(&who.scope(&id))?;
    s.id = id;
    Ok(axum::Json(s).into_response())
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.engine.delete_session(&who.scope(&id))?;
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
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Json(p): Json<Patch>,
) -> Result<Response, ApiError> {
    let mut s = st.engine.pin_session(&who.scope(&id), p.pinned)?;
    s.id = id;
    Ok(axum::Json(s).into_response())
}

//! Sessions API: list, inspect, delete and pin the per-session KV caches.
//!
//! Sessions belong to one model (each model has its own KV store): the same id may name
//! one session per model. Every entry carries its `model`. `?model=NAME` picks the
//! model; without it, listing covers every model, and the other calls act on the one
//! model that holds the id (400 naming `model` when several do).

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Principal;
use super::error::{ApiError, Json};
use super::models::Served;
use super::types::{Session, SessionDeleted, SessionList};
use super::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct Which {
    /// The model whose sessions are meant (default: every model for listing, the one
    /// holding the id otherwise).
    #[serde(default)]
    pub model: Option<String>,
}

/// A session as the API shows it: under the id its key chose, with its model.
fn with_model(s: crate::kv::store::SessionInfo, id: String, model: &str) -> Session {
    Session {
        id,
        model: model.to_string(),
        tokens: s.tokens,
        bytes: s.bytes,
        tier: s.tier.to_string(),
        busy: s.busy,
        pinned: s.pinned,
        created: s.created,
        last_used: s.last_used,
        hits: s.hits,
    }
}

pub async fn list(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(which): Query<Which>,
) -> Result<Response, ApiError> {
    let models: Vec<&Served> = match which.model.as_deref() {
        Some(m) => vec![st.models.pick(Some(m))?],
        None => st.models.all().iter().collect(),
    };
    let (mut data, mut resident, mut budget) = (Vec::new(), 0, 0);
    let (mut device, mut disk) = (None::<(usize, usize)>, (0u64, 0u64));
    for s in models {
        // Each key sees only its own sessions, under the ids it chose.
        for info in s.engine.list_sessions() {
            if let Some(id) = who.unscope(&info.id).map(str::to_string) {
                data.push(with_model(info, id, &s.id));
            }
        }
        let stats = s.engine.kv_stats();
        resident += stats.resident_bytes;
        budget += stats.budget_bytes;
        if stats.device_tier {
            let (b, l) = device.unwrap_or_default();
            device = Some((b + stats.device_bytes, l + stats.device_budget_bytes));
        }
        disk = (disk.0 + stats.disk_bytes, disk.1 + stats.disk_budget_bytes);
    }
    // The cache element type is one setting for every model; bytes per token are the
    // first (default) model's (each session's own model is named in its entry).
    let (dtype, per_token) = match st.models.first().engine.loaded() {
        Ok(l) => (
            Some(l.info.kv_dtype.name()),
            Some(l.info.kv_bytes_per_token),
        ),
        Err(_) => (None, None),
    };
    Ok(axum::Json(SessionList {
        object: "list".into(),
        data,
        resident_bytes: resident,
        budget_bytes: budget,
        device_bytes: device.map(|d| d.0),
        device_budget_bytes: device.map(|d| d.1),
        disk_bytes: disk.0,
        disk_budget_bytes: disk.1,
        kv_dtype: dtype.map(str::to_string),
        kv_bytes_per_token: per_token,
    })
    .into_response())
}

/// The model holding session `scoped` (see the module doc).
fn locate<'a>(st: &'a AppState, scoped: &str, which: &Which) -> Result<&'a Served, ApiError> {
    if let Some(m) = which.model.as_deref() {
        return st.models.pick(Some(m));
    }
    let holders: Vec<&Served> = st
        .models
        .all()
        .iter()
        .filter(|s| s.engine.session(scoped).is_ok())
        .collect();
    match holders.as_slice() {
        [one] => Ok(one),
        [] => Ok(st.models.first()), // its lookup gives the usual 404
        many => Err(ApiError::invalid(
            "model",
            format!(
                "session exists for several models ({}); add ?model=NAME",
                many.iter()
                    .map(|s| s.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

pub async fn get(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(which): Query<Which>,
) -> Result<Response, ApiError> {
    let scoped = who.scope(&id);
    let s = locate(&st, &scoped, &which)?;
    let info = s.engine.session(&scoped)?;
    Ok(axum::Json(with_model(info, id, &s.id)).into_response())
}

pub async fn delete(
    State(st): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(which): Query<Which>,
) -> Result<Response, ApiError> {
    let scoped = who.scope(&id);
    let s = locate(&st, &scoped, &which)?;
    s.engine.delete_session(&scoped).await?;
    Ok((
        StatusCode::OK,
        axum::Json(SessionDeleted {
            id,
            object: "session".into(),
            model: s.id.clone(),
            deleted: true,
        }),
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
    Query(which): Query<Which>,
    Json(p): Json<Patch>,
) -> Result<Response, ApiError> {
    let scoped = who.scope(&id);
    let s = locate(&st, &scoped, &which)?;
    let info = s.engine.pin_session(&scoped, p.pinned).await?;
    Ok(axum::Json(with_model(info, id, &s.id)).into_response())
}

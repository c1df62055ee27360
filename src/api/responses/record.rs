//! Stored responses. A stored response is a note on the session it ran in (the engine
//! keeps notes with their session: in memory, spilled beside its cache, restored after
//! a restart, gone when the session is evicted or deleted), so a chain of responses
//! and its KV cache live and die together.
//!
//! A record holds the turn's own chat messages (its input and its output) and a link
//! to the response it continued; a turn given `previous_response_id` is that chain's
//! messages followed by its input, so the session's cached prefix covers all of it.
//! Deleting a response hides it (no GET, no chaining onto it) but keeps its messages
//! for the responses that continued it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{Engine, Notes};

use super::super::auth::Principal;
use super::super::error::ApiError;

/// What a session keeps of one response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The response this one continued.
    pub parent: Option<String>,
    /// This turn's chat messages: its input, then its output.
    pub messages: Vec<Value>,
    /// The response object as GET returns it; None once deleted.
    pub response: Option<Value>,
}

/// A stored response found for a caller.
pub struct Found {
    pub engine: Engine,
    /// The internal (scoped) id of the session it lives in.
    pub session: String,
    pub notes: Notes,
    pub record: Record,
}

fn not_found(id: &str, param: Option<&str>) -> ApiError {
    let mut e = ApiError::not_found(format!("No response found with id '{id}'."));
    e.param = param.map(str::to_string);
    e
}

/// The caller's stored, undeleted response `id` on one of `engines`. Another key's
/// response is not found, as an unknown one (ids don't leak).
pub async fn find(
    engines: impl IntoIterator<Item = Engine>,
    who: &Principal,
    id: &str,
    param: Option<&str>,
) -> Result<Found, ApiError> {
    for engine in engines {
        let Some((session, notes)) = engine.find_note(id).await? else {
            continue;
        };
        if who.unscope(&session).is_none() {
            break;
        }
        let record: Option<Record> = notes.get(id).and_then(|n| serde_json::from_str(n).ok());
        match record {
            Some(record) if record.response.is_some() => {
                return Ok(Found {
                    engine,
                    session,
                    notes,
                    record,
                })
            }
            _ => break,
        }
    }
    Err(not_found(id, param))
}

/// The chat messages of the conversation up to and including response `id`, oldest
/// first, from its session's notes.
pub fn chain(notes: &Notes, id: &str) -> Result<Vec<Value>, ApiError> {
    let mut turns: Vec<Vec<Value>> = Vec::new();
    let mut at = Some(id.to_string());
    while let Some(cur) = at {
        // A link may not lead back (a corrupt file): a chain has at most every note.
        if turns.len() > notes.len() {
            return Err(ApiError::internal(format!(
                "the stored conversation of '{id}' loops"
            )));
        }
        let record: Record = notes
            .get(&cur)
            .and_then(|n| serde_json::from_str(n).ok())
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "the stored conversation of '{id}' misses response '{cur}'"
                ))
            })?;
        turns.push(record.messages);
        at = record.parent;
    }
    Ok(turns.into_iter().rev().flatten().collect())
}

/// Store `record` as response `id` in `session`. False when the session is gone (it
/// was evicted without spilling, or deleted, while the response was generated).
pub async fn store(engine: &Engine, session: &str, id: &str, record: &Record) -> bool {
    let text = match serde_json::to_string(record) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(response = id, "could not encode a stored response: {e}");
            return false;
        }
    };
    match engine.put_note(session, id, text).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(response = id, "response not stored: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn note(parent: Option<&str>, text: &str) -> String {
        serde_json::to_string(&Record {
            parent: parent.map(str::to_string),
            messages: vec![json!({"role": "user", "content": text})],
            response: None,
        })
        .unwrap()
    }

    #[test]
    fn chains_follow_parents_and_branches_stay_apart() {
        let notes: Notes = [
            ("r1".to_string(), note(None, "a")),
            ("r2".to_string(), note(Some("r1"), "b")),
            ("r3".to_string(), note(Some("r2"), "c")),
            ("r2x".to_string(), note(Some("r1"), "x")),
        ]
        .into();
        let texts = |id| {
            chain(&notes, id)
                .unwrap()
                .iter()
                .map(|m| m["content"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(texts("r3"), ["a", "b", "c"]);
        assert_eq!(texts("r2x"), ["a", "x"]);
        let broken: Notes = [("r9".to_string(), note(Some("gone"), "z"))].into();
        assert!(chain(&broken, "r9").is_err());
        let looped: Notes = [
            ("p".to_string(), note(Some("q"), "1")),
            ("q".to_string(), note(Some("p"), "2")),
        ]
        .into();
        assert!(chain(&looped, "p").is_err());
    }
}

//! Which session a Messages request continues, from what clients already send, most
//! explicit first:
//!
//! 1. `X-Session-Id` (candela's own header, as on the OpenAI routes; a bad one is a 400);
//! 2. Claude Code's `X-Claude-Code-Session-Id` header, with `X-Claude-Code-Agent-Id`
//!    appended for a sub-agent (`<session>.<agent>`), so a sub-agent's conversation
//!    gets its own cache instead of cutting its parent's;
//! 3. `metadata.user_id`: Claude Code's forms name its session id (the JSON text
//!    `{"device_id": …, "session_id": …}`, or the older
//!    `user_<hash>_account_<uuid>_session_<uuid>`), and that id is the key, so every
//!    version of the client lands on the same session; any other value that is a valid
//!    session key is used whole.
//!
//! A value from 2 or 3 that is not a valid key (1-128 characters of `A-Z a-z 0-9 - _ .
//! : @`) is not an error: the request simply runs without a session.

use axum::http::HeaderMap;
use serde_json::Value;

use super::super::error::ApiError;
use super::super::validate;

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// `k` if it is a valid session key.
fn valid(k: &str) -> Option<String> {
    validate::session_key(Some(k), None).ok().flatten()
}

/// The session id in a `metadata.user_id`, or the whole value.
fn from_user_id(user_id: &str) -> Option<String> {
    if user_id.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(user_id).ok()?;
        return v.get("session_id").and_then(Value::as_str).and_then(valid);
    }
    if user_id.starts_with("user_") {
        if let Some((_, id)) = user_id.rsplit_once("_session_") {
            if let Some(k) = valid(id) {
                return Some(k);
            }
        }
    }
    valid(user_id)
}

/// The client's name for the session of this request (unscoped), if it gave one.
pub fn key(headers: &HeaderMap, body: &Value) -> Result<Option<String>, ApiError> {
    if let Some(k) = header(headers, "x-session-id") {
        return validate::session_key(Some(k), None).map_err(|_| {
            ApiError::invalid(
                "x-session-id",
                "X-Session-Id must be 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.', ':', '@'",
            )
        });
    }
    if let Some(s) = header(headers, "x-claude-code-session-id") {
        let k = match header(headers, "x-claude-code-agent-id") {
            Some(agent) => valid(&format!("{s}.{agent}")),
            None => valid(s),
        };
        if k.is_some() {
            return Ok(k);
        }
    }
    Ok(body
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .and_then(from_user_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const SID: &str = "57a121ec-f78c-48c3-a745-e3036a3ecc33";

    #[test]
    fn claude_code_forms_name_one_session() {
        let legacy = format!(
            "user_{}_account_{}_session_{SID}",
            "ab".repeat(32),
            "cd".repeat(18)
        );
        let as_json = format!(
            r#"{{"device_id":"{}","account_uuid":"","session_id":"{SID}"}}"#,
            "ef".repeat(32)
        );
        let none = HeaderMap::new();
        for uid in [legacy, as_json] {
            let body = json!({"metadata": {"user_id": uid}});
            assert_eq!(key(&none, &body).unwrap().as_deref(), Some(SID));
        }
        let h = headers(&[("x-claude-code-session-id", SID)]);
        assert_eq!(key(&h, &json!({})).unwrap().as_deref(), Some(SID));
        let h = headers(&[
            ("x-claude-code-session-id", SID),
            ("x-claude-code-agent-id", "a1b2"),
        ]);
        assert_eq!(key(&h, &json!({})).unwrap(), Some(format!("{SID}.a1b2")));
    }

    #[test]
    fn explicit_header_wins_and_odd_values_mean_no_session() {
        let h = headers(&[("x-session-id", "mine"), ("x-claude-code-session-id", SID)]);
        let body = json!({"metadata": {"user_id": "someone"}});
        assert_eq!(key(&h, &body).unwrap().as_deref(), Some("mine"));
        assert_eq!(
            key(&HeaderMap::new(), &body).unwrap().as_deref(),
            Some("someone")
        );
        let odd = json!({"metadata": {"user_id": "has spaces / and slashes"}});
        assert_eq!(key(&HeaderMap::new(), &odd).unwrap(), None);
        assert!(key(&headers(&[("x-session-id", "bad id")]), &odd).is_err());
    }
}

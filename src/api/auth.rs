//! API keys: Bearer auth (or Anthropic's `x-api-key` header) on the `/v1` routes (and
//! `/metrics` when configured), compared in constant time. Each key gets its own session namespace, so one client can neither
//! use, list, inspect nor delete another's sessions (they get 404, not 403: ids don't leak).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::error::{ApiError, Shape};
use super::AppState;

/// The configured keys (empty: no auth).
#[derive(Clone, Default)]
pub struct Auth {
    keys: Vec<Vec<u8>>,
    pub protect_metrics: bool,
}

/// Who is calling: the session namespace of their key ("" without auth).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal(pub String);

impl Principal {
    /// Internal session id for a client-chosen id.
    pub fn scope(&self, id: &str) -> String {
        if self.0.is_empty() {
            id.to_string()
        } else {
            format!("{}~{id}", self.0)
        }
    }

    /// The client-visible id of an internal one, if it belongs to this principal.
    pub fn unscope<'a>(&self, internal: &'a str) -> Option<&'a str> {
        if self.0.is_empty() {
            // Without auth nothing is scoped; ids with a namespace are not ours.
            (!internal.contains('~')).then_some(internal)
        } else {
            internal.strip_prefix(&self.0)?.strip_prefix('~')
        }
    }
}

/// Equal-time comparison: the time taken does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

impl Auth {
    pub fn new(keys: &[String], protect_metrics: bool) -> Self {
        Self {
            keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            protect_metrics,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The principal for an `Authorization` header value, if the key is valid.
    fn check(&self, header: Option<&str>) -> Option<Principal> {
        if !self.enabled() {
            return Some(Principal::default());
        }
        self.principal(header?.strip_prefix("Bearer ")?)
    }

    /// The principal for the key of an `x-api-key` header (Anthropic's clients).
    fn check_api_key(&self, header: Option<&str>) -> Option<Principal> {
        if !self.enabled() {
            return Some(Principal::default());
        }
        self.principal(header?)
    }

    fn principal(&self, key: &str) -> Option<Principal> {
        let token = key.trim().as_bytes();
        // Compare against every key so timing does not reveal which one matched.
        let mut found = None;
        for k in &self.keys {
            if ct_eq(k, token) && found.is_none() {
                found = Some(k);
            }
        }
        found.map(|k| Principal(hex::encode(&Sha256::digest(k)[..8])))
    }
}

fn unauthorized(shape: Shape) -> Response {
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message:
            "missing or invalid API key (send `Authorization: Bearer <key>` or `x-api-key: <key>`)"
                .into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_shaped(shape);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Middleware: `/v1/*` (and `/metrics` if configured) need a valid key; the principal is
/// attached to the request for the handlers.
pub async fn require_key(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let guarded = path.starts_with("/v1/")
        || path == "/tokenize"
        || path == "/detokenize"
        || (path == "/metrics" && st.auth.protect_metrics);
    let shape = Shape::of_path(path);
    // Either header may carry the key; one that is valid is enough.
    let who = {
        let text = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        st.auth.check(text(header::AUTHORIZATION)).or_else(|| {
            st.auth
                .check_api_key(text(header::HeaderName::from_static("x-api-key")))
        })
    };
    match who {
        Some(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        None if guarded => unauthorized(shape),
        None => {
            req.extensions_mut().insert(Principal::default());
            next.run(req).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn keys_map_to_distinct_namespaces() {
        let a = Auth::new(&["k1".into(), "k2".into()], false);
        let p1 = a.check(Some("Bearer k1")).unwrap();
        let p2 = a.check(Some("Bearer k2")).unwrap();
        assert_ne!(p1, p2);
        assert!(a.check(Some("Bearer k3")).is_none());
        assert!(a.check(Some("k1")).is_none());
        assert!(a.check(None).is_none());
        assert_eq!(a.check_api_key(Some("k1")), Some(p1.clone()));
        assert!(a.check_api_key(Some("Bearer k1")).is_none());
        assert!(a.check_api_key(Some("k3")).is_none());
        assert_eq!(p1.unscope(&p1.scope("s")), Some("s"));
        assert_eq!(p2.unscope(&p1.scope("s")), None);
        assert_eq!(Principal::default().unscope(&p1.scope("s")), None);
        // Without keys everyone is the same, unscoped principal.
        assert_eq!(Auth::default().check(None), Some(Principal::default()));
    }
}

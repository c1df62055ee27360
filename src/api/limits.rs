//! Per-key admission: at most `max_concurrent` generation requests in flight per API key
//! (per client when auth is off); more get 429 with `Retry-After` at once instead of
//! queueing behind everyone else. A permit is released when its response ends,
//! streamed or not, including when the client goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;

use super::auth::Principal;
use super::error::ApiError;

#[derive(Debug, Default)]
pub struct Limiter {
    max: usize,
    inflight: Mutex<HashMap<String, usize>>,
}

/// Held for the life of one generation request.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    who: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut m = self
            .limiter
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.who);
            }
        }
    }
}

impl Limiter {
    /// `max` 0 means unlimited.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    pub fn acquire(self: &Arc<Self>, who: &Principal) -> Result<Permit, ApiError> {
        let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(who.0.clone()).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "too many concurrent requests for this key (limit {}); retry when one finishes",
                    self.max
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("concurrency_limit"),
            });
        }
        *n += 1;
        Ok(Permit {
            limiter: self.clone(),
            who: who.0.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_per_principal_and_release_on_drop() {
        let l = Limiter::new(2);
        let a = Principal("a".into());
        let b = Principal("b".into());
        let p1 = l.acquire(&a).unwrap();
        let _p2 = l.acquire(&a).unwrap();
        let e = l.acquire(&a).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(l.acquire(&b).is_ok(), "another key is not affected");
        drop(p1);
        assert!(l.acquire(&a).is_ok());
        let unlimited = Limiter::new(0);
        let _v: Vec<_> = (0..100).map(|_| unlimited.acquire(&a).unwrap()).collect();
    }
}

//! Network bytes by peer class: a middleware that classifies the client address as
//! `loopback`, `lan` or `internet` (a bounded label, never the address itself) and
//! counts request and response body bytes.
//!
//! Request bytes come from `Content-Length`; a request without one (chunked) is counted
//! as its body is read, so bytes the handler never reads are not counted. Response
//! bytes come from `Content-Length` or the body's exact size; a body of unknown size
//! (SSE streams) is wrapped and every chunk handed to the connection is counted, so a
//! stream cut short counts what was sent. Headers are not counted.
//!
//! Also here: bodies declared larger than the limit are refused after they have been
//! read ([`refuse_oversize`]), so that the client gets its 413 rather than a broken pipe.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use futures::StreamExt;

use super::error::{AnthropicError, ApiError, Shape};
use super::MAX_BODY_BYTES;
use crate::metrics;

/// Peer class of a client address.
pub fn peer_class(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(v4) => class_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => class_v4(v4),
            None => class_v6(v6),
        },
    }
}

fn class_v4(ip: Ipv4Addr) -> &'static str {
    if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() || ip.is_link_local() {
        "lan"
    } else {
        "internet"
    }
}

fn class_v6(ip: Ipv6Addr) -> &'static str {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        "loopback"
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfe80 {
        // Unique local fc00::/7, link-local fe80::/10.
        "lan"
    } else {
        "internet"
    }
}

/// The `Content-Length` a message declares.
fn declared_len(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Body size from `Content-Length` or the body's exact size hint. Bodies of known size
/// are counted up front and left untouched, so hyper still sends `Content-Length` and
/// empty bodies cost nothing.
fn known_len(h: &HeaderMap, body: &Body) -> Option<u64> {
    declared_len(h).or_else(|| body.size_hint().exact())
}

/// Count request and response body bytes by peer class.
pub async fn count_bytes(req: Request, next: Next) -> Response {
    // Absent only when the router is served without connect info (e.g. in-process
    // tests); such traffic is labelled `unknown` rather than guessed.
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| peer_class(c.0.ip()))
        .unwrap_or("unknown");
    let req = match known_len(req.headers(), req.body()) {
        Some(n) => {
            metrics::http_request_bytes(peer, n);
            req
        }
        None => req.map(|body| {
            Body::from_stream(body.into_data_stream().inspect(move |chunk| {
                if let Ok(b) = chunk {
                    metrics::http_request_bytes(peer, b.len() as u64);
                }
            }))
        }),
    };
    let resp = next.run(req).await;
    let counter = metrics::http_response_bytes(peer);
    match known_len(resp.headers(), resp.body()) {
        Some(n) => {
            counter.inc_by(n);
            resp
        }
        None => resp.map(|body| {
            Body::from_stream(body.into_data_stream().inspect(move |chunk| {
                if let Ok(b) = chunk {
                    counter.inc_by(b.len() as u64);
                }
            }))
        }),
    }
}

/// Bodies declared larger than this are refused without being read.
const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The longest a refused body's reading may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// A request whose `Content-Length` is over [`MAX_BODY_BYTES`] gets 413 in its route's
/// shape (`invalid_body`). The body is read and dropped first (up to
/// [`DRAIN_MAX_BYTES`] and [`DRAIN_TIME`]): a server that answers and closes while the
/// client is still sending leaves most clients with a broken pipe instead of the
/// answer. Bodies of unknown length meet the limit as they are read
/// (`DefaultBodyLimit`).
pub async fn refuse_oversize(req: Request, next: Next) -> Response {
    let Some(n) = declared_len(req.headers()).filter(|&n| n > MAX_BODY_BYTES as u64) else {
        return next.run(req).await;
    };
    let shape = Shape::of_path(req.uri().path());
    if n <= DRAIN_MAX_BYTES {
        let mut body = req.into_body().into_data_stream();
        let drain = async { while let Some(Ok(_)) = body.next().await {} };
        // A client too slow to finish within the time gets the answer anyway.
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    let err = ApiError {
        status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the request body is {n} bytes, more than the limit of {MAX_BODY_BYTES} bytes"
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_body"),
    };
    match shape {
        Shape::OpenAi => err.into_response(),
        Shape::Anthropic => AnthropicError(err).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over a real socket, as clients send: the whole body goes out, the 413 comes back
    /// in the route's shape (never a broken pipe), and the connection stays usable.
    #[tokio::test]
    async fn an_oversize_body_is_read_then_refused_in_the_routes_shape() {
        let app = axum::Router::new()
            .route("/v1/completions", axum::routing::post(|| async { "ok" }))
            .route("/v1/messages", axum::routing::post(|| async { "ok" }))
            .layer(axum::middleware::from_fn(refuse_oversize));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = reqwest::Client::new();
        let huge = vec![b'a'; MAX_BODY_BYTES + (1 << 20)];
        for path in ["/v1/completions", "/v1/messages"] {
            for _ in 0..3 {
                let r = c
                    .post(format!("http://{addr}{path}"))
                    .body(huge.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 413, "{path}");
                let v: serde_json::Value = r.json().await.unwrap();
                let msg = v["error"]["message"].as_str().unwrap();
                assert!(msg.contains("more than the limit"), "{v}");
                if path == "/v1/messages" {
                    assert_eq!(v["type"], "error", "{v}");
                    assert_eq!(v["error"]["type"], "request_too_large", "{v}");
                } else {
                    assert_eq!(v["error"]["code"], "invalid_body", "{v}");
                    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
                }
            }
            let r = c
                .post(format!("http://{addr}{path}"))
                .body(vec![b'a'; 1 << 20])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200, "{path}");
        }
    }

    fn class(s: &str) -> &'static str {
        peer_class(s.parse().unwrap())
    }

    #[test]
    fn classifies_loopback() {
        assert_eq!(class("127.0.0.1"), "loopback");
        assert_eq!(class("127.1.2.3"), "loopback");
        assert_eq!(class("::1"), "loopback");
        assert_eq!(class("::ffff:127.0.0.1"), "loopback");
    }

    #[test]
    fn classifies_lan() {
        for a in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.10",
            "169.254.3.4",
            "fe80::1",
            "fc00::1",
            "fd12:3456:789a::1",
            "::ffff:192.168.0.2",
        ] {
            assert_eq!(class(a), "lan", "{a}");
        }
    }

    #[test]
    fn classifies_internet() {
        for a in [
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "100.64.0.1",
            "2001:4860:4860::8888",
            "fec0::1",
            "::ffff:1.1.1.1",
        ] {
            assert_eq!(class(a), "internet", "{a}");
        }
    }
}

//! Network bytes by peer class: a middleware that classifies the client address as
//! `loopback`, `lan` or `internet` (a bounded label, never the address itself) and
//! counts request and response body bytes.
//!
//! Request bytes come from `Content-Length`; a request without one (chunked) is counted
//! as its body is read, so bytes the handler never reads are not counted. Response
//! bytes come from `Content-Length` or the body's exact size; a body of unknown size
//! (SSE streams) is wrapped and every chunk handed to the connection is counted, so a
//! stream cut short counts what was sent. Headers are not counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

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

/// Body size from `Content-Length` or the body's exact size hint. Bodies of known size
/// are counted up front and left untouched, so hyper still sends `Content-Length` and
/// empty bodies cost nothing.
fn known_len(h: &HeaderMap, body: &Body) -> Option<u64> {
    h.get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| body.size_hint().exact())
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

#[cfg(test)]
mod tests {
    use super::*;

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

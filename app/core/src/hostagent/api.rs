//! The host agent's control API: HTTP/1.1 + JSON on `agent.sock`, a closed
//! set of actions over a thin transport.
//!
//! | route | action |
//! |---|---|
//! | `GET /status` | [`crate::status::Status`] |
//! | `POST /stop` | orderly shutdown of the guest (containers stopped, disk flushed) |
//! | `POST /kill` | end the VM process now |

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::Shared;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Status,
    Stop,
    Kill,
}

pub fn route(method: &Method, path: &str) -> Result<Action, StatusCode> {
    match (method, path) {
        (&Method::GET, "/status") => Ok(Action::Status),
        (&Method::POST, "/stop") => Ok(Action::Stop),
        (&Method::POST, "/kill") => Ok(Action::Kill),
        (_, "/status" | "/stop" | "/kill") => Err(StatusCode::METHOD_NOT_ALLOWED),
        _ => Err(StatusCode::NOT_FOUND),
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn perform(action: Action, shared: &Shared) -> Response<Full<Bytes>> {
    match action {
        Action::Status => json(
            StatusCode::OK,
            serde_json::to_value(shared.snapshot()).unwrap_or_default(),
        ),
        Action::Stop => {
            shared.request(super::Command::Stop);
            json(StatusCode::ACCEPTED, serde_json::json!({"stopping": true}))
        }
        Action::Kill => {
            shared.request(super::Command::Kill);
            json(StatusCode::ACCEPTED, serde_json::json!({"killing": true}))
        }
    }
}

/// API connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut log = berth_limits::RateLimiter::default();
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff = std::time::Duration::from_millis(50);
                s
            }
            Err(e) => {
                // Out of descriptors, most likely: wait for some to close
                // instead of spinning on a listener that stays readable.
                if let Some(s) = log.hit() {
                    tracing::warn!("control API: accept failed: {e}{s}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let resp = match route(req.method(), req.uri().path()) {
                        Ok(a) => perform(a, &shared),
                        Err(code) => json(
                            code,
                            serde_json::json!({"error": code.canonical_reason().unwrap_or("error")}),
                        ),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_closed() {
        assert_eq!(route(&Method::GET, "/status"), Ok(Action::Status));
        assert_eq!(route(&Method::POST, "/stop"), Ok(Action::Stop));
        assert_eq!(route(&Method::POST, "/kill"), Ok(Action::Kill));
        assert_eq!(
            route(&Method::GET, "/stop"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(route(&Method::GET, "/x"), Err(StatusCode::NOT_FOUND));
    }
}

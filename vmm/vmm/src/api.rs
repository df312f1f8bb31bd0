//! berth-vmm's control API: HTTP/1.1 + JSON on a unix socket, served on the
//! VMM's event loop. The routes map onto a closed set of actions; the
//! transport is thin.
//!
//! | route | action |
//! |---|---|
//! | `GET /status` | state, vCPUs, memory, uptime |
//! | `PUT /shutdown` | ctrl-alt-del to the guest; forced after the shutdown timeout |
//! | `GET /metrics` | per-device counters |
//! | `PUT /pause` | stops every vCPU (devices keep their state) |
//! | `PUT /resume` | runs them again; `/status` counts resumes |
//! | `GET /resumes?after=N` | answers `{"resumes":M}` as soon as the count passes N (at once if it has), else after 50 s with the count as it is: a client follows resumes without polling |

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::event_loop::EventLoop;
use crate::vm::Devices;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Status,
    Shutdown,
    Metrics,
    Pause,
    Resume,
    /// Long-poll for the resume count (`?after=N`).
    Resumes,
}

/// Maps a request line onto an action.
pub fn route(method: &Method, path: &str) -> Result<Action, StatusCode> {
    match (method, path) {
        (&Method::GET, "/status") => Ok(Action::Status),
        (&Method::PUT, "/shutdown") => Ok(Action::Shutdown),
        (&Method::GET, "/metrics") => Ok(Action::Metrics),
        (&Method::PUT, "/pause") => Ok(Action::Pause),
        (&Method::PUT, "/resume") => Ok(Action::Resume),
        (&Method::GET, "/resumes") => Ok(Action::Resumes),
        (_, "/status" | "/shutdown" | "/metrics" | "/pause" | "/resume" | "/resumes") => {
            Err(StatusCode::METHOD_NOT_ALLOWED)
        }
        _ => Err(StatusCode::NOT_FOUND),
    }
}

/// What wakes berth-vmm's main loop, which otherwise sleeps: it waits
/// on one channel for all of these, with a deadline only while a
/// shutdown request's grace runs.
#[derive(Debug)]
pub enum Wake {
    /// A vCPU ended the VM.
    Exit(crate::exit::ExitReason),
    /// Every vCPU thread is gone.
    VcpusEnded,
    Pause,
    Resume,
    /// A shutdown was requested through the API (its time is in
    /// [`ApiState::shutdown_requested`]).
    Shutdown,
    /// SIGTERM or SIGINT.
    Terminate,
}

/// What the API can see and do.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub devices: Arc<Devices>,
    pub started: Instant,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Set when a shutdown is requested; the main loop enforces it.
    pub shutdown_requested: Arc<Mutex<Option<Instant>>>,
    /// Wakes the main loop: pause, resume, a shutdown request.
    pub wake: std::sync::mpsc::Sender<Wake>,
    /// Whether the vCPUs are paused, and how often they were resumed
    /// (the host agent checks the guest clock when this grows).
    pub paused: Arc<std::sync::atomic::AtomicBool>,
    pub resumes: Arc<std::sync::atomic::AtomicU64>,
    /// Notified (all waiters) after `resumes` grew.
    pub resumed: Arc<tokio::sync::Notify>,
}

/// How long `GET /resumes` waits for a resume before answering anyway.
pub const RESUMES_WAIT: std::time::Duration = std::time::Duration::from_secs(50);

/// `after` from a `?after=N` query; 0 when absent or not a number.
pub fn after_param(query: Option<&str>) -> u64 {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Answers once the resume count passes `after`, or after `wait`.
pub async fn wait_resumes(
    s: &ApiState,
    after: u64,
    wait: std::time::Duration,
) -> Response<Full<Bytes>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before the count is read, so a resume in between
        // is not missed.
        let notified = s.resumed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let n = s.resumes.load(std::sync::atomic::Ordering::SeqCst);
        if n > after || tokio::time::timeout_at(deadline, notified).await.is_err() {
            let n = s.resumes.load(std::sync::atomic::Ordering::SeqCst);
            return json(StatusCode::OK, serde_json::json!({ "resumes": n }));
        }
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

pub fn perform(action: Action, s: &ApiState) -> Response<Full<Bytes>> {
    match action {
        Action::Status => {
            let shutting_down = s
                .shutdown_requested
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            json(
                StatusCode::OK,
                serde_json::json!({
                    "state": if shutting_down { "shutting_down" } else { "running" },
                    "vcpus": s.cpus,
                    "memory_mib": s.memory_mib,
                    "uptime_s": s.started.elapsed().as_secs(),
                    "pid": std::process::id(),
                    "paused": s.paused.load(std::sync::atomic::Ordering::SeqCst),
                    "resumes": s.resumes.load(std::sync::atomic::Ordering::SeqCst),
                }),
            )
        }
        Action::Shutdown => {
            let mut req = s
                .shutdown_requested
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if req.is_none() {
                s.devices.ctrl_alt_del();
                *req = Some(Instant::now());
                let _ = s.wake.send(Wake::Shutdown);
            }
            json(
                StatusCode::ACCEPTED,
                serde_json::json!({ "shutdown": "requested" }),
            )
        }
        Action::Metrics => json(StatusCode::OK, s.devices.metrics()),
        // Served by [`wait_resumes`]; here the count as it is.
        Action::Resumes => json(
            StatusCode::OK,
            serde_json::json!({ "resumes": s.resumes.load(std::sync::atomic::Ordering::SeqCst) }),
        ),
        Action::Pause | Action::Resume => {
            let pause = action == Action::Pause;
            match s.wake.send(if pause { Wake::Pause } else { Wake::Resume }) {
                Ok(()) => json(StatusCode::ACCEPTED, serde_json::json!({ "paused": pause })),
                Err(_) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "error": "the VM is ending" }),
                ),
            }
        }
    }
}

/// Serves the API on `path`, as tasks of the VMM's event loop.
pub fn serve(events: &EventLoop, path: &Path, state: ApiState) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let std_listener = std::os::unix::net::UnixListener::bind(path)?;
    std_listener.set_nonblocking(true)?;
    let listener = {
        let _rt = events.runtime().enter();
        tokio::net::UnixListener::from_std(std_listener)?
    };
    events.runtime().spawn(async move {
        let mut log = berth_limits::RateLimiter::default();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: let some close.
                    if let Some(s) = log.hit() {
                        tracing::warn!("control API: accept failed: {e}{s}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let resp = match route(req.method(), req.uri().path()) {
                            Ok(Action::Resumes) => {
                                let after = after_param(req.uri().query());
                                wait_resumes(&state, after, RESUMES_WAIT).await
                            }
                            Ok(action) => perform(action, &state),
                            Err(code) => json(
                                code,
                                serde_json::json!({ "error": code.canonical_reason() }),
                            ),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_a_closed_set() {
        assert_eq!(route(&Method::GET, "/status"), Ok(Action::Status));
        assert_eq!(route(&Method::PUT, "/shutdown"), Ok(Action::Shutdown));
        assert_eq!(route(&Method::GET, "/metrics"), Ok(Action::Metrics));
        assert_eq!(route(&Method::PUT, "/pause"), Ok(Action::Pause));
        assert_eq!(route(&Method::PUT, "/resume"), Ok(Action::Resume));
        assert_eq!(
            route(&Method::GET, "/pause"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            route(&Method::GET, "/shutdown"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(route(&Method::GET, "/../etc"), Err(StatusCode::NOT_FOUND));
        assert_eq!(route(&Method::GET, "/resumes"), Ok(Action::Resumes));
        assert_eq!(
            route(&Method::PUT, "/resumes"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn the_after_parameter_is_read_or_zero() {
        assert_eq!(after_param(Some("after=3")), 3);
        assert_eq!(after_param(Some("x=1&after=12")), 12);
        assert_eq!(after_param(Some("after=-1")), 0);
        assert_eq!(after_param(Some("after=99999999999999999999999")), 0);
        assert_eq!(after_param(None), 0);
    }
}

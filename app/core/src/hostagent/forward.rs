//! Joins each connection on a host unix socket to a guest vsock port.
//!
//! Used for `docker.sock` → guest port 2375. Bytes are copied both ways
//! with fixed buffers (tokio's `copy_bidirectional`, 8 KiB per direction),
//! so a slow side stalls the other instead of growing memory; an EOF in one
//! direction becomes a write shutdown on the other (half-close), which
//! `docker run -i` with stdin at EOF, attach and exec need. HTTP upgrades
//! need nothing special: after the 101 both sides just keep streaming.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_limits::RateLimiter;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::vsock;

/// The most connections served at once, whatever the open-file limit.
pub const MAX_CONNECTIONS: usize = 1024;
/// Refusals being written at once; beyond that, excess connections are
/// just closed.
const MAX_REFUSING: usize = 32;
/// Slots kept for health checks at most.
const HEALTH_SLOTS: usize = 4;
/// How long a refusal may take to write.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections this process can forward at once: two descriptors each,
/// from its open-file limit.
pub fn cap_for_this_process() -> usize {
    berth_limits::fds::connection_cap(
        berth_limits::fds::current_nofile_limit(),
        2,
        MAX_CONNECTIONS,
    )
}

/// Counters for `GET /status` and tests.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub failed: AtomicU64,
    /// Refused because `cap` connections were being served.
    pub refused: AtomicU64,
}

/// Connects to the guest port, retrying refusals for a few seconds: a
/// burst of connections can overflow the guest's listen backlog, which
/// refuses like a full SYN queue would, and a client should see a slow
/// connection rather than a reset.
async fn connect_with_retry(
    vsock_sock: &std::path::Path,
    port: u32,
) -> Result<UnixStream, vsock::VsockError> {
    let mut delay = Duration::from_millis(10);
    let mut attempt = 0;
    loop {
        match vsock::connect(vsock_sock, port).await {
            Ok(g) => return Ok(g),
            Err(vsock::VsockError::Refused { .. }) if attempt < 12 => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Answers a connection we will not forward with HTTP 503 and `why`.
async fn refuse(mut client: UnixStream, why: String) {
    let body = serde_json::json!({ "message": why }).to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        client.write_all(resp.as_bytes()).await?;
        client.shutdown().await
    })
    .await;
}

/// Serves `listener` until the task is dropped, at most `cap`
/// connections at once.
pub async fn serve(
    listener: UnixListener,
    vsock_sock: PathBuf,
    port: u32,
    stats: Arc<ForwardStats>,
    cap: usize,
) {
    tracing::info!("forwarding to guest port {port}: at most {cap} connections at once");
    // A few of the cap's slots are kept for health checks (see below).
    let kept = (cap / 16).clamp(1, HEALTH_SLOTS).min(cap.saturating_sub(1));
    let slots = Arc::new(Semaphore::new(cap - kept));
    let health = Arc::new(Semaphore::new(kept));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let log = Arc::new(Mutex::new(RateLimiter::default()));
    let mut backoff = Duration::from_millis(50);
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => {
                backoff = Duration::from_millis(50);
                c
            }
            Err(e) => {
                // Out of descriptors, most likely: let some close first.
                if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                    tracing::warn!(
                        "accepting on the forwarded socket failed: {e}; pausing {} ms{s}",
                        backoff.as_millis()
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let ctx = Ctx {
            vsock_sock: vsock_sock.clone(),
            port,
            stats: stats.clone(),
            log: log.clone(),
        };
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            tokio::spawn(async move {
                let _permit = permit;
                ctx.forward(client, Vec::new()).await
            });
            continue;
        }
        let why = format!(
            "Berth is already forwarding {cap} connections to Docker, the most it can with its open-file limit ({}); close some connections, or raise the limit (ulimit -n) and restart Berth",
            berth_limits::fds::current_nofile_limit()
        );
        // At the cap, a health check still gets through on a slot kept for
        // it, so `docker version` and `/_ping` keep answering.
        if let Ok(permit) = health.clone().try_acquire_owned() {
            tokio::spawn(async move {
                let _permit = permit;
                let mut client = client;
                match read_request_line(&mut client).await {
                    Some(head) if is_health_check(&head) => ctx.forward(client, head).await,
                    _ => {
                        ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                        refuse(client, why).await
                    }
                }
            });
            continue;
        }
        stats.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
            tracing::warn!("{why}{s}");
        }
        if let Ok(p) = refusing.clone().try_acquire_owned() {
            tokio::spawn(async move {
                let _p = p;
                refuse(client, why).await
            });
        }
    }
}

/// What forwarding one connection needs.
struct Ctx {
    vsock_sock: PathBuf,
    port: u32,
    stats: Arc<ForwardStats>,
    log: Arc<Mutex<RateLimiter>>,
}

impl Ctx {
    /// Joins `client` to the guest port; `head` (bytes already read from
    /// the client) goes first.
    async fn forward(self, mut client: UnixStream, head: Vec<u8>) {
        let port = self.port;
        let mut guest = match connect_with_retry(&self.vsock_sock, port).await {
            Ok(g) => g,
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(s) = self.log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                    tracing::warn!("forwarding to guest port {port}: {e}{s}");
                }
                refuse(
                    client,
                    format!("Berth could not reach Docker in the VM: {e}"),
                )
                .await;
                return;
            }
        };
        if !head.is_empty() && guest.write_all(&head).await.is_err() {
            return;
        }
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
            tracing::debug!("forwarded connection ended: {e}");
        }
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a client's first request line (and whatever came with it), at
/// most 1 KiB and 2 s.
async fn read_request_line(client: &mut UnixStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = client.read(&mut buf[..1024 - head.len()]).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()??;
    Some(head)
}

/// `GET|HEAD [/v1.NN]/_ping` or `GET [/v1.NN]/version`: what a client asks
/// to see whether Docker is there.
pub fn is_health_check(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return false;
    };
    let path = path.split('?').next().unwrap_or_default();
    let path = match path.strip_prefix("/v") {
        Some(rest) => match rest.find('/') {
            Some(i) if rest[..i].bytes().all(|b| b.is_ascii_digit() || b == b'.') => &rest[i..],
            _ => return false,
        },
        None => path,
    };
    matches!(
        (method, path),
        ("GET" | "HEAD", "/_ping") | ("GET", "/version")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_checks_are_recognised() {
        for ok in [
            &b"GET /_ping HTTP/1.1\r\n"[..],
            b"HEAD /_ping HTTP/1.1\r\nHost: x\r\n",
            b"GET /v1.41/version HTTP/1.1\r\n",
            b"GET /v1.41/_ping?x=1 HTTP/1.1\r\n",
        ] {
            assert!(is_health_check(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"GET /events HTTP/1.1\r\n"[..],
            b"POST /_ping HTTP/1.1\r\n",
            b"GET /vx/_ping HTTP/1.1\r\n",
            b"GET /_pingpong HTTP/1.1\r\n",
            b"\xff\xfe",
            b"",
        ] {
            assert!(!is_health_check(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}

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
    let slots = Arc::new(Semaphore::new(cap));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let why = format!(
                "Berth is already forwarding {cap} connections to Docker, the most it can with its open-file limit ({}); close some connections, or raise the limit (ulimit -n) and restart Berth",
                berth_limits::fds::current_nofile_limit()
            );
            if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                tracing::warn!("{why}{s}");
            }
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let _p = p;
                    refuse(client, why).await
                });
            }
            continue;
        };
        let stats = stats.clone();
        let vsock_sock = vsock_sock.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut client = client;
            let mut guest = match connect_with_retry(&vsock_sock, port).await {
                Ok(g) => g,
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
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
            stats.active.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
                tracing::debug!("forwarded connection ended: {e}");
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

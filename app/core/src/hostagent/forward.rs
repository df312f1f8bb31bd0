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
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::vsock;

/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// Counters for `GET /status` and tests.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub failed: AtomicU64,
}

/// Connects to the guest port, retrying refusals for a few seconds: a
/// burst of connections can overflow the guest's listen backlog, which
/// refuses like a full SYN queue would, and a client should see a slow
/// connection rather than a reset.
async fn connect_with_retry(
    vsock_sock: &std::path::Path,
    port: u32,
) -> Option<tokio::net::UnixStream> {
    let mut delay = std::time::Duration::from_millis(10);
    for attempt in 0.. {
        match vsock::connect(vsock_sock, port).await {
            Ok(g) => return Some(g),
            Err(vsock::VsockError::Refused { .. }) if attempt < 12 => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_millis(500));
            }
            Err(e) => {
                tracing::warn!("forwarding to guest port {port}: {e}");
                return None;
            }
        }
    }
    None
}

/// Serves `listener` until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    vsock_sock: PathBuf,
    port: u32,
    stats: Arc<ForwardStats>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accepting on the forwarded socket failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        let vsock_sock = vsock_sock.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(mut guest) = connect_with_retry(&vsock_sock, port).await else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            stats.active.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
                tracing::debug!("forwarded connection ended: {e}");
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

//! vsock listeners: the control port and the Docker port.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::{Phase, CONTROL_PORT, DOCKER_PORT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::daemons::DOCKER_SOCKET;
use crate::state::Shared;

/// How long a Docker-port connection made during boot waits for dockerd.
const READY_WAIT: Duration = Duration::from_secs(120);

/// Binds both ports and serves them in the background. Without a vsock
/// device (e.g. a console-only self-test boot) this logs and returns.
pub fn start(shared: Arc<Shared>, kernel_release: String) {
    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, CONTROL_PORT)) {
        Ok(listener) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            let kr = kernel_release.clone();
                            tokio::spawn(async move {
                                crate::control::serve(stream, shared, &kr).await
                            });
                        }
                        Err(e) => accept_failed(CONTROL_PORT, e).await,
                    }
                }
            });
        }
        Err(e) => tracing::warn!("vsock control port {CONTROL_PORT} unavailable: {e}"),
    }
    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, DOCKER_PORT)) {
        Ok(listener) => {
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(forward_to_docker(stream, shared.clone()));
                        }
                        Err(e) => accept_failed(DOCKER_PORT, e).await,
                    }
                }
            });
        }
        Err(e) => tracing::warn!("vsock Docker port {DOCKER_PORT} unavailable: {e}"),
    }
}

/// Accept errors are mostly fd exhaustion: back off instead of spinning.
async fn accept_failed(port: u32, e: std::io::Error) {
    tracing::warn!("accept on vsock port {port} failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Joins one connection to dockerd's socket both ways until both sides
/// have closed; EOF on one direction is passed on as a write shutdown, so
/// half-closed streams (`docker run -i` with stdin at EOF) keep working.
pub async fn forward_to_docker<S>(mut stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !wait_ready(&shared).await {
        return;
    }
    let mut docker = match UnixStream::connect(DOCKER_SOCKET).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("cannot reach {DOCKER_SOCKET}: {e}");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut docker).await {
        tracing::debug!("docker connection ended: {e}");
    }
}

async fn wait_ready(shared: &Shared) -> bool {
    let mut rx = shared.watch();
    let ready = async {
        rx.wait_for(|s| matches!(s.phase, Phase::Ready | Phase::Failed | Phase::ShuttingDown))
            .await
            .map(|s| s.phase == Phase::Ready)
            .unwrap_or(false)
    };
    tokio::time::timeout(READY_WAIT, ready)
        .await
        .unwrap_or(false)
}

//! vsock listeners: the control port and the Docker port.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::{Phase, CONTROL_PORT, DOCKER_PORT, ECHO_PORT};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio_vsock::{VsockListener, VMADDR_CID_ANY};

use crate::daemons::DOCKER_SOCKET;

/// Listen backlog of each vsock port. The standard library's 128 turned a
/// burst of 200 Docker connections into refused ones; the kernel caps this
/// at `net.core.somaxconn` (4096).
const BACKLOG: i32 = 1024;

/// Binds `port` on any CID with a deep backlog.
pub(crate) fn listen(port: u32) -> std::io::Result<VsockListener> {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(
        fd.as_raw_fd(),
        &socket::VsockAddr::new(VMADDR_CID_ANY, port),
    )?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(VsockListener::from(fd))
}
use crate::reaper::Reaper;
use crate::state::Shared;

/// How long a Docker-port connection made during boot waits for dockerd.
const READY_WAIT: Duration = Duration::from_secs(120);

/// Binds both ports and serves them in the background. Without a vsock
/// device (e.g. a console-only self-test boot) this logs and returns.
pub fn start(shared: Arc<Shared>, reaper: Arc<Reaper>, kernel_release: String, echo: bool) {
    if echo {
        start_echo();
    }
    match listen(CONTROL_PORT) {
        Ok(listener) => {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            let reaper = reaper.clone();
                            let kr = kernel_release.clone();
                            tokio::spawn(async move {
                                crate::control::serve(stream, shared, reaper, &kr).await
                            });
                        }
                        Err(e) => accept_failed(CONTROL_PORT, e).await,
                    }
                }
            });
        }
        Err(e) => tracing::warn!("vsock control port {CONTROL_PORT} unavailable: {e}"),
    }
    match listen(DOCKER_PORT) {
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

/// The echo port: every byte read is written back; EOF is passed on.
fn start_echo() {
    match listen(ECHO_PORT) {
        Ok(listener) => {
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(async move {
                                let (mut r, mut w) = tokio::io::split(stream);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                            });
                        }
                        Err(e) => accept_failed(ECHO_PORT, e).await,
                    }
                }
            });
        }
        Err(e) => tracing::warn!("vsock echo port {ECHO_PORT} unavailable: {e}"),
    }
}

/// Accept errors are mostly fd exhaustion: back off instead of spinning.
pub(crate) async fn accept_failed(port: u32, e: std::io::Error) {
    tracing::warn!("accept on vsock port {port} failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Joins one connection to dockerd's socket both ways until both sides
/// have closed; EOF on one direction is passed on as a write shutdown, so
/// half-closed streams (`docker run -i` with stdin at EOF) keep working.
pub async fn forward_to_docker<S>(stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    forward(stream, &shared, DOCKER_SOCKET).await
}

async fn forward<S>(mut stream: S, shared: &Shared, socket: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !wait_ready(shared).await {
        return;
    }
    let mut docker = match UnixStream::connect(socket).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("cannot reach {socket}: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The client half-closes after its request; the server only answers
    /// once it has seen that EOF, so the answer arriving proves the EOF
    /// was passed on while the other direction stayed open.
    #[tokio::test]
    async fn half_close_is_passed_on_both_ways() {
        let dir = std::env::temp_dir().join(format!("berth-fwd-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("docker.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(format!("seen {} bytes", got.len()).as_bytes())
                .await
                .unwrap();
        });
        let shared = Shared::new();
        shared.update(|s| s.phase = Phase::Ready);
        let (mut client, agent_side) = tokio::io::duplex(1024);
        let p = path.to_str().unwrap().to_owned();
        let fwd = tokio::spawn(async move { forward(agent_side, &shared, &p).await });
        client.write_all(&[7u8; 5000]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "seen 5000 bytes");
        server.await.unwrap();
        fwd.await.unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn connections_are_closed_when_docker_will_not_start() {
        let shared = Shared::new();
        shared.update(|s| s.phase = Phase::Failed);
        let (mut client, agent_side) = tokio::io::duplex(64);
        forward(agent_side, &shared, "/nonexistent.sock").await;
        let mut buf = Vec::new();
        assert_eq!(client.read_to_end(&mut buf).await.unwrap(), 0);
    }
}

//! vsock listeners: the control port and the Docker port.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::{Phase, CONTROL_PORT, DOCKER_PORT, ECHO_PORT};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_vsock::{VsockListener, VMADDR_CID_ANY};

use crate::bindcheck::BindCheck;
use crate::daemons::DOCKER_SOCKET;
use crate::httpgate::{self, End, Gate};

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
pub fn start(
    shared: Arc<Shared>,
    reaper: Arc<Reaper>,
    kernel_release: String,
    echo: bool,
    bind_check: Option<Arc<BindCheck>>,
) {
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
                            tokio::spawn(forward_to_docker(
                                stream,
                                shared.clone(),
                                bind_check.clone(),
                            ));
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
/// With `bind_check`, container creates are checked on the way
/// ([`httpgate`]); a refused one is answered here with dockerd's error
/// format once dockerd has finished what came before it.
pub async fn forward_to_docker<S>(
    stream: S,
    shared: Arc<Shared>,
    bind_check: Option<Arc<BindCheck>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match bind_check {
        Some(gate) => forward(stream, &shared, DOCKER_SOCKET, Some(&*gate)).await,
        None => forward::<S, BindCheck>(stream, &shared, DOCKER_SOCKET, None).await,
    }
}

async fn forward<S, G>(stream: S, shared: &Shared, socket: &str, gate: Option<&G>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    G: Gate + ?Sized,
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
    let Some(gate) = gate else {
        let mut stream = stream;
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut docker).await {
            tracing::debug!("docker connection ended: {e}");
        }
        return;
    };
    let (mut cr, mut cw) = tokio::io::split(stream);
    let (mut dr, mut dw) = docker.into_split();
    let refused = std::sync::Mutex::new(None);
    let up = async {
        match httpgate::pump(&mut cr, &mut dw, gate).await {
            Ok(End::Eof) => {}
            Ok(End::Refused(msg)) => {
                if let Ok(mut r) = refused.lock() {
                    *r = Some(msg);
                }
            }
            Err(e) => tracing::debug!("docker connection ended: {e}"),
        }
        // dockerd finishes what it is answering, then closes.
        let _ = dw.shutdown().await;
    };
    let down = async {
        if let Err(e) = tokio::io::copy(&mut dr, &mut cw).await {
            tracing::debug!("docker connection ended: {e}");
        }
        let refusal = refused.lock().ok().and_then(|mut r| r.take());
        if let Some(msg) = refusal {
            let _ = cw.write_all(&httpgate::refusal(&msg)).await;
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
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

    /// A scratch socket path for a stand-in dockerd.
    fn socket(name: &str) -> (std::path::PathBuf, tokio::net::UnixListener) {
        let dir = std::env::temp_dir().join(format!("berth-fwd-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("docker.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    fn ready() -> Arc<Shared> {
        let shared = Shared::new();
        shared.update(|s| s.phase = Phase::Ready);
        shared
    }

    fn gate() -> Arc<BindCheck> {
        Arc::new(BindCheck {
            shares: vec![berth_proto::share::ShareSpec {
                tag: "share0".into(),
                path: "/Users/me".into(),
                read_only: false,
            }],
        })
    }

    /// The client half-closes after its request; the server only answers
    /// once it has seen that EOF, so the answer arriving proves the EOF
    /// was passed on while the other direction stayed open — with and
    /// without the create check on the way.
    #[tokio::test]
    async fn half_close_is_passed_on_both_ways() {
        for checked in [false, true] {
            let (path, listener) = socket(&format!("half-{checked}"));
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(format!("seen {} bytes", got.len()).as_bytes())
                    .await
                    .unwrap();
            });
            let (mut client, agent_side) = tokio::io::duplex(1024);
            let p = path.to_str().unwrap().to_owned();
            let g = checked.then(gate);
            let fwd =
                tokio::spawn(async move { forward(agent_side, &ready(), &p, g.as_deref()).await });
            // An HTTP request with a body, then bytes that are not HTTP.
            client
                .write_all(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
                .await
                .unwrap();
            client.write_all(&[7u8; 5000]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, "seen 5042 bytes", "checked: {checked}");
            server.await.unwrap();
            fwd.await.unwrap();
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }

    /// A create naming a path in no share never reaches dockerd; the
    /// client gets dockerd's answer to what it sent before, then a Docker
    /// API error that says how to share the path.
    #[tokio::test]
    async fn a_refused_create_is_answered_after_what_came_before() {
        let (path, listener) = socket("refused");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                .await
                .unwrap();
            got
        });
        let (mut client, agent_side) = tokio::io::duplex(1024);
        let p = path.to_str().unwrap().to_owned();
        let fwd =
            tokio::spawn(async move { forward(agent_side, &ready(), &p, Some(&*gate())).await });
        let ping = b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n";
        let body = br#"{"Image":"x","HostConfig":{"Binds":["/nowhere/at/all:/src"]}}"#;
        let mut create = format!(
            "POST /v1.47/containers/create HTTP/1.1\r\nHost: docker\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        create.extend_from_slice(body);
        client.write_all(ping).await.unwrap();
        client.write_all(&create).await.unwrap();
        let mut answer = String::new();
        // Without the refusal the client would wait for an answer forever.
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
            .await
            .expect("no answer to the create")
            .unwrap();
        assert_eq!(
            server.await.unwrap(),
            ping,
            "dockerd saw more than the ping"
        );
        let (ok, refusal) = answer.split_once("\r\n\r\nOK").unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(refusal.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
        assert!(
            refusal.contains("/nowhere/at/all is not in a folder shared with the Berth VM"),
            "{answer}"
        );
        fwd.await.unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn connections_are_closed_when_docker_will_not_start() {
        let shared = Shared::new();
        shared.update(|s| s.phase = Phase::Failed);
        let (mut client, agent_side) = tokio::io::duplex(64);
        forward::<_, BindCheck>(agent_side, &shared, "/nonexistent.sock", None).await;
        let mut buf = Vec::new();
        assert_eq!(client.read_to_end(&mut buf).await.unwrap(), 0);
    }
}

//! TCP from the guest to the host's loopback (`host.docker.internal`):
//! the guest agent redirects connections to the router and sends each one
//! here over vsock (guest → host port [`HOST_CONNECT_PORT`], which the
//! VM's vsock device joins to `vsock.sock_1027`) with the port it wants;
//! the host agent connects to that port on the host's loopback and answers
//! `OK` or why not, then joins the two. See `docs/networking.md` for why
//! this does not go through passt.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_limits::RateLimiter;
use berth_proto::net::HostConnect;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Connections at once; more are answered `ERR busy`.
pub const MAX_CONNS: usize = 512;
const COPY_BUF: usize = 64 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` (`vsock.sock_1027`) until dropped.
pub async fn serve(listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    let log = Arc::new(Mutex::new(RateLimiter::default()));
    let mut backoff = Duration::from_millis(50);
    loop {
        let (guest, _) = match listener.accept().await {
            Ok(c) => {
                backoff = Duration::from_millis(50);
                c
            }
            Err(e) => {
                if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                    tracing::warn!("host loopback relay: accept failed: {e}{s}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let permit = slots.clone().try_acquire_owned();
        let log = log.clone();
        tokio::spawn(async move {
            let Ok(_permit) = permit else {
                let mut g = guest;
                let _ = g.write_all(b"ERR busy\n").await;
                return;
            };
            if let Err(e) = relay(guest).await {
                if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                    tracing::debug!("host loopback relay: {e}{s}");
                }
            }
        });
    }
}

/// Connects to `port` on the host's loopback: IPv4 first, then IPv6.
async fn connect(port: u16) -> std::io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let attempt = |a| tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a));
    match attempt(v4).await {
        Ok(Ok(s)) => Ok(s),
        first => match attempt(v6).await {
            Ok(Ok(s)) => Ok(s),
            _ => match first {
                Ok(Err(e)) => Err(e),
                _ => Err(std::io::ErrorKind::TimedOut.into()),
            },
        },
    }
}

async fn relay(mut guest: UnixStream) -> anyhow::Result<()> {
    let mut line = Vec::with_capacity(16);
    let read = async {
        let mut r = tokio::io::BufReader::with_capacity(1, &mut guest);
        r.read_until(b'\n', &mut line).await
    };
    tokio::time::timeout(HEADER_TIMEOUT, read).await??;
    let req = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| HostConnect::parse(l.trim_end_matches('\n')));
    let Some(req) = req else {
        let _ = guest.write_all(b"ERR bad request\n").await;
        anyhow::bail!("bad request {:?}", String::from_utf8_lossy(&line));
    };
    let mut host = match connect(req.port).await {
        Ok(h) => h,
        Err(e) => {
            let _ = guest
                .write_all(format!("ERR {}\n", e.kind()).as_bytes())
                .await;
            anyhow::bail!("port {}: {e}", req.port);
        }
    };
    let _ = host.set_nodelay(true);
    guest.write_all(b"OK\n").await?;
    tokio::io::copy_bidirectional_with_sizes(&mut guest, &mut host, COPY_BUF, COPY_BUF).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn ask(path: &std::path::Path, line: &str) -> (String, UnixStream) {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(line.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        loop {
            let b = s.read_u8().await.unwrap();
            got.push(b);
            if b == b'\n' {
                break;
            }
        }
        (String::from_utf8(got).unwrap(), s)
    }

    /// A host server on loopback is reached, half-closes pass both ways,
    /// a closed port is refused at once, garbage is refused.
    #[tokio::test]
    async fn relays_to_the_loopback_and_refuses_closed_ports() {
        let dir = std::env::temp_dir().join(format!("berth-hostloop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock_1027");
        let _ = std::fs::remove_file(&path);
        tokio::spawn(serve(UnixListener::bind(&path).unwrap()));
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(format!("got {} bytes", got.len()).as_bytes())
                .await
                .unwrap();
        });
        let (answer, mut s) = ask(&path, &format!("tcp {port}\n")).await;
        assert_eq!(answer, "OK\n");
        s.write_all(&[1; 3000]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, "got 3000 bytes");

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = std::time::Instant::now();
        let (answer, _) = ask(&path, &format!("tcp {closed}\n")).await;
        assert!(answer.starts_with("ERR "), "{answer}");
        assert!(t.elapsed() < CONNECT_TIMEOUT, "refused, not timed out");
        let (answer, _) = ask(&path, "GET / HTTP/1.0\n").await;
        assert_eq!(answer, "ERR bad request\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

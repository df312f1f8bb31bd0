//! TCP to the host's loopback (`host.docker.internal`), carried by Berth
//! over vsock rather than by passt.
//!
//! passt maps the router's address to the host's loopback, but the
//! version Debian 12 ships loses the host's reply when the guest
//! half-closes first (busybox `nc`, `curl -T`, any request-then-shutdown
//! client) and never answers a connection to a closed port (the client
//! hangs for minutes instead of being refused). So TCP to the router is
//! redirected in the guest (iptables `REDIRECT`, from containers and from
//! the guest itself) to this listener, which asks the host agent over
//! vsock (host port [`HOST_CONNECT_PORT`]) to connect to the port on the
//! host's loopback, then joins the two. A port nobody listens on is a
//! reset at once; half-closes pass both ways. UDP and IPv6 still go
//! through passt.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use berth_limits::RateLimiter;
use berth_proto::net::{HostConnect, HOST_CONNECT_PORT};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// Where redirected connections arrive.
pub const LISTEN_PORT: u16 = 1031;
/// Connections to the host at once.
const MAX_CONNS: usize = 1024;
const COPY_BUF: usize = 64 * 1024;
/// The host agent's answer (it connects with a timeout of its own).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const CHAIN: &str = "BERTH-HOST";

/// Where the rules are written for `iptables-restore`.
const RULES: &str = "/run/berth/hostloop.rules";

/// The nat rules (for `iptables-restore --noflush`) that send TCP for
/// `gateway` to [`LISTEN_PORT`], from containers (PREROUTING) and guest
/// processes (OUTPUT). dockerd's own rules are left alone.
pub fn rules(gateway: Ipv4Addr) -> String {
    format!(
        "*nat\n\
         :{CHAIN} - [0:0]\n\
         -A {CHAIN} -d {gateway}/32 -p tcp -j REDIRECT --to-ports {LISTEN_PORT}\n\
         -I PREROUTING 1 -j {CHAIN}\n\
         -I OUTPUT 1 -j {CHAIN}\n\
         COMMIT\n"
    )
}

/// Installs the redirect and serves it. Errors if either fails; the guest
/// then reaches the host's loopback through passt alone.
pub async fn start(reaper: &crate::reaper::Reaper, gateway: Ipv4Addr) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, LISTEN_PORT)).await?;
    std::fs::write(RULES, rules(gateway))?;
    let out = crate::process::run(reaper, "iptables-restore", &["--noflush", RULES]).await?;
    if !out.exit.success() {
        anyhow::bail!("iptables-restore failed: {}", out.text.trim());
    }
    tokio::spawn(serve(listener, gateway));
    Ok(())
}

async fn serve(listener: TcpListener, gateway: Ipv4Addr) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    let log = Arc::new(std::sync::Mutex::new(RateLimiter::default()));
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                crate::vsock::accept_failed(LISTEN_PORT as u32, e).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            reset(client);
            continue;
        };
        let log = log.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = relay(client, gateway).await {
                if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                    tracing::info!("connection to the host's loopback: {e}{s}");
                }
            }
        });
    }
}

/// Ends a client connection with a reset, as a refused port would.
fn reset(client: TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &client.as_fd(),
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(client);
}

/// Where the client wanted to go, before the redirect.
fn original_dst(client: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let sin =
        nix::sys::socket::getsockopt(&client.as_fd(), nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

async fn relay(mut client: TcpStream, gateway: Ipv4Addr) -> anyhow::Result<()> {
    let dst = original_dst(&client)?;
    // Only what the redirect sent here: a direct connection to this port
    // names no host port.
    if *dst.ip() != gateway {
        reset(client);
        anyhow::bail!("not redirected (to {dst})");
    }
    let host = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, HOST_CONNECT_PORT)).await;
    let mut host = match host {
        Ok(h) => h,
        Err(e) => {
            reset(client);
            anyhow::bail!("the host agent is unreachable: {e}");
        }
    };
    let req = HostConnect { port: dst.port() };
    host.write_all(req.encode().as_bytes()).await?;
    // The answer line, read byte by byte: what follows is the stream's.
    let mut line = Vec::with_capacity(32);
    let answer = async {
        let mut r = tokio::io::BufReader::with_capacity(1, &mut host);
        r.read_until(b'\n', &mut line).await
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(_)) if line == b"OK\n" => {}
        _ => {
            reset(client);
            anyhow::bail!(
                "host port {}: {}",
                dst.port(),
                String::from_utf8_lossy(&line).trim()
            );
        }
    }
    let _ = client.set_nodelay(true);
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut host, COPY_BUF, COPY_BUF).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_rules_name_the_gateway_only() {
        assert_eq!(
            rules(Ipv4Addr::new(192, 168, 127, 1)),
            "*nat\n:BERTH-HOST - [0:0]\n\
             -A BERTH-HOST -d 192.168.127.1/32 -p tcp -j REDIRECT --to-ports 1031\n\
             -I PREROUTING 1 -j BERTH-HOST\n-I OUTPUT 1 -j BERTH-HOST\nCOMMIT\n"
        );
    }
}

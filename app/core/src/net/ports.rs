//! Published ports on the host: for every port a running container
//! publishes (as the guest agent reports them, following dockerd's
//! events), the host agent binds the same address and port on the host and
//! joins each connection, or each UDP peer, to the guest agent over vsock
//! ([`FORWARD_PORT`]), which connects to the container.
//!
//! * `0.0.0.0` and `::` bind every host address, as Docker does on a Linux
//!   host; `127.0.0.1` and `::1` bind loopback only;
//! * a port already taken on the host is reported (status, log) and
//!   retried every few seconds; nothing else is affected;
//! * each port serves a bounded number of connections or UDP peers at once,
//!   with fixed buffers; a stuck client holds one slot, not memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_limits::RateLimiter;
use berth_proto::net::{encode_datagram, ForwardHeader};
use berth_proto::{Proto, PublishedPort, FORWARD_PORT};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::vsock;

/// Connections (or UDP peers) one published port serves at once, at most;
/// a process with fewer descriptors to spare gets a lower cap (two per
/// connection).
pub const MAX_PER_PORT: usize = 512;
/// Bytes buffered per direction of a forwarded connection.
const COPY_BUF: usize = 64 * 1024;
/// A UDP peer silent both ways this long loses its session.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued towards the guest per UDP peer; more are dropped.
const UDP_QUEUE: usize = 64;
/// How often a port that could not be bound is tried again.
const RETRY: Duration = Duration::from_secs(5);

type Key = (Proto, IpAddr, u16);

/// Counters of one forward.
#[derive(Debug, Default)]
pub struct PortStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
}

/// One forward as `berth status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
pub struct ForwardStatus {
    #[ts(type = "\"tcp\" | \"udp\"")]
    pub proto: Proto,
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container: String,
    pub container_port: u16,
    /// `active` (listening on the host) or `error`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub connections: u64,
    pub active_connections: u64,
}

#[derive(Debug)]
struct Entry {
    port: PublishedPort,
    task: Option<JoinHandle<()>>,
    error: Option<String>,
    stats: Arc<PortStats>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The host's forwards, kept equal to what the guest publishes.
#[derive(Debug)]
pub struct Forwards {
    vsock_sock: PathBuf,
    /// Connections or UDP peers per port at once.
    per_port: usize,
    entries: Mutex<HashMap<Key, Entry>>,
    log: Arc<Mutex<RateLimiter>>,
}

impl Forwards {
    pub fn new(vsock_sock: PathBuf) -> Arc<Forwards> {
        let cap = berth_limits::fds::connection_cap(
            berth_limits::fds::current_nofile_limit(),
            2,
            MAX_PER_PORT,
        );
        Forwards::with_cap(vsock_sock, cap)
    }

    /// Forwards that serve at most `per_port` connections per port.
    pub fn with_cap(vsock_sock: PathBuf, per_port: usize) -> Arc<Forwards> {
        Arc::new(Forwards {
            vsock_sock,
            per_port: per_port.max(1),
            entries: Mutex::new(HashMap::new()),
            log: Arc::new(Mutex::new(RateLimiter::default())),
        })
    }

    /// Makes the forwards match `ports`: new ones are bound, gone ones
    /// closed, unchanged ones left alone.
    pub fn reconcile(&self, ports: &[PublishedPort]) {
        let want: HashMap<Key, &PublishedPort> = ports
            .iter()
            .map(|p| ((p.proto, p.host_ip, p.host_port), p))
            .collect();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|k, e| {
            let keep = want.get(k).is_some_and(|p| **p == e.port);
            if !keep {
                tracing::info!(
                    "published port {} {}:{} removed",
                    e.port.proto,
                    e.port.host_ip,
                    e.port.host_port
                );
            }
            keep
        });
        for (k, p) in want {
            if entries.contains_key(&k) {
                continue;
            }
            let mut e = Entry {
                port: p.clone(),
                task: None,
                error: None,
                stats: Arc::new(PortStats::default()),
            };
            self.start(&mut e);
            entries.insert(k, e);
        }
    }

    /// Binds and serves `e`'s port, or records why it can't.
    fn start(&self, e: &mut Entry) {
        let p = &e.port;
        let addr = SocketAddr::new(p.host_ip, p.host_port);
        let ctx = Ctx {
            vsock_sock: self.vsock_sock.clone(),
            header: ForwardHeader {
                proto: p.proto,
                host_ip: p.host_ip,
                host_port: p.host_port,
            },
            stats: e.stats.clone(),
            log: self.log.clone(),
            cap: self.per_port,
        };
        let bound = match p.proto {
            Proto::Tcp => bind_tcp(addr).map(|l| tokio::spawn(serve_tcp(l, ctx))),
            Proto::Udp => bind_udp(addr).map(|s| tokio::spawn(serve_udp(s, ctx))),
        };
        match bound {
            Ok(task) => {
                tracing::info!(
                    "forwarding host {} {} to {} port {}",
                    p.proto,
                    addr,
                    p.container,
                    p.container_port
                );
                e.task = Some(task);
                e.error = None;
            }
            Err(err) => {
                let msg = bind_error(p, &err);
                if e.error.as_deref() != Some(&msg) {
                    tracing::warn!("{msg}");
                }
                e.error = Some(msg);
            }
        }
    }

    /// Tries again to bind the ports that failed.
    pub fn retry_failed(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries.values_mut().filter(|e| e.task.is_none()) {
            self.start(e);
        }
    }

    /// Every forward, sorted by port.
    pub fn status(&self) -> Vec<ForwardStatus> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<ForwardStatus> = entries
            .values()
            .map(|e| ForwardStatus {
                proto: e.port.proto,
                host_ip: e.port.host_ip,
                host_port: e.port.host_port,
                container: e.port.container.clone(),
                container_port: e.port.container_port,
                state: if e.task.is_some() { "active" } else { "error" }.into(),
                error: e.error.clone(),
                connections: e.stats.connections.load(Ordering::Relaxed),
                active_connections: e.stats.active.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|f| (f.host_port, f.proto, f.host_ip));
        v
    }

    /// Closes every forward (the VM is stopping).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// A bind failure, said for people.
fn bind_error(p: &PublishedPort, e: &std::io::Error) -> String {
    let what = format!(
        "cannot publish {} port {} on the host's {} (for container {} port {})",
        p.proto, p.host_port, p.host_ip, p.container, p.container_port
    );
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("{what}: the port is already in use by another program on the host")
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "{what}: ports below 1024 need privileges on this host (or a lower net.ipv4.ip_unprivileged_port_start)"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("{what}: the host has no such address")
        }
        _ => format!("{what}: {e}"),
    }
}

/// A socket for `addr`; `::` is IPv6 only, so it and `0.0.0.0` can both
/// be bound, as Docker binds both.
fn socket_for(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // socket2 creates sockets close-on-exec.
    s.set_nonblocking(true)?;
    Ok(s)
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket_for(addr, socket2::Type::STREAM)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket_for(addr, socket2::Type::DGRAM)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// What serving one forward needs.
#[derive(Debug, Clone)]
struct Ctx {
    vsock_sock: PathBuf,
    header: ForwardHeader,
    stats: Arc<PortStats>,
    log: Arc<Mutex<RateLimiter>>,
    cap: usize,
}

impl Ctx {
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if let Some(s) = self.log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
            tracing::warn!("{what}{s}");
        }
    }

    /// A vsock stream to the guest agent, header sent.
    async fn open(&self) -> Result<UnixStream, String> {
        let mut delay = Duration::from_millis(10);
        let mut s = loop {
            match vsock::connect(&self.vsock_sock, FORWARD_PORT).await {
                Ok(s) => break s,
                // A burst can overflow the guest's backlog: retry a little.
                Err(vsock::VsockError::Refused { .. }) if delay < Duration::from_secs(1) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        s.write_all(self.header.encode().as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        Ok(s)
    }
}

/// Serves one TCP forward until aborted.
async fn serve_tcp(listener: TcpListener, ctx: Ctx) {
    let slots = Arc::new(Semaphore::new(ctx.cap));
    let mut backoff = Duration::from_millis(50);
    loop {
        let client = match listener.accept().await {
            Ok((c, _)) => {
                backoff = Duration::from_millis(50);
                c
            }
            Err(e) => {
                ctx.warn(format_args!(
                    "published port {}: accept failed: {e}; pausing",
                    ctx.header.host_port
                ));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            ctx.warn(format_args!(
                "published port {}: {} connections already; closing a new one",
                ctx.header.host_port, ctx.cap
            ));
            continue;
        };
        ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            forward_tcp(client, &ctx).await;
        });
    }
}

async fn forward_tcp(mut client: TcpStream, ctx: &Ctx) {
    let _ = client.set_nodelay(true);
    let mut guest = match ctx.open().await {
        Ok(g) => g,
        Err(e) => {
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            ctx.warn(format_args!(
                "published port {}: cannot reach the guest: {e}",
                ctx.header.host_port
            ));
            return;
        }
    };
    ctx.stats.active.fetch_add(1, Ordering::Relaxed);
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut guest, COPY_BUF, COPY_BUF).await;
    ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
}

/// A UDP peer's session: datagrams from the peer go through `tx`.
#[derive(Debug)]
struct Session {
    tx: mpsc::Sender<Vec<u8>>,
}

/// Serves one UDP forward until aborted: a session (a vsock stream) per
/// peer, ended after [`UDP_IDLE`] without traffic either way.
async fn serve_udp(sock: UdpSocket, ctx: Ctx) {
    let sock = Arc::new(sock);
    let sessions: Arc<Mutex<HashMap<SocketAddr, Session>>> = Arc::default();
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let datagram = buf[..n].to_vec();
        let mut map = sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&peer) {
            // A full queue drops, as a congested link would.
            let _ = s.tx.try_send(datagram);
            continue;
        }
        if map.len() >= ctx.cap {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let (tx, rx) = mpsc::channel(UDP_QUEUE);
        let _ = tx.try_send(datagram);
        map.insert(peer, Session { tx });
        drop(map);
        ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
        let (ctx, sock, sessions) = (ctx.clone(), sock.clone(), sessions.clone());
        tokio::spawn(async move {
            ctx.stats.active.fetch_add(1, Ordering::Relaxed);
            match ctx.open().await {
                Ok(guest) => udp_session(guest, rx, &sock, peer).await,
                Err(e) => {
                    ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
                    ctx.warn(format_args!(
                        "published port {}/udp: cannot reach the guest: {e}",
                        ctx.header.host_port
                    ));
                }
            }
            ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
            sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&peer);
        });
    }
}

/// Relays one peer's datagrams until neither side has sent any for
/// [`UDP_IDLE`] or the guest closes the stream.
async fn udp_session<S>(
    guest: S,
    mut rx: mpsc::Receiver<Vec<u8>>,
    sock: &UdpSocket,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(guest);
    let mut framed = Vec::with_capacity(65537);
    let mut back = vec![0u8; 65535];
    loop {
        tokio::select! {
            d = tokio::time::timeout(UDP_IDLE, rx.recv()) => {
                let Ok(Some(d)) = d else { return };
                framed.clear();
                if encode_datagram(&d, &mut framed) && wr.write_all(&framed).await.is_err() {
                    return;
                }
            }
            len = rd.read_u16() => {
                let Ok(len) = len else { return };
                let b = &mut back[..len as usize];
                if rd.read_exact(b).await.is_err() {
                    return;
                }
                let _ = sock.send_to(b, peer).await;
            }
        }
    }
}

/// Follows the guest's published ports (`watch_ports` on the control
/// port) and keeps `forwards` equal to them, until the task is dropped.
/// Reconnects when the guest agent's connection ends (e.g. a restart).
pub async fn follow(vsock_sock: PathBuf, forwards: Arc<Forwards>) {
    let mut log = RateLimiter::default();
    let mut retry = tokio::time::interval(RETRY);
    loop {
        let watch = crate::guest::GuestClient::connect(&vsock_sock, "berth-host-agent ports")
            .await
            .map_err(|e| e.to_string());
        let mut watch = match watch {
            Ok(c) => match c.watch_ports().await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(s) = log.hit() {
                        tracing::warn!("watching published ports: {e}{s}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            Err(e) => {
                if let Some(s) = log.hit() {
                    tracing::warn!("watching published ports: {e}{s}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Frames are read on a task of their own: a read cut short by the
        // retry timer would lose its place in the stream.
        let (tx, mut rx) = mpsc::channel(4);
        let reader = tokio::spawn(async move {
            loop {
                let r = watch.next().await.map_err(|e| e.to_string());
                let end = r.is_err();
                if tx.send(r).await.is_err() || end {
                    return;
                }
            }
        });
        loop {
            tokio::select! {
                ports = rx.recv() => match ports {
                    Some(Ok(p)) => forwards.reconcile(&p),
                    Some(Err(e)) => {
                        if let Some(s) = log.hit() {
                            tracing::warn!("published ports stream ended: {e}{s}");
                        }
                        break;
                    }
                    None => break,
                },
                _ = retry.tick() => forwards.retry_failed(),
            }
        }
        reader.abort();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(proto: Proto, ip: &str, host_port: u16) -> PublishedPort {
        PublishedPort {
            proto,
            host_ip: ip.parse().unwrap(),
            host_port,
            container_port: 80,
            container: "web".into(),
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn reconcile_binds_reports_conflicts_and_removes() {
        let f = Forwards::new("/nonexistent/vsock.sock".into());
        let p = free_port();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        f.reconcile(&[
            port(Proto::Tcp, "127.0.0.1", p),
            port(Proto::Udp, "127.0.0.1", p),
            port(Proto::Tcp, "127.0.0.1", busy),
        ]);
        let st = f.status();
        assert_eq!(st.len(), 3);
        let bad = st.iter().find(|s| s.host_port == busy).unwrap();
        assert_eq!(bad.state, "error");
        assert!(
            bad.error.as_deref().unwrap().contains("already in use"),
            "{bad:?}"
        );
        assert!(st
            .iter()
            .filter(|s| s.host_port == p)
            .all(|s| s.state == "active"));
        // The host port is really bound now.
        assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_err());
        // Once the other program lets go, a retry takes the port.
        drop(taken);
        f.retry_failed();
        assert!(f.status().iter().all(|s| s.state == "active"));
        // Removed from the list: the host port is free again.
        f.reconcile(&[]);
        assert!(f.status().is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
    }

    #[tokio::test]
    async fn any_address_binds_v4_and_v6_separately() {
        let f = Forwards::new("/nonexistent/vsock.sock".into());
        let p = free_port();
        f.reconcile(&[port(Proto::Tcp, "0.0.0.0", p), port(Proto::Tcp, "::", p)]);
        let st = f.status();
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(st.iter().all(|s| s.state == "active"), "{st:?}");
        }
        assert_eq!(st[0].state, "active", "{st:?}");
    }

    /// A stand-in for the VM's `vsock.sock`: answers every `CONNECT` with
    /// `OK`, then holds the stream without reading (a stuck container).
    fn holding_guest(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                let mut line = [0u8; 32];
                let _ = s.read(&mut line).await;
                let _ = s.write_all(b"OK 1\n").await;
                held.push(s);
            }
        });
        path
    }

    /// Beyond the per-port cap a connection is closed at once, while the
    /// held ones stay open.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed() {
        let dir = std::env::temp_dir().join(format!("berth-ports-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = Forwards::with_cap(holding_guest(&dir), 8);
        let p = free_port();
        f.reconcile(&[port(Proto::Tcp, "127.0.0.1", p)]);
        let mut open = Vec::new();
        for _ in 0..8 {
            let mut c = TcpStream::connect(("127.0.0.1", p)).await.unwrap();
            c.write_all(b"x").await.unwrap();
            open.push(c);
        }
        // Wait until the forwarder took all eight.
        for _ in 0..100 {
            if f.status()[0].active_connections == 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(f.status()[0].active_connections, 8, "{:?}", f.status());
        let mut extra = TcpStream::connect(("127.0.0.1", p)).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
            .await
            .expect("closed, not held")
            .unwrap_or(0);
        assert_eq!(n, 0, "the ninth connection is closed");
        assert_eq!(f.status()[0].active_connections, 8, "the others still held");
        drop(open);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A UDP session relays datagrams both ways over a stream.
    #[tokio::test]
    async fn udp_sessions_frame_datagrams() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer = peer_sock.local_addr().unwrap();
        let (guest_end, mut agent) = tokio::io::duplex(4096);
        let (tx, rx) = mpsc::channel(4);
        let s = tokio::spawn(async move { udp_session(guest_end, rx, &sock, peer).await });
        tx.send(b"ping".to_vec()).await.unwrap();
        let mut got = [0u8; 6];
        agent.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, &[0, 4, b'p', b'i', b'n', b'g']);
        agent
            .write_all(&[0, 4, b'p', b'o', b'n', b'g'])
            .await
            .unwrap();
        let mut back = [0u8; 16];
        let n = peer_sock.recv(&mut back).await.unwrap();
        assert_eq!(&back[..n], b"pong");
        drop(agent);
        s.await.unwrap();
    }
}

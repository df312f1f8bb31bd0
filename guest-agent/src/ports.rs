//! Published ports: the agent follows dockerd's event stream, keeps the
//! table of ports running containers publish, reports it to the host agent
//! (`watch_ports` on the control port) and serves the host's forwarded
//! connections on vsock port [`FORWARD_PORT`], joining each to the
//! container's address inside the guest.
//!
//! The target is looked up here, when the connection arrives, so a host
//! that is a step behind can never reach a port no container publishes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use berth_limits::RateLimiter;
use berth_proto::net::{ForwardHeader, MAX_FORWARD_HEADER};
use berth_proto::{Proto, PublishedPort, FORWARD_PORT};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::daemons::DOCKER_SOCKET;

/// Connections forwarded at once (each holds a vsock and a TCP socket).
const MAX_FORWARDS: usize = 2048;
/// Bytes buffered per direction of a forwarded TCP connection.
const COPY_BUF: usize = 64 * 1024;
/// A UDP session with no datagram either way for this long ends.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long the host may take to send its header line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A container's listen backlog can be short (busybox httpd: 9) and
/// its SYNs retried by the kernel; the client waits as it would for any
/// slow server, up to about the kernel's own SYN retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// dockerd can announce an event a moment before its container list shows
/// it: the list is read again this much later.
const SETTLE: Duration = Duration::from_millis(300);

/// Where a published port leads inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
}

type Key = (Proto, IpAddr, u16);

/// The ports running containers publish, and where each leads.
#[derive(Debug)]
pub struct Table {
    targets: RwLock<HashMap<Key, Target>>,
    list: watch::Sender<Vec<PublishedPort>>,
}

impl Table {
    pub fn new() -> Arc<Table> {
        Arc::new(Table {
            targets: RwLock::new(HashMap::new()),
            list: watch::channel(Vec::new()).0,
        })
    }

    /// Replaces the table; watchers hear of it only if the list changed.
    pub fn set(&self, entries: Vec<(PublishedPort, Target)>) {
        let mut list: Vec<PublishedPort> = entries.iter().map(|(p, _)| p.clone()).collect();
        list.sort();
        list.dedup();
        let targets = entries
            .into_iter()
            .map(|(p, t)| ((p.proto, p.host_ip, p.host_port), t))
            .collect();
        *self.targets.write().unwrap_or_else(|e| e.into_inner()) = targets;
        self.list.send_if_modified(|cur| {
            if *cur == list {
                false
            } else {
                *cur = list;
                true
            }
        });
    }

    pub fn lookup(&self, h: &ForwardHeader) -> Option<Target> {
        self.targets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(h.proto, h.host_ip, h.host_port))
            .copied()
    }

    /// The current list and its changes.
    pub fn watch(&self) -> watch::Receiver<Vec<PublishedPort>> {
        self.list.subscribe()
    }
}

/// Reads dockerd's `/containers/json` answer into published ports.
pub fn parse_containers(json: &serde_json::Value) -> Vec<(PublishedPort, Target)> {
    let mut out = Vec::new();
    for c in json.as_array().map(Vec::as_slice).unwrap_or_default() {
        let name = c["Names"][0]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned();
        // The container's address on its first network that has one.
        let ip = c["NetworkSettings"]["Networks"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|n| n["IPAddress"].as_str())
            .find_map(|s| s.parse::<IpAddr>().ok());
        let Some(ip) = ip else { continue };
        for p in c["Ports"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(public), Some(private)) =
                (p["PublicPort"].as_u64(), p["PrivatePort"].as_u64())
            else {
                continue;
            };
            let (Ok(host_port), Ok(container_port)) =
                (u16::try_from(public), u16::try_from(private))
            else {
                continue;
            };
            let Some(proto) = p["Type"].as_str().and_then(|t| t.parse::<Proto>().ok()) else {
                continue;
            };
            let host_ip = p["IP"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("0.0.0.0")
                .parse::<IpAddr>();
            let Ok(host_ip) = host_ip else { continue };
            if host_port == 0 {
                continue;
            }
            out.push((
                PublishedPort {
                    proto,
                    host_ip,
                    host_port,
                    container_port,
                    container: name.clone(),
                },
                Target {
                    addr: SocketAddr::new(ip, container_port),
                },
            ));
        }
    }
    out
}

/// Lists the running containers' published ports.
async fn list_ports() -> Result<Vec<(PublishedPort, Target)>, crate::docker_api::ApiError> {
    let body = crate::docker_api::call_ok(
        DOCKER_SOCKET,
        hyper::Method::GET,
        "/containers/json",
        None,
        Duration::from_secs(30),
    )
    .await?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(parse_containers(&json))
}

/// The events that can change the table: `{"event":["start","restart",
/// "die","stop","kill","destroy","rename","pause","unpause","connect",
/// "disconnect"]}`.
const EVENTS_PATH: &str = "/events?filters=%7B%22event%22%3A%5B%22start%22%2C%22restart%22%2C%22die%22%2C%22stop%22%2C%22kill%22%2C%22destroy%22%2C%22rename%22%2C%22pause%22%2C%22unpause%22%2C%22connect%22%2C%22disconnect%22%5D%7D";

/// Follows dockerd's events and keeps `table` current, for as long as
/// the agent lives; reconnects (and re-lists) when the stream ends.
pub async fn follow(table: Arc<Table>) {
    let mut log = RateLimiter::default();
    loop {
        if let Err(e) = follow_once(&table).await {
            if let Some(s) = log.hit() {
                tracing::warn!("following dockerd's events for published ports: {e}{s}");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow_once(table: &Table) -> anyhow::Result<()> {
    let stream = UnixStream::connect(DOCKER_SOCKET).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(EVENTS_PATH)
        .header("Host", "docker")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        anyhow::bail!("dockerd answered {} to /events", resp.status());
    }
    // Subscribed first, listed second: nothing that happens in between is
    // missed.
    table.set(list_ports().await?);
    let mut body = resp.into_body();
    loop {
        let Some(frame) = body.frame().await else {
            anyhow::bail!("dockerd ended the event stream");
        };
        let frame = frame?;
        if frame.data_ref().is_some_and(|d| d.contains(&b'\n')) {
            // Any of the events above may change the table; a burst of
            // them is read before listing once.
            while let Ok(Some(more)) =
                tokio::time::timeout(Duration::from_millis(20), body.frame()).await
            {
                more?;
            }
            table.set(list_ports().await?);
            // And once more when dockerd's own view has settled, unless
            // more events came meanwhile (then the loop lists anyway).
            match tokio::time::timeout(SETTLE, body.frame()).await {
                Err(_) => table.set(list_ports().await?),
                Ok(None) => anyhow::bail!("dockerd ended the event stream"),
                Ok(Some(more)) => {
                    more?;
                    table.set(list_ports().await?);
                }
            }
        }
    }
}

/// Serves the host's forwarded connections on vsock [`FORWARD_PORT`].
pub fn serve(table: Arc<Table>) {
    let listener = match crate::vsock::listen(FORWARD_PORT) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("vsock forward port {FORWARD_PORT} unavailable: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_FORWARDS));
    tokio::spawn(async move {
        let log = Arc::new(std::sync::Mutex::new(RateLimiter::default()));
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        // Closed at once: the host's client sees a reset.
                        continue;
                    };
                    let table = table.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = forward(stream, &table).await {
                            if let Some(s) = log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                                tracing::info!("forwarded connection: {e}{s}");
                            }
                        }
                    });
                }
                Err(e) => crate::vsock::accept_failed(FORWARD_PORT, e).await,
            }
        }
    });
}

/// Reads the header line byte by byte: what follows is the stream's.
async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<ForwardHeader> {
    let mut line = Vec::with_capacity(32);
    let read = async {
        loop {
            let b = s.read_u8().await?;
            if b == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            if line.len() >= MAX_FORWARD_HEADER {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            line.push(b);
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read).await??;
    std::str::from_utf8(&line)
        .ok()
        .and_then(ForwardHeader::parse)
        .ok_or_else(|| anyhow::anyhow!("bad header {:?}", String::from_utf8_lossy(&line)))
}

async fn forward<S>(mut stream: S, table: &Table) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let h = read_header(&mut stream).await?;
    let Some(t) = table.lookup(&h) else {
        anyhow::bail!(
            "no container publishes {} {}:{}",
            h.proto,
            h.host_ip,
            h.host_port
        );
    };
    match h.proto {
        Proto::Tcp => {
            let mut tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(t.addr))
                .await
                .map_err(|_| anyhow::anyhow!("connecting to {} timed out", t.addr))??;
            let _ = tcp.set_nodelay(true);
            tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, COPY_BUF, COPY_BUF)
                .await?;
            Ok(())
        }
        Proto::Udp => udp_session(stream, t.addr).await,
    }
}

/// One UDP peer of the host: framed datagrams on `stream` both ways, a
/// connected UDP socket to the container, ended after [`UDP_IDLE`].
pub async fn udp_session<S>(stream: S, target: SocketAddr) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(target).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut from_host = vec![0u8; 65535];
    let mut from_container = vec![0u8; 65535];
    let mut framed = Vec::with_capacity(65537);
    loop {
        tokio::select! {
            r = tokio::time::timeout(UDP_IDLE, rd.read_u16()) => {
                let Ok(Ok(len)) = r else { return Ok(()) };
                let buf = &mut from_host[..len as usize];
                rd.read_exact(buf).await?;
                // A container that is not listening answers with ICMP,
                // which a connected socket reports on a later call.
                let _ = sock.send(buf).await;
            }
            r = sock.recv(&mut from_container) => {
                let n = match r {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                framed.clear();
                berth_proto::net::encode_datagram(&from_container[..n], &mut framed);
                wr.write_all(&framed).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_dockerd_lists() {
        let json: serde_json::Value = serde_json::from_str(
            r#"[
              {"Names":["/web"],"Ports":[
                 {"IP":"0.0.0.0","PrivatePort":80,"PublicPort":8080,"Type":"tcp"},
                 {"IP":"::","PrivatePort":80,"PublicPort":8080,"Type":"tcp"},
                 {"PrivatePort":443,"Type":"tcp"},
                 {"IP":"127.0.0.1","PrivatePort":53,"PublicPort":5353,"Type":"udp"},
                 {"IP":"0.0.0.0","PrivatePort":1,"PublicPort":70000,"Type":"tcp"},
                 {"IP":"0.0.0.0","PrivatePort":1,"PublicPort":9,"Type":"sctp"}],
               "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.2"}}}},
              {"Names":["/nonet"],"Ports":[{"IP":"0.0.0.0","PrivatePort":1,"PublicPort":2,"Type":"tcp"}],
               "NetworkSettings":{"Networks":{"none":{"IPAddress":""}}}},
              "garbage"
            ]"#,
        )
        .unwrap();
        let got = parse_containers(&json);
        let shown: Vec<String> = got
            .iter()
            .map(|(p, t)| {
                format!(
                    "{} {}:{} -> {} {}",
                    p.proto, p.host_ip, p.host_port, p.container, t.addr
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "tcp 0.0.0.0:8080 -> web 172.17.0.2:80",
                "tcp :::8080 -> web 172.17.0.2:80",
                "udp 127.0.0.1:5353 -> web 172.17.0.2:53",
            ]
        );
        assert!(parse_containers(&serde_json::json!({"not": "a list"})).is_empty());
    }

    #[tokio::test]
    async fn table_changes_reach_watchers_once() {
        let t = Table::new();
        let mut w = t.watch();
        let entry = |port| {
            (
                PublishedPort {
                    proto: Proto::Tcp,
                    host_ip: "0.0.0.0".parse().unwrap(),
                    host_port: port,
                    container_port: 80,
                    container: "web".into(),
                },
                Target {
                    addr: "172.17.0.2:80".parse().unwrap(),
                },
            )
        };
        t.set(vec![entry(8080)]);
        assert!(w.has_changed().unwrap());
        assert_eq!(w.borrow_and_update().len(), 1);
        t.set(vec![entry(8080)]);
        assert!(!w.has_changed().unwrap(), "same list: no news");
        let h = ForwardHeader {
            proto: Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 8080,
        };
        assert!(t.lookup(&h).is_some());
        t.set(vec![]);
        assert!(t.lookup(&h).is_none());
    }

    /// A forwarded TCP connection reaches the target after its header.
    #[tokio::test]
    async fn tcp_forward_reaches_the_target_and_unknown_ports_are_refused() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let table = Table::new();
        table.set(vec![(
            PublishedPort {
                proto: Proto::Tcp,
                host_ip: "127.0.0.1".parse().unwrap(),
                host_port: 9000,
                container_port: addr.port(),
                container: "x".into(),
            },
            Target { addr },
        )]);
        let (mut host, agent) = tokio::io::duplex(1024);
        let t = table.clone();
        let fwd = tokio::spawn(async move { forward(agent, &t).await });
        host.write_all(b"tcp 127.0.0.1 9000\nhello").await.unwrap();
        let mut back = [0u8; 5];
        host.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        drop(host);
        fwd.await.unwrap().unwrap();

        let (mut host, agent) = tokio::io::duplex(1024);
        host.write_all(b"tcp 127.0.0.1 9001\n").await.unwrap();
        assert!(forward(agent, &table).await.is_err());
        let (mut host, agent) = tokio::io::duplex(1024);
        host.write_all(&[b'x'; 100]).await.unwrap();
        assert!(forward(agent, &table).await.is_err());
    }

    #[tokio::test]
    async fn udp_sessions_carry_datagrams_both_ways() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 100];
            let (n, peer) = echo.recv_from(&mut buf).await.unwrap();
            echo.send_to(&buf[..n], peer).await.unwrap();
        });
        let (mut host, agent) = tokio::io::duplex(1024);
        let s = tokio::spawn(udp_session(agent, addr));
        host.write_all(&[0, 4, b'p', b'i', b'n', b'g'])
            .await
            .unwrap();
        let mut back = [0u8; 6];
        host.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, &[0, 4, b'p', b'i', b'n', b'g']);
        drop(host);
        s.await.unwrap().unwrap();
    }
}

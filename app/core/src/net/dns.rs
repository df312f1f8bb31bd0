//! The host's answers to the guest's DNS queries.
//!
//! The guest agent relays every query its resolver receives (from the
//! guest and from containers on any network) over vsock to host port
//! [`berth_proto::DNS_PORT`], which the VM's vsock device joins to
//! `vsock.sock_1026`, where this listens. Each query is answered with:
//!
//! 1. `host.docker.internal` and `gateway.docker.internal`: the guest's
//!    router, which passt maps to the host's loopback;
//! 2. names in the host's `/etc/hosts` (A and AAAA), a loopback address
//!    turned into that router, since from a container the host's loopback
//!    is reached there;
//! 3. everything else: the query as it came, sent to the host's own
//!    nameservers (`dns_servers` in config.toml, else `/etc/resolv.conf`),
//!    their answer passed back. Queries leave from the host, so a VPN's
//!    resolver and routes apply as they do for any host program.
//!
//! Work is bounded: connections, queries in flight, and each upstream
//! exchange's time.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_limits::RateLimiter;
use berth_proto::net::DnsTransport;
use berth_proto::{read_dns_frame, DnsFrame, NetConfig};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket, UnixListener};
use tokio::sync::{mpsc, Semaphore};

/// Queries answered at once per VM; more wait for a slot.
const MAX_IN_FLIGHT: usize = 128;
/// Relay connections at once (the agent keeps one).
const MAX_CONNECTIONS: usize = 4;
/// One upstream server's time to answer, per attempt.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// TTL of the answers Berth makes itself.
const LOCAL_TTL: u32 = 60;
/// Names that lead to the host.
const HOST_NAMES: [&str; 2] = ["host.docker.internal", "gateway.docker.internal"];

/// Where names come from.
#[derive(Debug)]
pub struct Resolver {
    /// The guest's routers (IPv4, and IPv6 if it has one).
    gateway4: IpAddr,
    gateway6: Option<IpAddr>,
    /// Fixed upstream servers (`dns_servers`); empty: the host's own.
    servers: Vec<SocketAddr>,
    hosts_path: PathBuf,
    resolv_path: PathBuf,
    hosts: Mutex<Cached<Vec<(String, IpAddr)>>>,
    resolv: Mutex<Cached<Vec<SocketAddr>>>,
    log: Mutex<RateLimiter>,
}

/// A file's parsed contents, re-read when its modification time changes.
#[derive(Debug, Default)]
struct Cached<T> {
    mtime: Option<SystemTime>,
    value: T,
}

impl<T: Default> Cached<T> {
    fn get(&mut self, path: &Path, parse: impl Fn(&str) -> T) -> &T {
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime != self.mtime || mtime.is_none() {
            self.value = std::fs::read_to_string(path)
                .map(|t| parse(&t))
                .unwrap_or_default();
            self.mtime = mtime;
        }
        &self.value
    }
}

/// `/etc/hosts` entries: (lower-case name, address).
pub fn parse_hosts(text: &str) -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut f = line.split_whitespace();
        let Some(Ok(ip)) = f.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in f {
            out.push((name.trim_end_matches('.').to_ascii_lowercase(), ip));
        }
    }
    out
}

/// `/etc/resolv.conf` nameservers, on port 53.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then_some(())?;
            // A link-local IPv6 server carries a zone (`fe80::1%eth0`),
            // which an address here can't: skip it.
            f.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

impl Resolver {
    pub fn new(net: &NetConfig, servers: Vec<SocketAddr>) -> Resolver {
        Resolver {
            gateway4: net.gateway4.into(),
            gateway6: net.ipv6.map(|v| v.gateway.into()),
            servers,
            hosts_path: PathBuf::from("/etc/hosts"),
            resolv_path: PathBuf::from("/etc/resolv.conf"),
            hosts: Mutex::new(Cached::default()),
            resolv: Mutex::new(Cached::default()),
            log: Mutex::new(RateLimiter::default()),
        }
    }

    /// Reads names and servers from these files instead of `/etc` (tests).
    pub fn with_files(mut self, hosts: PathBuf, resolv: PathBuf) -> Resolver {
        self.hosts_path = hosts;
        self.resolv_path = resolv;
        self
    }

    /// The upstream servers now.
    fn upstream(&self) -> Vec<SocketAddr> {
        if !self.servers.is_empty() {
            return self.servers.clone();
        }
        self.resolv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.resolv_path, parse_resolv_conf)
            .clone()
    }

    /// A host address as the guest reaches it: loopback is the router.
    fn guest_view(&self, ip: IpAddr) -> Option<IpAddr> {
        if !ip.is_loopback() {
            return Some(ip);
        }
        match ip {
            IpAddr::V4(_) => Some(self.gateway4),
            IpAddr::V6(_) => self.gateway6,
        }
    }

    /// The addresses Berth itself knows for `name`, or `None` if it is not
    /// one of its names (then upstream decides).
    fn local_addresses(&self, name: &str) -> Option<Vec<IpAddr>> {
        if HOST_NAMES.contains(&name) {
            return Some(
                std::iter::once(self.gateway4)
                    .chain(self.gateway6)
                    .collect(),
            );
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let found: Vec<IpAddr> = hosts
            .get(&self.hosts_path, parse_hosts)
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, ip)| self.guest_view(*ip))
            .collect();
        (!found.is_empty()).then_some(found)
    }

    /// Answers from Berth's own names, if the query is for one of them.
    pub fn answer_locally(&self, query: &Message) -> Option<Message> {
        let [q] = query.queries.as_slice() else {
            return None;
        };
        if q.query_class() != DNSClass::IN {
            return None;
        }
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let addrs = self.local_addresses(&name)?;
        let mut r = Message::response(query.metadata.id, query.metadata.op_code);
        r.metadata.recursion_desired = query.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.metadata.authoritative = true;
        r.add_query(q.clone());
        for ip in addrs {
            let data = match (q.query_type(), ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            r.add_answer(Record::from_rdata(q.name().clone(), LOCAL_TTL, data));
        }
        Some(r)
    }

    /// The answer to one relayed query (the DNS message bytes), or `None`
    /// when the query is not worth an answer (unparseable).
    pub async fn resolve(&self, query: &[u8], transport: DnsTransport) -> Option<Vec<u8>> {
        let parsed = match Message::from_vec(query) {
            Ok(m) if m.metadata.message_type == MessageType::Query => m,
            _ => return None,
        };
        if let Some(local) = self.answer_locally(&parsed) {
            tracing::debug!(
                "DNS {:?} id {} answered here ({} records)",
                parsed
                    .queries
                    .first()
                    .map(|q| (q.name().to_string(), q.query_type())),
                parsed.metadata.id,
                local.answers.len()
            );
            return local.to_vec().ok();
        }
        for server in self.upstream() {
            let r = match transport {
                DnsTransport::Udp => udp_exchange(server, query).await,
                DnsTransport::Tcp => tcp_exchange(server, query).await,
            };
            match r {
                Ok(answer) => return Some(answer),
                Err(e) => {
                    if let Some(s) = self.log.lock().unwrap_or_else(|e| e.into_inner()).hit() {
                        tracing::warn!("DNS server {server} did not answer: {e}{s}");
                    }
                }
            }
        }
        let mut fail = Message::error_msg(
            parsed.metadata.id,
            parsed.metadata.op_code,
            ResponseCode::ServFail,
        );
        fail.add_queries(parsed.queries.iter().cloned());
        fail.to_vec().ok()
    }
}

/// One query to `server` over UDP; the answer must carry the query's id.
async fn udp_exchange(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let wait = async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if n >= 2 && buf[..2] == query[..2] {
                return Ok::<_, std::io::Error>(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, wait)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// One query to `server` over TCP.
async fn tcp_exchange(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut s = TcpStream::connect(server).await?;
        let len = u16::try_from(query.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(query).await?;
        let n = s.read_u16().await? as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Serves the relay on `listener` (`vsock.sock_1026`) until dropped.
pub async fn serve(listener: UnixListener, resolver: Arc<Resolver>) {
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let work = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("DNS relay: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let resolver = resolver.clone();
        let work = work.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (mut rd, mut wr) = stream.into_split();
            let (tx, mut rx) = mpsc::channel::<DnsFrame>(MAX_IN_FLIGHT);
            let writer = tokio::spawn(async move {
                while let Some(f) = rx.recv().await {
                    if wr.write_all(&f.encode()).await.is_err() {
                        return;
                    }
                }
            });
            while let Ok(Some(frame)) = read_dns_frame(&mut rd).await {
                let Ok(slot) = work.clone().acquire_owned().await else {
                    break;
                };
                let resolver = resolver.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Some(message) = resolver.resolve(&frame.message, frame.transport).await {
                        let _ = tx
                            .send(DnsFrame {
                                tag: frame.tag,
                                transport: frame.transport,
                                message,
                            })
                            .await;
                    }
                });
            }
            drop(tx);
            let _ = writer.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::Name;

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn resolver(dir: &Path, hosts: &str, resolv: &str) -> Resolver {
        std::fs::write(dir.join("hosts"), hosts).unwrap();
        std::fs::write(dir.join("resolv.conf"), resolv).unwrap();
        Resolver::new(&NetConfig::berth_default(true), Vec::new())
            .with_files(dir.join("hosts"), dir.join("resolv.conf"))
    }

    fn answers(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn parses_hosts_and_resolv_conf() {
        let h = parse_hosts("127.0.0.1 localhost vm\n# c\n10.1.2.3 Box.Lan. box # x\nbad line\n");
        assert_eq!(h.len(), 4);
        assert_eq!(h[2], ("box.lan".into(), "10.1.2.3".parse().unwrap()));
        let r = parse_resolv_conf(
            "search x\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver ::1\n",
        );
        assert_eq!(
            r,
            vec![
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn host_names_and_etc_hosts_are_answered_here() {
        let dir = std::env::temp_dir().join(format!("berth-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = resolver(&dir, "127.0.0.1 devbox\n::1 devbox\n10.9.8.7 nas\n", "");
        let a = r
            .answer_locally(&query("host.docker.internal.", RecordType::A))
            .unwrap();
        assert_eq!(answers(&a), ["192.168.127.1"]);
        assert_eq!(a.metadata.id, 0x4242);
        assert_eq!(a.metadata.message_type, MessageType::Response);
        let aaaa = r
            .answer_locally(&query("Gateway.Docker.Internal", RecordType::AAAA))
            .unwrap();
        assert_eq!(answers(&aaaa), ["fd00:b5:127::1"]);
        // Loopback on the host is the router from the guest.
        let d = r.answer_locally(&query("devbox.", RecordType::A)).unwrap();
        assert_eq!(answers(&d), ["192.168.127.1"]);
        let d6 = r
            .answer_locally(&query("devbox.", RecordType::AAAA))
            .unwrap();
        assert_eq!(answers(&d6), ["fd00:b5:127::1"]);
        let n = r.answer_locally(&query("nas.", RecordType::A)).unwrap();
        assert_eq!(answers(&n), ["10.9.8.7"]);
        // Known name, other type: an empty answer, not a forward.
        let mx = r.answer_locally(&query("nas.", RecordType::MX)).unwrap();
        assert!(mx.answers.is_empty());
        assert!(r
            .answer_locally(&query("example.test.", RecordType::A))
            .is_none());
        // Edits to /etc/hosts apply without a restart.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("hosts"), "10.0.0.5 nas\n").unwrap();
        let filetime = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(dir.join("hosts"))
            .unwrap()
            .set_modified(filetime)
            .unwrap();
        let n = r.answer_locally(&query("nas.", RecordType::A)).unwrap();
        assert_eq!(answers(&n), ["10.0.0.5"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Other names go to the upstream server verbatim (a server on
    /// loopback that the test runs), over UDP and over TCP; with no server
    /// answering, SERVFAIL.
    #[tokio::test]
    async fn other_names_go_upstream() {
        let dir = std::env::temp_dir().join(format!("berth-dns-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let answer = |q: &[u8]| {
            let m = Message::from_vec(q).unwrap();
            let mut r = Message::response(m.metadata.id, OpCode::Query);
            r.add_queries(m.queries.clone());
            r.add_answer(Record::from_rdata(
                m.queries[0].name().clone(),
                5,
                RData::A(A("10.20.30.40".parse().unwrap())),
            ));
            r.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                udp.send_to(&answer(&buf[..n]), peer).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                let n = s.read_u16().await.unwrap() as usize;
                let mut q = vec![0u8; n];
                s.read_exact(&mut q).await.unwrap();
                let a = answer(&q);
                s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
                s.write_all(&a).await.unwrap();
            }
        });
        let r = resolver(&dir, "", "nameserver 127.0.0.1\n");
        let r = Resolver {
            servers: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            ..r
        };
        let q = query("example.test.", RecordType::A).to_vec().unwrap();
        for t in [DnsTransport::Udp, DnsTransport::Tcp] {
            let a = Message::from_vec(&r.resolve(&q, t).await.unwrap()).unwrap();
            assert_eq!(answers(&a), ["10.20.30.40"], "{t:?}");
            assert_eq!(a.metadata.id, 0x4242);
        }
        assert!(r.resolve(b"garbage", DnsTransport::Udp).await.is_none());
        // Nobody listens on this port: SERVFAIL after the timeout.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = Resolver {
            servers: vec![dead.local_addr().unwrap()],
            ..resolver(&dir, "", "")
        };
        let a = Message::from_vec(&r.resolve(&q, DnsTransport::Udp).await.unwrap()).unwrap();
        assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The guest's resolver: a relay on the guest's address, port 53 (UDP and
//! TCP), that passes every query to the host agent over vsock
//! ([`DNS_PORT`]) and the answers back. The host answers with the host's
//! own view of names (its resolver and `/etc/hosts`) plus
//! `host.docker.internal`, which is what VPN and split-DNS users expect.
//! Containers reach it on every network: it is the `nameserver` of the
//! guest's resolv.conf, which dockerd copies (default bridge) or forwards
//! to from its embedded DNS (user-defined networks).
//!
//! The agent does not parse DNS: it keeps a tag per query in flight
//! (bounded, expiring) and answers SERVFAIL itself when the host cannot be
//! reached, so clients fail fast instead of timing out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_limits::RateLimiter;
use berth_proto::net::DnsTransport;
use berth_proto::{read_dns_frame, DnsFrame, DNS_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// Queries waiting for the host at once; more are answered SERVFAIL.
const MAX_IN_FLIGHT: usize = 512;
/// A query the host has not answered by then is forgotten.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP clients at once, and how long one may sit idle.
const MAX_TCP_CLIENTS: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(30);

/// Where an answer goes.
#[derive(Debug, Clone)]
enum ReplyTo {
    Udp(SocketAddr),
    Tcp(mpsc::Sender<Vec<u8>>),
}

/// Who asked. Answers to one client leave in the order it asked: some
/// clients send their A and AAAA queries with the same id (busybox's
/// nslookup does when the guest clock is coarse, as under emulation) and
/// take the answers in order, while the host answers each query as soon
/// as it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    Udp(SocketAddr),
    Tcp(u64),
}

#[derive(Debug)]
struct Waiting {
    client: Client,
    reply: ReplyTo,
    since: Instant,
    /// Order of arrival.
    seq: u64,
    /// The answer, held until every earlier query of the client is done.
    answer: Option<Vec<u8>>,
}

/// Queries in flight, by tag.
#[derive(Debug, Default)]
struct InFlight {
    next_tag: u32,
    next_seq: u64,
    waiting: HashMap<u32, Waiting>,
}

/// Answers ready to go out.
type Ready = Vec<(ReplyTo, Vec<u8>)>;

impl InFlight {
    /// Registers a query; `None` when too many wait.
    fn add(&mut self, client: Client, reply: ReplyTo, now: Instant) -> (Option<u32>, Ready) {
        let ready = self.expire(now);
        if self.waiting.len() >= MAX_IN_FLIGHT {
            return (None, ready);
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_seq += 1;
        self.waiting.insert(
            self.next_tag,
            Waiting {
                client,
                reply,
                since: now,
                seq: self.next_seq,
                answer: None,
            },
        );
        (Some(self.next_tag), ready)
    }

    /// Records the answer to `tag`; returns what can now be sent.
    fn answer(&mut self, tag: u32, msg: Vec<u8>, now: Instant) -> Ready {
        let mut ready = self.expire(now);
        let Some(w) = self.waiting.get_mut(&tag) else {
            return ready;
        };
        w.answer = Some(msg);
        let client = w.client;
        ready.extend(self.release(client));
        ready
    }

    /// The client's answers from its oldest query on, up to the first
    /// that is not answered yet.
    fn release(&mut self, client: Client) -> Ready {
        let mut ready = Vec::new();
        loop {
            let oldest = self
                .waiting
                .iter()
                .filter(|(_, w)| w.client == client)
                .min_by_key(|(_, w)| w.seq)
                .map(|(t, w)| (*t, w.answer.is_some()));
            match oldest {
                Some((tag, true)) => {
                    if let Some(w) = self.waiting.remove(&tag) {
                        if let Some(a) = w.answer {
                            ready.push((w.reply, a));
                        }
                    }
                }
                _ => return ready,
            }
        }
    }

    /// Forgets queries the host has not answered in time, and sends what
    /// they held back.
    fn expire(&mut self, now: Instant) -> Ready {
        let old: Vec<(u32, Client)> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) >= QUERY_TIMEOUT)
            .map(|(t, w)| (*t, w.client))
            .collect();
        let mut ready = Vec::new();
        for (tag, client) in old {
            if let Some(w) = self.waiting.remove(&tag) {
                if let Some(a) = w.answer {
                    ready.push((w.reply, a));
                }
            }
            ready.extend(self.release(client));
        }
        ready
    }
}

/// The relay's state shared by its tasks.
#[derive(Debug)]
struct Relay {
    udp: Arc<UdpSocket>,
    in_flight: Mutex<InFlight>,
    to_host: mpsc::Sender<DnsFrame>,
}

/// SERVFAIL for `query`: its header and question with QR set and RCODE 2.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut r = query.to_vec();
    r[2] |= 0x80; // QR: a response
    r[3] = (r[3] & 0x70) | 0x80 | 2; // RA, RCODE=SERVFAIL
                                     // Keep the question, drop anything after it (answers, EDNS).
    r[6..12].fill(0);
    Some(r)
}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn deliver(&self, ready: Ready) {
        for (reply, msg) in ready {
            match reply {
                ReplyTo::Udp(peer) => {
                    let _ = self.udp.send_to(&msg, peer).await;
                }
                ReplyTo::Tcp(tx) => {
                    let _ = tx.try_send(msg);
                }
            }
        }
    }

    /// Sends a query to the host, or answers SERVFAIL at once if it can't.
    async fn query(&self, msg: Vec<u8>, transport: DnsTransport, client: Client, reply: ReplyTo) {
        let (tag, ready) = self.lock().add(client, reply, Instant::now());
        self.deliver(ready).await;
        let Some(tag) = tag else {
            return;
        };
        let frame = DnsFrame {
            tag,
            transport,
            message: msg,
        };
        if let Err(mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f)) =
            self.to_host.try_send(frame)
        {
            self.answer_failed(f.tag, &f.message).await;
        }
    }

    async fn answer_failed(&self, tag: u32, query: &[u8]) {
        if let Some(r) = servfail(query) {
            let ready = self.lock().answer(tag, r, Instant::now());
            self.deliver(ready).await;
        }
    }

    async fn answered(&self, frame: DnsFrame) {
        let ready = self.lock().answer(frame.tag, frame.message, Instant::now());
        self.deliver(ready).await;
    }
}

/// Starts the relay on `addr`:53. Errors only if the sockets can't be bound.
pub async fn start(addr: IpAddr) -> std::io::Result<()> {
    let udp = Arc::new(UdpSocket::bind(SocketAddr::new(addr, 53)).await?);
    let tcp = TcpListener::bind(SocketAddr::new(addr, 53)).await?;
    let (to_host, queries) = mpsc::channel(MAX_IN_FLIGHT);
    let relay = Arc::new(Relay {
        udp: udp.clone(),
        in_flight: Mutex::new(InFlight::default()),
        to_host,
    });
    tokio::spawn(host_link(relay.clone(), queries));
    tokio::spawn(serve_udp(relay.clone()));
    tokio::spawn(serve_tcp(relay, tcp));
    Ok(())
}

async fn serve_udp(relay: Arc<Relay>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match relay.udp.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if n >= 12 {
            relay
                .query(
                    buf[..n].to_vec(),
                    DnsTransport::Udp,
                    Client::Udp(peer),
                    ReplyTo::Udp(peer),
                )
                .await;
        }
    }
}

async fn serve_tcp(relay: Arc<Relay>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    let mut serial = 0u64;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                crate::vsock::accept_failed(53, e).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let relay = relay.clone();
        serial += 1;
        let client = Client::Tcp(serial);
        tokio::spawn(async move {
            let _permit = permit;
            tcp_client(relay, stream, client).await;
        });
    }
}

/// One TCP client: 2-byte length-prefixed queries and answers.
async fn tcp_client(relay: Arc<Relay>, stream: TcpStream, client: Client) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Ok(len) = u16::try_from(msg.len()) else {
                continue;
            };
            if wr.write_all(&len.to_be_bytes()).await.is_err() || wr.write_all(&msg).await.is_err()
            {
                return;
            }
        }
    });
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, rd.read_u16()).await {
            Ok(Ok(l)) if l >= 12 => l as usize,
            _ => break,
        };
        let mut msg = vec![0u8; len];
        if rd.read_exact(&mut msg).await.is_err() {
            break;
        }
        relay
            .query(msg, DnsTransport::Tcp, client, ReplyTo::Tcp(tx.clone()))
            .await;
    }
    drop(tx);
    // Answers still on their way get a moment to be written.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Keeps one vsock connection to the host's resolver: queries out,
/// answers in. When it breaks, what was in flight is answered SERVFAIL
/// and the next query reconnects.
async fn host_link(relay: Arc<Relay>, mut queries: mpsc::Receiver<DnsFrame>) {
    let mut log = RateLimiter::default();
    while let Some(first) = queries.recv().await {
        let stream = match VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, DNS_PORT)).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(s) = log.hit() {
                    tracing::warn!("DNS: the host's resolver is unreachable: {e}{s}");
                }
                relay.answer_failed(first.tag, &first.message).await;
                continue;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut reader = {
            let relay = relay.clone();
            tokio::spawn(async move {
                while let Ok(Some(frame)) = read_dns_frame(&mut rd).await {
                    relay.answered(frame).await;
                }
            })
        };
        let mut next = Some(first);
        while let Some(f) = next.take() {
            if wr.write_all(&f.encode()).await.is_err() {
                relay.answer_failed(f.tag, &f.message).await;
                break;
            }
            next = tokio::select! {
                q = queries.recv() => q,
                _ = &mut reader => None,
            };
        }
        reader.abort();
        // What was sent on the broken connection will get no answer; its
        // clients retry.
        relay.lock().waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servfail_keeps_id_and_question() {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x01a\x00\x00\x01\x00\x01");
        let r = servfail(&q).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR");
        assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(&r[4..6], &[0, 1], "one question kept");
        assert_eq!(&r[6..12], &[0; 6], "no answers or additional records");
        assert!(servfail(&[0; 5]).is_none());
    }

    fn udp(port: u16) -> (Client, ReplyTo) {
        let a: SocketAddr = ([10, 0, 0, 1], port).into();
        (Client::Udp(a), ReplyTo::Udp(a))
    }

    fn peers(r: &Ready) -> Vec<(u16, u8)> {
        r.iter()
            .map(|(to, m)| match to {
                ReplyTo::Udp(a) => (a.port(), m[0]),
                ReplyTo::Tcp(_) => (0, m[0]),
            })
            .collect()
    }

    #[test]
    fn in_flight_is_bounded_and_expires() {
        let mut f = InFlight::default();
        let t0 = Instant::now();
        for i in 0..MAX_IN_FLIGHT {
            let (c, r) = udp(i as u16);
            assert!(f.add(c, r, t0).0.is_some());
        }
        let (c, r) = udp(1);
        assert!(f.add(c, r, t0).0.is_none());
        let later = t0 + QUERY_TIMEOUT;
        let (c, r) = udp(1);
        assert!(f.add(c, r, later).0.is_some());
        assert_eq!(f.waiting.len(), 1);
    }

    /// Two queries from one client answered out of order leave in the
    /// order asked; another client is not held up.
    #[test]
    fn answers_to_one_client_keep_its_order() {
        let mut f = InFlight::default();
        let t0 = Instant::now();
        let (c, r) = udp(5);
        let (a, _) = f.add(c, r.clone(), t0);
        let (b, _) = f.add(c, r, t0);
        let (c2, r2) = udp(6);
        let (x, _) = f.add(c2, r2, t0);
        assert!(f.answer(b.unwrap(), vec![2], t0).is_empty(), "held back");
        assert_eq!(peers(&f.answer(x.unwrap(), vec![9], t0)), [(6, 9)]);
        assert_eq!(peers(&f.answer(a.unwrap(), vec![1], t0)), [(5, 1), (5, 2)]);
        assert!(f.waiting.is_empty());
        // A query the host never answers releases what it held, in time.
        let (c, r) = udp(7);
        let (_lost, _) = f.add(c, r.clone(), t0);
        let (d, _) = f.add(c, r, t0);
        assert!(f.answer(d.unwrap(), vec![4], t0).is_empty());
        assert_eq!(peers(&f.expire(t0 + QUERY_TIMEOUT)), [(7, 4)]);
    }
}

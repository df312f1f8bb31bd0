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
#[derive(Debug)]
enum ReplyTo {
    Udp(SocketAddr),
    Tcp(mpsc::Sender<Vec<u8>>),
}

#[derive(Debug)]
struct Waiting {
    reply: ReplyTo,
    since: Instant,
}

/// Queries in flight, by tag.
#[derive(Debug, Default)]
struct InFlight {
    next_tag: u32,
    waiting: HashMap<u32, Waiting>,
}

impl InFlight {
    /// Registers a query; `None` when too many wait.
    fn add(&mut self, reply: ReplyTo, now: Instant) -> Option<u32> {
        self.waiting
            .retain(|_, w| now.duration_since(w.since) < QUERY_TIMEOUT);
        if self.waiting.len() >= MAX_IN_FLIGHT {
            return None;
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        self.waiting
            .insert(self.next_tag, Waiting { reply, since: now });
        Some(self.next_tag)
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
    async fn deliver(&self, reply: ReplyTo, msg: Vec<u8>) {
        match reply {
            ReplyTo::Udp(peer) => {
                let _ = self.udp.send_to(&msg, peer).await;
            }
            ReplyTo::Tcp(tx) => {
                let _ = tx.try_send(msg);
            }
        }
    }

    /// Sends a query to the host, or answers SERVFAIL at once if it can't.
    async fn query(&self, msg: Vec<u8>, transport: DnsTransport, reply: ReplyTo) {
        let tag = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(reply, Instant::now());
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
        let w = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .remove(&tag);
        if let (Some(w), Some(r)) = (w, servfail(query)) {
            self.deliver(w.reply, r).await;
        }
    }

    async fn answered(&self, frame: DnsFrame) {
        let w = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .remove(&frame.tag);
        if let Some(w) = w {
            self.deliver(w.reply, frame.message).await;
        }
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
                .query(buf[..n].to_vec(), DnsTransport::Udp, ReplyTo::Udp(peer))
                .await;
        }
    }
}

async fn serve_tcp(relay: Arc<Relay>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
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
        tokio::spawn(async move {
            let _permit = permit;
            tcp_client(relay, stream).await;
        });
    }
}

/// One TCP client: 2-byte length-prefixed queries and answers.
async fn tcp_client(relay: Arc<Relay>, stream: TcpStream) {
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
            .query(msg, DnsTransport::Tcp, ReplyTo::Tcp(tx.clone()))
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
        relay
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .clear();
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

    #[test]
    fn in_flight_is_bounded_and_expires() {
        let mut f = InFlight::default();
        let t0 = Instant::now();
        for _ in 0..MAX_IN_FLIGHT {
            assert!(f
                .add(ReplyTo::Udp("1.2.3.4:5".parse().unwrap()), t0)
                .is_some());
        }
        assert!(f
            .add(ReplyTo::Udp("1.2.3.4:5".parse().unwrap()), t0)
            .is_none());
        let later = t0 + QUERY_TIMEOUT;
        assert!(f
            .add(ReplyTo::Udp("1.2.3.4:5".parse().unwrap()), later)
            .is_some());
        assert_eq!(f.waiting.len(), 1);
    }
}

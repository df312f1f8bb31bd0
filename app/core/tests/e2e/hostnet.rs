//! Servers the network cases run on this host: a DNS resolver (the VM's
//! only upstream during the suite, so no query leaves the machine), TCP
//! and UDP servers on loopback and on the host's own address.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// The zone the test resolver answers; every other name is NXDOMAIN.
pub const ZONE: &str = "e2e.test";

/// A resolver on 127.0.0.1 (UDP and TCP, one port): `<x>.e2e.test` A is
/// the host's own non-loopback address. Runs until the process ends.
pub fn start_dns() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).unwrap();
    let host = host_ipv4();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                continue;
            };
            if let Some(a) = answer(&buf[..n], host) {
                let _ = udp.send_to(&a, peer);
            }
        }
    });
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).is_ok() {
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut q).is_err() {
                        return;
                    }
                    if let Some(a) = answer(&q, host) {
                        let _ = s.write_all(&(a.len() as u16).to_be_bytes());
                        let _ = s.write_all(&a);
                    }
                }
            });
        }
    });
    addr
}

fn answer(query: &[u8], host: Ipv4Addr) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_available = true;
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.add_queries(q.queries.iter().cloned());
    let question = q.queries.first()?;
    let name = question
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if name == ZONE || name.ends_with(&format!(".{ZONE}")) {
        if question.query_type() == RecordType::A {
            r.add_answer(Record::from_rdata(
                question.name().clone(),
                5,
                RData::A(A(host)),
            ));
        }
    } else {
        r.metadata.response_code = ResponseCode::NXDomain;
    }
    r.to_vec().ok()
}

/// The host's own IPv4 address on its default route (not loopback).
pub fn host_ipv4() -> Ipv4Addr {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cidr = l.split_whitespace().nth(3)?;
            cidr.split('/').next()?.parse().ok()
        })
        .expect("this host has a non-loopback IPv4 address")
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP server on `ip` that reads a request (up to an empty line, or the
/// client's end of input) and answers an HTTP 200 with `reply` and a
/// newline, then closes: `wget` and `nc` both see `reply`. Runs until the
/// process ends.
pub fn tcp_greeter(ip: IpAddr, reply: &'static str) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 4096 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("{reply}\n");
                let _ = s.write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    port
}

/// A UDP server on `ip` that answers each datagram with `pong:` and it.
pub fn udp_ponger(ip: IpAddr) -> u16 {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, peer)) = s.recv_from(&mut buf) else {
                continue;
            };
            let mut reply = b"pong:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, peer);
        }
    });
    port
}

/// One HTTP GET on `addr`; the body, if the answer was 200.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.contains(" 200 ").then(|| body.to_owned())
}

/// Sends `msg` to a UDP `addr` and waits for one reply.
pub fn udp_exchange(addr: SocketAddr, msg: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(addr).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.send(msg).ok()?;
    let mut buf = [0u8; 65536];
    let n = s.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

//! The vsock device on virtqueues built in test memory, with real unix
//! sockets on the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};

use super::testing::*;
use super::*;

#[test]
fn host_initiated_stream_both_ways_with_half_close() {
    let mut g = Guest::new("host-init");
    let (mut s, hport) = g.host_connect(2375);
    assert!(hport >= 1 << 30);

    // host → guest
    s.write_all(b"GET /_ping HTTP/1.1\r\n\r\n").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, hport, 2375));
    assert_eq!(data, b"GET /_ping HTTP/1.1\r\n\r\n");

    // Host half-closes: the guest gets SHUTDOWN(SEND) and can still answer.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    g.send(
        Hdr::guest(op::RW, 2375, hport),
        b"HTTP/1.1 200 OK\r\n\r\nOK",
    );
    // Guest finishes: both directions shut → the device resets.
    let mut shut = Hdr::guest(op::SHUTDOWN, 2375, hport);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(shut, &[]);
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "HTTP/1.1 200 OK\r\n\r\nOK");
    let (h, _) = g.recv();
    assert_eq!(h.op, op::RST);
    assert_eq!(g.dev.metrics().conns_open, 0);
}

#[test]
fn guest_initiated_stream_reaches_the_port_listener() {
    let mut g = Guest::new("guest-init");
    let listener = UnixListener::bind(format!("{}_1024", g.uds().display())).unwrap();
    g.send(Hdr::guest(op::REQUEST, 5000, 1024), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 1024, 5000));
    let (mut host, _) = listener.accept().unwrap();
    g.send(Hdr::guest(op::RW, 5000, 1024), b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    host.write_all(b"hi guest").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, &data[..]), (op::RW, &b"hi guest"[..]));
    // Host closes entirely: SHUTDOWN with both flags reaches the guest
    // (the host takes nothing more either), so the guest ends it at once.
    drop(host);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.flags),
        (op::SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV)
    );
    g.send(Hdr::guest(op::RST, 5000, 1024), &[]);
    assert_eq!(g.dev.metrics().conns_open, 0);
}

#[test]
fn refused_and_unknown_connections_get_rst() {
    let mut g = Guest::new("refused");
    // Nobody listens on _7777.
    g.send(Hdr::guest(op::REQUEST, 5001, 7777), &[]);
    assert_eq!(g.recv().0.op, op::RST);
    // Data for a connection that doesn't exist.
    g.send(Hdr::guest(op::RW, 5002, 1), b"x");
    assert_eq!(g.recv().0.op, op::RST);
    // Wrong source CID.
    let mut h = Hdr::guest(op::REQUEST, 5003, 1);
    h.src_cid = 99;
    g.send(h, &[]);
    assert_eq!(g.recv().0.op, op::RST);
    assert!(g.dev.metrics().bad_packets >= 1);
}

#[test]
fn malformed_chains_are_consumed_without_harm() {
    let mut g = Guest::new("malformed");
    let a = g.alloc(4096);
    // Header too short; write-only TX descriptor; address outside memory;
    // payload length larger than its descriptor.
    g.send_raw(&[(a, 10, 0)]);
    g.send_raw(&[(a, 44, VRING_DESC_F_WRITE as u16)]);
    g.send_raw(&[(u64::MAX - 100, 44, 0)]);
    let mut h = Hdr::guest(op::RW, 1, 2);
    h.len = 60_000;
    g.mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
    g.send_raw(&[(a, 44, 0), (a + 64, 16, 0)]);
    assert!(g.dev.metrics().bad_packets >= 4, "{:?}", g.dev.metrics());
    // The device still works.
    let listener = UnixListener::bind(format!("{}_9", g.uds().display())).unwrap();
    g.send(Hdr::guest(op::REQUEST, 77, 9), &[]);
    let _ = listener.accept().unwrap();
    // (RST replies for the bad packets may come first.)
    let mut ops = Vec::new();
    for _ in 0..4 {
        let (h, _) = g.recv();
        ops.push(h.op);
        if h.op == op::RESPONSE {
            break;
        }
    }
    assert_eq!(ops.last(), Some(&op::RESPONSE), "{ops:?}");
}

#[test]
fn host_data_never_exceeds_the_guest_credit() {
    let mut g = Guest::new("credit");
    let (mut s, hport) = g.host_connect(80);
    // The guest says it has room for 1000 bytes.
    let mut cu = Hdr::guest(op::CREDIT_UPDATE, 80, hport);
    cu.buf_alloc = 1000;
    g.send(cu, &[]);
    s.write_all(&[1u8; 5000]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.post_rx(8);
    let mut total = 0;
    for (h, d) in g.poll() {
        assert_eq!(h.op, op::RW);
        total += d.len();
    }
    assert_eq!(total, 1000, "only the credit's worth is sent");
    // The guest consumes it and grants more.
    cu.fwd_cnt = 1000;
    g.send(cu, &[]);
    g.post_rx(8);
    let more: usize = g.poll().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(more, 1000);
}

#[test]
fn guest_data_is_buffered_up_to_its_credit_then_reset() {
    let mut g = Guest::new("overrun");
    let (s, hport) = g.host_connect(81);
    // The host never reads: the socket buffer fills, then our buffer.
    let chunk = vec![7u8; MAX_PKT_DATA as usize];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..200 {
        g.send(Hdr::guest(op::RW, 81, hport), &chunk);
        sent += chunk.len();
        g.post_rx(2);
        if g.poll().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(
        reset,
        "a guest ignoring its credit must be reset, not buffered without bound"
    );
    // What was accepted before the reset: the host socket's send buffer
    // (the kernel counts overhead, so at most twice wmem_default), at most
    // CONN_BUF buffered by us, and the chunk that overran it.
    let wmem: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(212_992);
    let bound = 2 * wmem + CONN_BUF as usize + 2 * chunk.len();
    assert!(sent <= bound, "sent {sent} before the reset, bound {bound}");
    drop(s);
}

#[test]
fn connect_line_parsing() {
    use super::muxer::parse_connect;
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT 99999999999",
        b"connect 5",
        b"\xff",
        b"CONNECT 5 6",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut g = Guest::new("badline");
    let mut s = UnixStream::connect(g.uds()).unwrap();
    s.write_all(b"HELLO\n").unwrap();
    std::thread::sleep(Duration::from_millis(10));
    g.poll();
    g.poll();
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed without an answer");
    // A line that never ends is cut off at its limit.
    let mut s = UnixStream::connect(g.uds()).unwrap();
    s.write_all(&[b'A'; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    for _ in 0..5 {
        g.poll();
    }
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
}

/// Whether the peer closed `s` (EOF within 5 s; data or a timeout is not
/// a close).
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    matches!(s.read(&mut buf), Ok(0))
        || matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Readable within `ms`?
fn readable(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn an_idle_device_takes_no_timer_wakeups() {
    let mut g = Guest::new("idle");
    let (s, _) = g.host_connect(2375);
    g.poll();
    assert!(!readable(g.dev.host_fd(), 300), "nothing waits: no wakeups");
    drop(s);
}

#[test]
fn a_silent_host_connection_is_closed_after_its_deadline() {
    let mut g = Guest::new("silent");
    let mut s = UnixStream::connect(g.uds()).unwrap();
    g.poll();
    assert_eq!(g.dev.metrics().handshakes, 1);
    assert!(
        readable(g.dev.host_fd(), 1000),
        "the timer runs while it waits"
    );
    g.dev
        .sweep(std::time::Instant::now() + timeouts::CONNECT_LINE);
    assert!(closed(&mut s), "closed");
    let m = g.dev.metrics();
    assert_eq!((m.handshakes, m.timeouts), (0, 1), "{m:?}");
}

#[test]
fn a_guest_that_never_answers_a_connection_is_given_up_on() {
    let mut g = Guest::new("noanswer");
    let mut s = UnixStream::connect(g.uds()).unwrap();
    s.write_all(b"CONNECT 2375\n").unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, op::REQUEST);
    // No RESPONSE, ever.
    g.dev
        .sweep(std::time::Instant::now() + timeouts::GUEST_ANSWER);
    assert!(closed(&mut s), "host side closed");
    assert_eq!(g.dev.metrics().conns_open, 0);
    assert_eq!(g.recv().0.op, op::RST, "and the guest told");
}

#[test]
fn a_closed_host_side_is_released_even_if_the_guest_never_finishes() {
    let mut g = Guest::new("release");
    let (s, hport) = g.host_connect(2375);
    drop(s);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.flags),
        (op::SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV)
    );
    assert_eq!(h.src_port, hport);
    assert_eq!(g.dev.metrics().conns_open, 1, "waiting for the guest");
    // The guest ignores it (a stuck or hostile guest).
    g.dev.sweep(std::time::Instant::now() + timeouts::CLOSE);
    assert_eq!(g.dev.metrics().conns_open, 0, "released regardless");
    assert_eq!(g.recv().0.op, op::RST);
}

#[test]
fn connections_beyond_the_cap_are_refused() {
    let dir = std::env::temp_dir().join(format!("berth-vsock-cap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut dev = Vsock::new(GUEST_CID, &dir.join("v.sock"), 2).unwrap();
    let clients: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(dir.join("v.sock")).unwrap())
        .collect();
    dev.handle_host_events();
    let m = dev.metrics();
    assert_eq!((m.handshakes, m.refused_at_cap), (2, 1), "{m:?}");
    let mut clients = clients;
    assert!(closed(&mut clients[2]), "closed at once");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A unix listener with the smallest backlog, filled.
fn full_listener(path: &std::path::Path) -> (std::os::fd::OwnedFd, Vec<std::os::fd::OwnedFd>) {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    socket::listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let mut fillers = Vec::new();
    loop {
        let c = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match socket::connect(c.as_raw_fd(), &UnixAddr::new(path).unwrap()) {
            Ok(()) => fillers.push(c),
            Err(_) => break,
        }
        assert!(fillers.len() < 100, "the backlog never filled");
    }
    (fd, fillers)
}

#[test]
fn a_full_host_listener_does_not_stall_the_device() {
    let mut g = Guest::new("backlog");
    let path = std::path::PathBuf::from(format!("{}_1025", g.uds().display()));
    let (listener, _fillers) = full_listener(&path);
    // The connect would block: the device answers nothing yet and returns.
    g.send(Hdr::guest(op::REQUEST, 6000, 1025), &[]);
    g.post_rx(4);
    assert!(g.poll().is_empty(), "no answer while the backlog is full");
    // Room again: the next tick connects.
    let accepted = nix::sys::socket::accept(std::os::fd::AsRawFd::as_raw_fd(&listener)).unwrap();
    g.dev.sweep(std::time::Instant::now());
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (op::RESPONSE, 6000));
    // Full again and never drained: refused once the wait is over.
    let _more = {
        let mut v = Vec::new();
        for _ in 0..100 {
            let c = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
            if nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&c), &addr).is_err() {
                break;
            }
            v.push(c);
        }
        v
    };
    g.send(Hdr::guest(op::REQUEST, 6001, 1025), &[]);
    g.dev
        .sweep(std::time::Instant::now() + timeouts::HOST_LISTENER + Duration::from_millis(1));
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (op::RST, 6001));
    let _ = nix::unistd::close(accepted);
}

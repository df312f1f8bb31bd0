//! The vsock device on virtqueues built in test memory, with real unix
//! sockets on the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const BUF: u32 = 4096;

/// One parsed packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn to_bytes(self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// A guest → host packet between guest port `src` and host port `dst`.
    fn guest(op: u16, src: u32, dst: u32) -> Hdr {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Hdr::default()
        }
    }
}

/// A guest's view of the device: queues in test memory.
struct Guest {
    mem: &'static Mem,
    rxq: MockSplitQueue<'static, Mem>,
    txq: MockSplitQueue<'static, Mem>,
    rx: Queue,
    tx: Queue,
    rx_next_desc: u16,
    tx_next_desc: u16,
    rx_seen_used: u16,
    next_buf: u64,
    /// RX buffers posted: descriptor head → (header addr, data addr).
    rx_bufs: std::collections::HashMap<u16, (u64, u64)>,
    dev: Vsock,
    dir: PathBuf,
}

impl Guest {
    fn new(name: &str) -> Guest {
        let mem: &'static Mem = Box::leak(Box::new(
            Mem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap(),
        ));
        let rxq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x10000), QSIZE);
        let rx = rxq.create_queue().unwrap();
        let tx = txq.create_queue().unwrap();
        let dir = std::env::temp_dir().join(format!("berth-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dev = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        Guest {
            mem,
            rxq,
            txq,
            rx,
            tx,
            rx_next_desc: 0,
            tx_next_desc: 0,
            rx_seen_used: 0,
            next_buf: 0x100000,
            rx_bufs: Default::default(),
            dev,
            dir,
        }
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > 32 << 20 {
            self.next_buf = 0x100000;
        }
        let a = self.next_buf;
        self.next_buf += len.div_ceil(64) * 64;
        a
    }

    /// Queues a TX chain [header, data] (or a custom descriptor list).
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        let base = self.tx_next_desc;
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i as u16 == n - 1;
                let next = if last {
                    0
                } else {
                    (base + i as u16 + 1) % QSIZE
                };
                let f = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, f, next))
            })
            .collect();
        self.txq.add_desc_chains(&raw, base).unwrap();
        self.tx_next_desc = (base + n) % QSIZE;
        self.dev.process_tx(&mut self.tx, self.mem);
    }

    fn send(&mut self, h: Hdr, data: &[u8]) {
        let ha = self.alloc(44);
        let mut h = h;
        h.len = data.len() as u32;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(ha))
            .unwrap();
        if data.is_empty() {
            self.send_raw(&[(ha, 44, 0)]);
        } else {
            let da = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(da)).unwrap();
            self.send_raw(&[(ha, 44, 0), (da, data.len() as u32, 0)]);
        }
    }

    /// Posts `n` RX buffers (header + BUF bytes, two descriptors each).
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let base = self.rx_next_desc;
            let ha = self.alloc(44);
            let da = self.alloc(BUF as u64);
            let w = VRING_DESC_F_WRITE as u16;
            let raw = [
                RawDescriptor::from(SplitDescriptor::new(
                    ha,
                    44,
                    w | VRING_DESC_F_NEXT as u16,
                    (base + 1) % QSIZE,
                )),
                RawDescriptor::from(SplitDescriptor::new(da, BUF, w, 0)),
            ];
            self.rxq.add_desc_chains(&raw, base).unwrap();
            self.rx_bufs.insert(base, (ha, da));
            self.rx_next_desc = (base + 2) % QSIZE;
        }
    }

    /// Lets the device look at host sockets and fill RX buffers; returns
    /// the packets the guest received.
    fn poll(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        self.dev.handle_host_events();
        self.dev.process_rx(&mut self.rx, self.mem);
        let used_addr = self.rxq.used_addr();
        let idx: u16 = self.mem.read_obj(used_addr.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.rx_seen_used != idx {
            let slot = (self.rx_seen_used % QSIZE) as u64;
            let id: u32 = self
                .mem
                .read_obj(used_addr.unchecked_add(4 + slot * 8))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(used_addr.unchecked_add(8 + slot * 8))
                .unwrap();
            self.rx_seen_used = self.rx_seen_used.wrapping_add(1);
            let (ha, da) = self
                .rx_bufs
                .remove(&(id as u16))
                .expect("used id was posted");
            if len == 0 {
                continue;
            }
            let mut hb = [0u8; 44];
            self.mem.read_slice(&mut hb, GuestAddress(ha)).unwrap();
            let h = Hdr::from_bytes(&hb);
            assert_eq!(len, 44 + h.len, "used length must be header + payload");
            let mut data = vec![0u8; h.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(da)).unwrap();
            out.push((h, data));
        }
        out
    }

    /// Polls until a packet arrives (host sockets are asynchronous).
    fn recv(&mut self) -> (Hdr, Vec<u8>) {
        for _ in 0..200 {
            self.post_rx(1);
            let mut got = self.poll();
            if !got.is_empty() {
                assert_eq!(got.len(), 1, "{got:?}");
                return got.remove(0);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no packet for the guest");
    }

    /// Connects from the host to guest `port` and completes the handshake.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(self.uds()).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (h, _) = self.recv();
        assert_eq!(
            (h.op, h.dst_port, h.dst_cid, h.src_cid),
            (op::REQUEST, port, GUEST_CID, HOST_CID)
        );
        self.send(Hdr::guest(op::RESPONSE, port, h.src_port), &[]);
        let mut line = [0u8; 64];
        let n = s.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", h.src_port)
        );
        (s, h.src_port)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    // Host closes entirely: SHUTDOWN(SEND) reaches the guest.
    drop(host);
    let (h, _) = g.recv();
    assert_eq!(h.op, op::SHUTDOWN);
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
    // Socket buffer + at most CONN_BUF buffered by us.
    assert!(sent < 64 << 20, "sent {sent}");
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

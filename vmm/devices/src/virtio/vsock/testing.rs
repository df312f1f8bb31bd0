//! A guest's side of the vsock device, on virtqueues built in test
//! memory: for the device's unit tests and its benchmark (feature
//! `test-utils`). The host side uses real unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::Mem;
use super::{op, Vsock, HOST_CID, MAX_CONNS, TYPE_STREAM};
use crate::virtio::testing::TestQueue;

pub const GUEST_CID: u64 = 3;
pub const QSIZE: u16 = 256;
pub const BUF: u32 = 4096;

/// One parsed packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn to_bytes(self) -> [u8; 44] {
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

    pub fn from_bytes(b: &[u8]) -> Hdr {
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
    pub fn guest(op: u16, src: u32, dst: u32) -> Hdr {
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
pub struct Guest {
    pub mem: &'static Mem,
    pub rxq: TestQueue,
    pub txq: TestQueue,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_next_desc: u16,
    pub tx_next_desc: u16,
    pub rx_seen_used: u16,
    pub next_buf: u64,
    /// RX buffers posted: descriptor head → (header addr, data addr).
    pub rx_bufs: std::collections::HashMap<u16, (u64, u64)>,
    /// Data bytes per posted RX buffer.
    pub rx_buf_len: u32,
    pub dev: Vsock,
    pub dir: PathBuf,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("dir", &self.dir).finish()
    }
}

impl Guest {
    pub fn new(name: &str) -> Guest {
        Guest::with(name, BUF, MAX_CONNS)
    }

    /// A guest posting RX buffers of `rx_buf_len` bytes, with a device
    /// capped at `max_conns` connections.
    pub fn with(name: &str, rx_buf_len: u32, max_conns: usize) -> Guest {
        let mem: &'static Mem = Box::leak(Box::new(
            Mem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap(),
        ));
        let rxq = TestQueue::new(mem, GuestAddress(0), QSIZE);
        let txq = TestQueue::new(mem, GuestAddress(0x10000), QSIZE);
        let rx = rxq.queue();
        let tx = txq.queue();
        let dir = std::env::temp_dir().join(format!("berth-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dev = Vsock::new(GUEST_CID, &dir.join("v.sock"), max_conns).unwrap();
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
            rx_buf_len,
            dev,
            dir,
        }
    }

    pub fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > 32 << 20 {
            self.next_buf = 0x100000;
        }
        let a = self.next_buf;
        self.next_buf += len.div_ceil(64) * 64;
        a
    }

    /// Queues a TX chain [header, data] (or a custom descriptor list).
    pub fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
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
        offer(self.mem, &self.txq, &raw, base);
        self.tx_next_desc = (base + n) % QSIZE;
        self.dev.process_tx(&mut self.tx, self.mem);
    }

    pub fn send(&mut self, h: Hdr, data: &[u8]) {
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

    /// Posts `n` RX buffers (header + `rx_buf_len` bytes, two descriptors each).
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let base = self.rx_next_desc;
            let ha = self.alloc(44);
            let da = self.alloc(self.rx_buf_len as u64);
            let w = VRING_DESC_F_WRITE as u16;
            let raw = [
                RawDescriptor::from(SplitDescriptor::new(
                    ha,
                    44,
                    w | VRING_DESC_F_NEXT as u16,
                    (base + 1) % QSIZE,
                )),
                RawDescriptor::from(SplitDescriptor::new(da, self.rx_buf_len, w, 0)),
            ];
            offer(self.mem, &self.rxq, &raw, base);
            self.rx_bufs.insert(base, (ha, da));
            self.rx_next_desc = (base + 2) % QSIZE;
        }
    }

    /// Lets the device look at host sockets and fill RX buffers; returns
    /// the packets the guest received.
    pub fn poll(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        self.dev.handle_host_events();
        self.dev.process_rx(&mut self.rx, self.mem);
        let used_addr = self.rxq.used;
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
    pub fn recv(&mut self) -> (Hdr, Vec<u8>) {
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
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
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

/// Writes one descriptor chain at `base` in the table and offers it.
fn offer(mem: &Mem, q: &TestQueue, chain: &[RawDescriptor], base: u16) {
    for (i, d) in chain.iter().enumerate() {
        q.set_desc(mem, base + i as u16, *d);
    }
    q.offer(mem, base);
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

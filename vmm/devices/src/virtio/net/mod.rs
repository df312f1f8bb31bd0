//! virtio-net: the guest's Ethernet frames to and from a [`NetBackend`].
//!
//! The queue logic here is pure: it reads the guest's TX chains and fills
//! its RX chains over `virtio-queue` and guest memory, and hands frames to
//! and takes them from the backend. Where frames go is the backend's
//! business; the first one, [`StreamBackend`], speaks the stream framing
//! passt and gvproxy share (a big-endian `u32` length, then the frame) on
//! a unix socket.
//!
//! Features: `MAC`, `MRG_RXBUF` (a frame may span several RX chains, so
//! 64 KiB frames need no big buffers), `MTU` (the largest frame the
//! backend takes), `EVENT_IDX`. Checksum and segmentation offloads are
//! offered only if the backend says it honours them ([`NetBackend::offloads`]);
//! a stream backend gets complete, checksummed frames.
//!
//! Everything the guest sends is checked: a TX chain must be readable only,
//! carry a header and at least an Ethernet header, and be no longer than the
//! largest frame; anything else is dropped and counted. Frames for the guest
//! wait in a bounded queue while it has no RX buffers; beyond it they are
//! dropped and counted, as a NIC with a full ring drops them.

mod device;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::RawFd;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::virtio::queue::Pass;

pub use device::NetDevice;
pub use stream::StreamBackend;

pub const VIRTIO_ID_NET: u32 = 1;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`: what precedes every frame (VERSION_1 is required).
pub const HDR_LEN: usize = 12;
/// The shortest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// The largest MTU offered (passt's), and so the largest frame: the MTU
/// plus an Ethernet header and a VLAN tag.
pub const MAX_MTU: u16 = 65520;
pub const MAX_FRAME: usize = MAX_MTU as usize + 18;
/// Frames kept for the guest while it has no RX buffers.
pub const MAX_PENDING_FRAMES: usize = 256;
pub const MAX_PENDING_BYTES: usize = 4 << 20;

pub const F_VERSION_1: u64 = 1 << virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const F_MAC: u64 = 1 << VIRTIO_NET_F_MAC;
pub const F_MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
pub const F_MTU: u64 = 1 << VIRTIO_NET_F_MTU;
/// Offload features a backend may claim.
pub const OFFLOADS: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6);

/// What became of a frame offered to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Taken (queued or written).
    Taken,
    /// No room now: offer it again once [`NetBackend::fd`] was ready.
    Full,
    /// Nobody to send to (the peer is gone): the frame is lost.
    NoPeer,
}

/// Where frames go: the other end of the guest's link.
pub trait NetBackend: Send {
    /// Offload features (virtio-net bits within [`OFFLOADS`]) this backend
    /// handles: frames with partial checksums or segmentation.
    fn offloads(&self) -> u64 {
        0
    }
    /// Offers one frame (without the virtio header) for the peer.
    fn send(&mut self, frame: &[u8]) -> Sent;
    /// The next frame from the peer that has fully arrived, if any; it
    /// reads what is available without blocking. Frames longer than
    /// [`MAX_FRAME`] or shorter than [`MIN_FRAME`] are the peer's error:
    /// the backend drops the peer and counts it.
    fn recv(&mut self) -> Option<Vec<u8>>;
    /// Serves readiness of [`NetBackend::fd`]: accepts a peer, writes what
    /// is queued. Returns whether sends may succeed again.
    fn ready(&mut self) -> bool;
    /// A descriptor that becomes readable when the backend needs
    /// [`NetBackend::ready`] (level-triggered).
    fn fd(&self) -> RawFd;
    /// Named counters.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Per-device counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames lost because no peer was connected.
    pub tx_no_peer: u64,
    /// TX chains refused: writable descriptors, too short or too long,
    /// unreadable memory, offloads that were not negotiated.
    pub tx_malformed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped because the guest had no RX buffers and the pending
    /// queue was full.
    pub rx_dropped: u64,
    /// Frames too long for the guest's buffers (without MRG_RXBUF).
    pub rx_too_big: u64,
    /// RX chains that could not be written (read-only or bad memory).
    pub rx_malformed: u64,
}

/// The device's logic over any backend.
#[derive(Debug)]
pub struct Net<B> {
    pub backend: B,
    mac: [u8; 6],
    mtu: u16,
    acked: u64,
    pending: VecDeque<Vec<u8>>,
    pending_bytes: usize,
    /// TX stopped because the backend was full.
    tx_blocked: bool,
    tx_buf: Vec<u8>,
    metrics: Metrics,
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, mac: [u8; 6], mtu: u16) -> Net<B> {
        Net {
            backend,
            mac,
            mtu: mtu.clamp(68, MAX_MTU),
            acked: 0,
            pending: VecDeque::new(),
            pending_bytes: 0,
            tx_blocked: false,
            tx_buf: Vec::with_capacity(HDR_LEN + MAX_FRAME),
            metrics: Metrics::default(),
        }
    }

    /// The features offered: the base set plus the backend's offloads.
    pub fn features(&self) -> u64 {
        F_VERSION_1
            | F_EVENT_IDX
            | F_MAC
            | F_MRG_RXBUF
            | F_MTU
            | (self.backend.offloads() & OFFLOADS)
    }

    /// The driver's accepted features (a subset of [`Net::features`]).
    pub fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    /// Config space: `mac[6]`, `status` (le16), `max_virtqueue_pairs`
    /// (le16), `mtu` (le16).
    pub fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // LINK_UP
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether TX waits for the backend to have room.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// The largest frame the guest may send: its MTU plus headers.
    fn max_tx_frame(&self) -> usize {
        self.mtu as usize + 18
    }

    /// Takes the guest's TX chains and offers each frame to the backend;
    /// stops (leaving chains available) while the backend is full.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        let mut used = false;
        let limit = HDR_LEN + self.max_tx_frame();
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.tx_buf.clear();
            let mut ok = true;
            for d in &mut chain {
                if d.is_write_only() {
                    ok = false;
                    break;
                }
                let len = d.len() as usize;
                if self.tx_buf.len() + len > limit {
                    ok = false;
                    break;
                }
                let start = self.tx_buf.len();
                self.tx_buf.resize(start + len, 0);
                if vm_memory::Bytes::read_slice(mem, &mut self.tx_buf[start..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            ok &= self.tx_buf.len() >= HDR_LEN + MIN_FRAME;
            // Header: flags (u8), gso_type (u8), … Without negotiated
            // offloads the guest may ask for neither.
            if ok && self.acked & OFFLOADS == 0 && (self.tx_buf[0] != 0 || self.tx_buf[1] != 0) {
                ok = false;
            }
            if ok {
                match self.backend.send(&self.tx_buf[HDR_LEN..]) {
                    Sent::Taken => {
                        self.metrics.tx_frames += 1;
                        self.metrics.tx_bytes += (self.tx_buf.len() - HDR_LEN) as u64;
                    }
                    Sent::NoPeer => self.metrics.tx_no_peer += 1,
                    Sent::Full => {
                        // Not consumed: the guest's buffer waits its turn.
                        queue.go_to_previous_position();
                        self.tx_blocked = true;
                        return Pass {
                            used,
                            drained: false,
                        };
                    }
                }
            } else {
                self.metrics.tx_malformed += 1;
            }
            if queue.add_used(mem, head, 0).is_err() {
                self.metrics.tx_malformed += 1;
                break;
            }
            used = true;
        }
        self.tx_blocked = false;
        Pass {
            used,
            drained: true,
        }
    }

    /// Reads what the backend has for the guest into the pending queue
    /// (at most a queue's worth per call); frames beyond its bound are
    /// dropped and counted.
    pub fn pull_from_backend(&mut self) {
        for _ in 0..MAX_PENDING_FRAMES {
            let Some(frame) = self.backend.recv() else {
                return;
            };
            if self.pending.len() >= MAX_PENDING_FRAMES
                || self.pending_bytes + frame.len() > MAX_PENDING_BYTES
            {
                self.metrics.rx_dropped += 1;
                continue;
            }
            self.pending_bytes += frame.len();
            self.pending.push_back(frame);
        }
    }

    /// Frames waiting for RX buffers.
    pub fn pending_frames(&self) -> usize {
        self.pending.len()
    }

    /// Writes pending frames into the guest's RX chains, as many as fit.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        let mut used = false;
        let mergeable = self.acked & F_MRG_RXBUF != 0;
        while let Some(frame) = self.pending.front() {
            let delivered = if mergeable {
                deliver_merged(queue, mem, frame, &mut self.metrics)
            } else {
                deliver_single(queue, mem, frame, &mut self.metrics)
            };
            match delivered {
                Delivery::Done => {
                    self.metrics.rx_frames += 1;
                    self.metrics.rx_bytes += frame.len() as u64;
                    used = true;
                }
                Delivery::Dropped => used = true,
                Delivery::NoBuffers => break,
            }
            if let Some(f) = self.pending.pop_front() {
                self.pending_bytes -= f.len();
            }
        }
        Pass {
            used,
            drained: false,
        }
    }
}

/// What happened to the frame at the head of the pending queue.
enum Delivery {
    Done,
    /// The frame can't be delivered (too big, bad chain): it is gone, and
    /// any chain it took was returned used.
    Dropped,
    /// Not enough buffers now; nothing was consumed.
    NoBuffers,
}

/// The header for a received frame spanning `num_buffers` chains.
fn rx_header(num_buffers: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

/// Writes `data` into a chain's writable descriptors; returns the bytes
/// written, or `None` if the chain has a readable descriptor or bad memory.
fn write_chain(
    chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    data: &[u8],
) -> Option<usize> {
    let mut w = chain.clone().writer(mem).ok()?;
    let n = data.len().min(w.available_bytes());
    w.write_all(&data[..n]).ok()?;
    Some(n)
}

/// One chain must hold header and frame (no MRG_RXBUF).
fn deliver_single(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    m: &mut Metrics,
) -> Delivery {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Delivery::NoBuffers;
    };
    let head = chain.head_index();
    let capacity = chain
        .clone()
        .writer(mem)
        .map(|w| w.available_bytes())
        .unwrap_or(0);
    let mut data = Vec::with_capacity(HDR_LEN + frame.len());
    data.extend_from_slice(&rx_header(1));
    data.extend_from_slice(frame);
    let len = if capacity < data.len() {
        m.rx_too_big += 1;
        0
    } else {
        match write_chain(&chain, mem, &data) {
            Some(n) => n,
            None => {
                m.rx_malformed += 1;
                0
            }
        }
    };
    let _ = queue.add_used(mem, head, len as u32);
    if len == 0 {
        Delivery::Dropped
    } else {
        Delivery::Done
    }
}

/// A frame over as many chains as it needs (MRG_RXBUF): all of them are
/// taken, or none.
fn deliver_merged(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    m: &mut Metrics,
) -> Delivery {
    let total = HDR_LEN + frame.len();
    let mut chains: Vec<(virtio_queue::DescriptorChain<&GuestMemoryMmap>, usize)> = Vec::new();
    let mut capacity = 0usize;
    while capacity < total {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            for _ in 0..chains.len() {
                queue.go_to_previous_position();
            }
            return Delivery::NoBuffers;
        };
        let cap = chain
            .clone()
            .writer(mem)
            .map(|w| w.available_bytes())
            .unwrap_or(0);
        if cap == 0 {
            // A chain that can take nothing: return it used, empty.
            m.rx_malformed += 1;
            let _ = queue.add_used(mem, chain.head_index(), 0);
            for (c, _) in chains.drain(..) {
                let _ = queue.add_used(mem, c.head_index(), 0);
            }
            return Delivery::Dropped;
        }
        capacity += cap;
        chains.push((chain, cap));
        if chains.len() > u16::MAX as usize {
            break;
        }
    }
    let num = chains.len() as u16;
    let mut data = Vec::with_capacity(total);
    data.extend_from_slice(&rx_header(num));
    data.extend_from_slice(frame);
    let mut at = 0;
    let mut used = Vec::with_capacity(chains.len());
    for (chain, cap) in chains {
        let part = &data[at..(at + cap).min(data.len())];
        let n = write_chain(&chain, mem, part).unwrap_or(0);
        at += n;
        used.push((chain.head_index(), n as u32));
    }
    // Each chain's used entry goes in order, the last one publishing all.
    for (head, len) in used {
        let _ = queue.add_used(mem, head, len);
    }
    if at < data.len() {
        m.rx_malformed += 1;
        return Delivery::Dropped;
    }
    Delivery::Done
}

/// Writes a frame in stream framing (tests and benches).
pub fn write_framed(w: &mut impl Write, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(&(frame.len() as u32).to_be_bytes())?;
    w.write_all(frame)
}

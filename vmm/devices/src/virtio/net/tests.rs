//! virtio-net on test virtqueues: the queue logic with a recording
//! backend, and the stream backend with real unix sockets.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::testing::TestQueue;

/// Frames the device sent, and frames to give it.
#[derive(Debug, Default)]
struct Recorder {
    sent: Vec<Vec<u8>>,
    incoming: VecDeque<Vec<u8>>,
    /// Answer `Full` after this many frames.
    room: Option<usize>,
    peer: bool,
}

impl NetBackend for Recorder {
    fn send(&mut self, frame: &[u8]) -> Sent {
        if !self.peer {
            return Sent::NoPeer;
        }
        if self.room == Some(self.sent.len()) {
            return Sent::Full;
        }
        self.sent.push(frame.to_vec());
        Sent::Taken
    }
    fn recv(&mut self) -> Option<Vec<u8>> {
        self.incoming.pop_front()
    }
    fn ready(&mut self) -> bool {
        true
    }
    fn fd(&self) -> RawFd {
        -1
    }
}

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

struct Rig {
    mem: GuestMemoryMmap,
    tq: TestQueue,
    q: Queue,
    /// Next free descriptor index and data address.
    next_desc: u16,
    next_addr: u64,
}

impl Rig {
    fn new() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let tq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
        let q = tq.queue();
        Rig {
            mem,
            tq,
            q,
            next_desc: 0,
            next_addr: 0x10_0000,
        }
    }

    /// Offers a chain of (bytes, writable) buffers; returns their addresses.
    fn offer(&mut self, parts: &[(&[u8], bool)]) -> Vec<u64> {
        let head = self.next_desc;
        let mut addrs = Vec::new();
        for (i, (data, writable)) in parts.iter().enumerate() {
            let addr = self.next_addr;
            self.next_addr += (data.len() as u64).max(1).next_multiple_of(64);
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
            let mut flags = 0;
            if *writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let last = i + 1 == parts.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let idx = self.next_desc;
            self.tq.set_desc(
                &self.mem,
                idx,
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    data.len() as u32,
                    flags,
                    idx.wrapping_add(1) % QUEUE_SIZE,
                )),
            );
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
            addrs.push(addr);
        }
        self.tq.offer(&self.mem, head);
        addrs
    }

    /// A TX chain: header then frame, split after `split` bytes of frame.
    fn offer_tx(&mut self, hdr: [u8; HDR_LEN], frame: &[u8], split: usize) {
        let split = split.min(frame.len());
        self.offer(&[
            (&hdr, false),
            (&frame[..split], false),
            (&frame[split..], false),
        ]);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[12] = 0x08; // an IPv4 ethertype, for looks
    f[13] = 0x00;
    f
}

fn net(backend: Recorder) -> Net<Recorder> {
    let mut n = Net::new(backend, MAC, 1500);
    n.ack_features(n.features());
    n
}

fn peer() -> Recorder {
    Recorder {
        peer: true,
        ..Recorder::default()
    }
}

#[test]
fn features_and_config() {
    let n = Net::new(peer(), MAC, 65520);
    let f = n.features();
    for bit in [F_VERSION_1, F_MAC, F_MRG_RXBUF, F_MTU, F_EVENT_IDX] {
        assert_ne!(f & bit, 0);
    }
    assert_eq!(f & OFFLOADS, 0, "a backend without offloads gets none");
    let c = n.config();
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 65520);
}

#[test]
fn tx_frames_reach_the_backend_whole() {
    let mut r = Rig::new();
    let mut n = net(peer());
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    r.offer_tx([0; HDR_LEN], &f1, 0);
    r.offer_tx([0; HDR_LEN], &f2, 700);
    let pass = n.process_tx(&mut r.q, &r.mem);
    assert!(pass.used && pass.drained);
    assert_eq!(n.backend.sent, vec![f1, f2]);
    assert_eq!(r.tq.used_idx(&r.mem), 2);
    assert_eq!(n.metrics().tx_frames, 2);
    assert_eq!(n.metrics().tx_bytes, 60 + 1514);
}

#[test]
fn short_oversized_and_malformed_tx_chains_are_dropped_and_counted() {
    let mut r = Rig::new();
    let mut n = net(peer());
    // Shorter than header + Ethernet header.
    r.offer_tx([0; HDR_LEN], &[1; 13], 13);
    // Longer than the MTU allows (1500 + 18).
    r.offer_tx([0; HDR_LEN], &frame(1519, 3), 1000);
    // A writable descriptor in a TX chain.
    r.offer(&[(&[0; HDR_LEN], false), (&frame(60, 4), true)]);
    // Offloads asked for without being negotiated (gso_type = TCPv4).
    let mut hdr = [0; HDR_LEN];
    hdr[1] = 1;
    r.offer_tx(hdr, &frame(60, 5), 30);
    // A descriptor pointing outside guest memory.
    let d = r.next_desc;
    r.tq.set_desc(
        &r.mem,
        d,
        RawDescriptor::from(SplitDescriptor::new(1 << 40, 100, 0, 0)),
    );
    r.next_desc += 1;
    r.tq.offer(&r.mem, d);
    // A good one after all of them still goes through.
    let good = frame(100, 6);
    r.offer_tx([0; HDR_LEN], &good, 50);
    n.process_tx(&mut r.q, &r.mem);
    assert_eq!(n.backend.sent, vec![good]);
    assert_eq!(n.metrics().tx_malformed, 5);
    assert_eq!(r.tq.used_idx(&r.mem), 6, "every chain is returned");
}

/// Aliased descriptors can claim any length: the device reads no more
/// than the largest frame before giving up on the chain.
#[test]
fn a_chain_claiming_gigabytes_is_refused_without_reading_it() {
    let mut r = Rig::new();
    let mut n = net(peer());
    let mut parts: Vec<(&[u8], bool)> = vec![(&[0u8; HDR_LEN], false)];
    let big = vec![0u8; 1 << 20];
    for _ in 0..40 {
        parts.push((&big, false));
    }
    r.offer(&parts);
    n.process_tx(&mut r.q, &r.mem);
    assert_eq!(n.metrics().tx_malformed, 1);
    assert!(n.backend.sent.is_empty());
    assert!(n.tx_buf.capacity() <= 2 * (HDR_LEN + MAX_FRAME));
}

#[test]
fn tx_waits_while_the_backend_is_full_and_resumes() {
    let mut r = Rig::new();
    let mut n = net(Recorder {
        room: Some(1),
        ..peer()
    });
    for i in 0..3 {
        r.offer_tx([0; HDR_LEN], &frame(60, i), 10);
    }
    let pass = n.process_tx(&mut r.q, &r.mem);
    assert!(!pass.drained);
    assert!(n.tx_blocked());
    assert_eq!(n.backend.sent.len(), 1);
    assert_eq!(r.tq.used_idx(&r.mem), 1, "the others wait, not lost");
    n.backend.room = None;
    n.process_tx(&mut r.q, &r.mem);
    assert_eq!(n.backend.sent.len(), 3);
    assert_eq!(n.backend.sent[2][0], 2, "in order");
    assert!(!n.tx_blocked());
}

#[test]
fn without_a_peer_tx_frames_are_lost_and_counted() {
    let mut r = Rig::new();
    let mut n = net(Recorder::default());
    r.offer_tx([0; HDR_LEN], &frame(60, 1), 10);
    n.process_tx(&mut r.q, &r.mem);
    assert_eq!(n.metrics().tx_no_peer, 1);
    assert_eq!(r.tq.used_idx(&r.mem), 1);
}

#[test]
fn rx_frames_span_mergeable_buffers_with_their_count() {
    let mut r = Rig::new();
    let big = frame(5000, 7);
    let mut n = net(Recorder {
        incoming: VecDeque::from([frame(60, 1), big.clone()]),
        ..peer()
    });
    let bufs: Vec<u64> = (0..4)
        .map(|_| r.offer(&[(&[0u8; 2048], true)])[0])
        .collect();
    n.pull_from_backend();
    let pass = n.process_rx(&mut r.q, &r.mem);
    assert!(pass.used);
    assert_eq!(r.tq.used_idx(&r.mem), 4, "1 buffer + 3 buffers");
    // First frame: header with num_buffers 1, then the frame.
    let h = r.read(bufs[0], HDR_LEN);
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1);
    assert_eq!(r.read(bufs[0] + HDR_LEN as u64, 60), frame(60, 1));
    assert_eq!(r.tq.used_elem(&r.mem, 0).1, (HDR_LEN + 60) as u32);
    // Second: 12 + 5000 bytes over three 2 KiB buffers.
    let h = r.read(bufs[1], HDR_LEN);
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 3);
    let mut got = r.read(bufs[1] + HDR_LEN as u64, 2048 - HDR_LEN);
    got.extend(r.read(bufs[2], 2048));
    got.extend(r.read(bufs[3], 5000 + HDR_LEN - 4096));
    assert_eq!(got, big);
    let lens: Vec<u32> = (1..4).map(|i| r.tq.used_elem(&r.mem, i).1).collect();
    assert_eq!(lens, [2048, 2048, (5000 + HDR_LEN - 4096) as u32]);
    assert_eq!(n.metrics().rx_frames, 2);
}

#[test]
fn a_frame_waits_whole_until_enough_buffers_arrive() {
    let mut r = Rig::new();
    let mut n = net(Recorder {
        incoming: VecDeque::from([frame(3000, 9)]),
        ..peer()
    });
    r.offer(&[(&[0u8; 2048], true)]);
    n.pull_from_backend();
    let pass = n.process_rx(&mut r.q, &r.mem);
    assert!(!pass.used);
    assert_eq!(r.tq.used_idx(&r.mem), 0, "no partial frame");
    assert_eq!(n.pending_frames(), 1);
    r.offer(&[(&[0u8; 2048], true)]);
    n.process_rx(&mut r.q, &r.mem);
    assert_eq!(r.tq.used_idx(&r.mem), 2);
    assert_eq!(n.pending_frames(), 0);
}

/// A guest that posts no RX buffers: frames queue up to the bound, the
/// rest are dropped and counted.
#[test]
fn a_full_rx_queue_drops_and_counts_beyond_the_bound() {
    let mut r = Rig::new();
    let extra = 100;
    let mut n = net(Recorder {
        incoming: (0..MAX_PENDING_FRAMES + extra)
            .map(|i| frame(60, i as u8))
            .collect(),
        ..peer()
    });
    n.pull_from_backend();
    n.pull_from_backend();
    n.process_rx(&mut r.q, &r.mem);
    assert_eq!(n.pending_frames(), MAX_PENDING_FRAMES);
    assert_eq!(n.metrics().rx_dropped, extra as u64);
    assert!(n.backend.incoming.is_empty(), "the backend is drained");
    // Byte bound too: big frames stop at MAX_PENDING_BYTES.
    let mut n = net(Recorder {
        incoming: (0..200).map(|_| frame(MAX_FRAME, 1)).collect(),
        ..peer()
    });
    n.pull_from_backend();
    assert!(n.pending_frames() * MAX_FRAME <= MAX_PENDING_BYTES);
    assert_eq!(n.metrics().rx_dropped as usize + n.pending_frames(), 200);
}

#[test]
fn rx_without_mergeable_buffers_needs_one_chain_per_frame() {
    let mut r = Rig::new();
    let mut n = Net::new(
        Recorder {
            incoming: VecDeque::from([frame(3000, 1), frame(100, 2)]),
            ..peer()
        },
        MAC,
        1500,
    );
    n.ack_features(F_VERSION_1 | F_MAC);
    let a = r.offer(&[(&[0u8; 1600], true)])[0];
    let b = r.offer(&[(&[0u8; 1600], true)])[0];
    n.pull_from_backend();
    n.process_rx(&mut r.q, &r.mem);
    assert_eq!(n.metrics().rx_too_big, 1);
    assert_eq!(r.tq.used_elem(&r.mem, 0).1, 0, "too big: returned empty");
    assert_eq!(r.tq.used_elem(&r.mem, 1).1, (HDR_LEN + 100) as u32);
    assert_eq!(r.read(b + HDR_LEN as u64, 100), frame(100, 2));
    let _ = a;
}

#[test]
fn read_only_rx_buffers_are_returned_empty() {
    let mut r = Rig::new();
    let mut n = net(Recorder {
        incoming: VecDeque::from([frame(60, 1)]),
        ..peer()
    });
    r.offer(&[(&[0u8; 2048], false)]);
    n.pull_from_backend();
    n.process_rx(&mut r.q, &r.mem);
    assert_eq!(r.tq.used_idx(&r.mem), 1);
    assert_eq!(r.tq.used_elem(&r.mem, 0).1, 0);
    assert_eq!(n.metrics().rx_malformed, 1);
    assert_eq!(n.pending_frames(), 0);
}

// The stream backend, with real sockets.

fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).unwrap();
    f
}

fn recv_within(b: &mut StreamBackend, t: Duration) -> Option<Vec<u8>> {
    let until = std::time::Instant::now() + t;
    loop {
        b.ready();
        if let Some(f) = b.recv() {
            return Some(f);
        }
        if std::time::Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stream_backend_frames_both_ways() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut b = StreamBackend::connected(ours).unwrap();
    assert_eq!(b.send(&frame(60, 1)), Sent::Taken);
    assert_eq!(read_frame(&mut peer), frame(60, 1));
    // Two frames in one write, and one split across writes.
    let mut bytes = Vec::new();
    write_framed(&mut bytes, &frame(70, 2)).unwrap();
    write_framed(&mut bytes, &frame(65000, 3)).unwrap();
    peer.write_all(&bytes[..1000]).unwrap();
    assert_eq!(
        recv_within(&mut b, Duration::from_secs(5)),
        Some(frame(70, 2))
    );
    assert_eq!(b.recv(), None, "the second is incomplete");
    peer.write_all(&bytes[1000..]).unwrap();
    assert_eq!(
        recv_within(&mut b, Duration::from_secs(5)),
        Some(frame(65000, 3))
    );
}

#[test]
fn stream_backend_drops_a_peer_that_breaks_the_framing() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut b = StreamBackend::connected(ours).unwrap();
    peer.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
        .unwrap();
    peer.write_all(&[0; 64]).unwrap();
    assert_eq!(recv_within(&mut b, Duration::from_millis(200)), None);
    assert!(!b.has_peer());
    assert_eq!(b.stats.protocol_errors, 1);
    assert_eq!(b.send(&frame(60, 1)), Sent::NoPeer);
}

#[test]
fn stream_backend_is_bounded_when_the_peer_does_not_read() {
    let (ours, peer) = UnixStream::pair().unwrap();
    let mut b = StreamBackend::connected(ours).unwrap();
    let f = frame(60000, 1);
    let mut taken = 0usize;
    while b.send(&f) == Sent::Taken {
        taken += 1;
        assert!(taken < 10_000, "never full");
    }
    // The socket buffer plus the outbox, nothing more.
    assert!(b.outbox.len() - b.out_pos <= stream::OUTBOX);
    drop(peer);
}

#[test]
fn a_new_peer_replaces_the_old_one_on_the_listening_socket() {
    let dir = std::env::temp_dir().join(format!("berth-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("net.sock");
    let mut b = StreamBackend::listen(&path).unwrap();
    assert_eq!(b.send(&frame(60, 0)), Sent::NoPeer);
    let mut first = UnixStream::connect(&path).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    b.ready();
    assert!(b.has_peer());
    assert_eq!(b.send(&frame(60, 1)), Sent::Taken);
    assert_eq!(read_frame(&mut first), frame(60, 1));
    // passt restarted: the first peer is gone, a second one connects.
    drop(first);
    assert_eq!(recv_within(&mut b, Duration::from_millis(200)), None);
    let mut second = UnixStream::connect(&path).unwrap();
    b.ready();
    write_framed(&mut second, &frame(80, 2)).unwrap();
    assert_eq!(
        recv_within(&mut b, Duration::from_secs(5)),
        Some(frame(80, 2))
    );
    assert_eq!(b.send(&frame(60, 3)), Sent::Taken);
    assert_eq!(read_frame(&mut second), frame(60, 3));
    assert_eq!(b.stats.peers, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The whole device on a stream backend: a frame from the peer lands in
/// the guest's RX buffer, one from the guest reaches the peer.
#[test]
fn device_moves_frames_between_queues_and_a_real_socket() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut r = Rig::new();
    let mut n = Net::new(StreamBackend::connected(ours).unwrap(), MAC, 1500);
    n.ack_features(n.features());
    let buf = r.offer(&[(&[0u8; 2048], true)])[0];
    write_framed(&mut peer, &frame(90, 4)).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while n.pending_frames() == 0 && std::time::Instant::now() < until {
        n.backend.ready();
        n.pull_from_backend();
    }
    n.process_rx(&mut r.q, &r.mem);
    assert_eq!(r.read(buf + HDR_LEN as u64, 90), frame(90, 4));
    let mut tx = Rig::new();
    tx.offer_tx([0; HDR_LEN], &frame(64, 5), 20);
    n.process_tx(&mut tx.q, &tx.mem);
    assert_eq!(read_frame(&mut peer), frame(64, 5));
}

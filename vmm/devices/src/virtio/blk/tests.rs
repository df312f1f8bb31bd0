//! virtio-blk on test virtqueues and a real sparse file.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::device::{InterruptLine, QueueInterrupt};

#[derive(Default)]
struct Line(AtomicUsize);
impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Block,
    next_desc: u16,
    seen_used: u16,
    path: std::path::PathBuf,
    line: Arc<Line>,
}

const W: u16 = VRING_DESC_F_WRITE as u16;

impl Rig {
    fn new(name: &str, size: u64, read_only: bool) -> Rig {
        let path =
            std::env::temp_dir().join(format!("berth-blk-{name}-{}.img", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
        ));
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let mut dev = Block::open(&path, read_only).unwrap();
        let line = Arc::new(Line::default());
        let irq = QueueInterrupt::new(line.clone(), Arc::new(AtomicU32::new(0)));
        dev.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq);
        Rig {
            mem,
            vq,
            dev,
            next_desc: 0,
            seen_used: 0,
            path,
            line,
        }
    }

    /// Submits one request: header, optional data (in or out), status.
    /// Returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, u32, Vec<u8>) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
        let mut descs = vec![(0x10_0000u64, 16u32, 0u16)];
        if !out.is_empty() {
            self.mem.write_slice(out, GuestAddress(0x20_0000)).unwrap();
            descs.push((0x20_0000, out.len() as u32, 0));
        }
        if in_len > 0 {
            descs.push((0x40_0000, in_len, W));
        }
        descs.push((0x80_0000, 1, W));
        self.mem.write_obj(0xaau8, GuestAddress(0x80_0000)).unwrap();
        self.submit(&descs);
        let status = self.mem.read_obj::<u8>(GuestAddress(0x80_0000)).unwrap();
        let mut data = vec![0u8; in_len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(0x40_0000))
            .unwrap();
        let used_len = self.last_used_len();
        (status, used_len, data)
    }

    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        let base = self.next_desc;
        let n = descs.len() as u16;
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let last = i as u16 == n - 1;
                let next = if last { 0 } else { (base + i as u16 + 1) % 256 };
                RawDescriptor::from(SplitDescriptor::new(
                    a,
                    l,
                    if last {
                        f
                    } else {
                        f | VRING_DESC_F_NEXT as u16
                    },
                    next,
                ))
            })
            .collect();
        self.vq.add_desc_chains(&raw, base).unwrap();
        self.next_desc = (base + n) % 256;
        self.dev.queue_notify(0);
    }

    fn last_used_len(&mut self) -> u32 {
        let used = self.vq.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(idx, self.seen_used + 1, "exactly one request completed");
        let slot = (self.seen_used % 256) as u64;
        self.seen_used = idx;
        self.mem.read_obj(used.unchecked_add(8 + slot * 8)).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn write_then_read_back() {
    let mut r = Rig::new("rw", 1 << 20, false);
    let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(r.request(1, 8, &data, 0).0, 0);
    let (st, used, back) = r.request(0, 8, &[], 1024);
    assert_eq!((st, used), (0, 1025));
    assert_eq!(back, data);
    assert!(
        r.line.0.load(Ordering::SeqCst) >= 2,
        "the guest is notified"
    );
    assert_eq!(r.dev.metrics.bytes_written, 1024);
}

#[test]
fn out_of_range_and_misaligned_requests_fail() {
    let mut r = Rig::new("range", 1 << 20, false);
    let sectors = (1 << 20) / 512;
    assert_eq!(r.request(0, sectors, &[], 512).0, 1);
    assert_eq!(r.request(0, sectors - 1, &[], 1024).0, 1);
    assert_eq!(r.request(0, u64::MAX, &[], 512).0, 1);
    assert_eq!(r.request(1, 0, &[1; 100], 0).0, 1, "not a whole sector");
    assert_eq!(
        r.request(0, sectors - 1, &[], 512).0,
        0,
        "the last sector is fine"
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut r = Rig::new("ro", 1 << 20, true);
    assert!(r.dev.features() & F_RO != 0);
    assert_eq!(r.request(1, 0, &[1; 512], 0).0, 1);
    assert_eq!(r.request(0, 0, &[], 512).0, 0);
}

#[test]
fn flush_get_id_and_unknown_types() {
    let mut r = Rig::new("misc", 1 << 20, false);
    assert_eq!(r.request(4, 0, &[], 0).0, 0);
    let (st, _, id) = r.request(8, 0, &[], 20);
    assert_eq!(st, 0);
    assert!(String::from_utf8_lossy(&id).starts_with("berth-blk-misc"));
    assert_eq!(r.request(99, 0, &[], 0).0, 2, "unsupported");
}

#[test]
fn discard_punches_holes_so_the_file_shrinks() {
    let mut r = Rig::new("discard", 8 << 20, false);
    let mb = vec![7u8; 1 << 20];
    for i in 0..4u64 {
        assert_eq!(r.request(1, i * 2048, &mb, 0).0, 0);
    }
    let before = std::fs::metadata(&r.path).unwrap().blocks() * 512;
    // One DISCARD segment over the first 3 MiB, one WRITE_ZEROES (unmap)
    // over the 4th.
    let seg = |start: u64, count: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&start.to_le_bytes());
        s[8..12].copy_from_slice(&count.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    };
    assert_eq!(r.request(11, 0, &seg(0, 3 * 2048, 0), 0).0, 0);
    assert_eq!(r.request(13, 0, &seg(3 * 2048, 2048, 1), 0).0, 0);
    let after = std::fs::metadata(&r.path).unwrap().blocks() * 512;
    assert!(
        before >= 4 << 20 && after < 64 << 10,
        "allocated {before} → {after}"
    );
    let (_, _, back) = r.request(0, 100, &[], 512);
    assert!(back.iter().all(|&b| b == 0));
    // A segment past the end fails.
    assert_eq!(r.request(11, 0, &seg(16383, 2, 0), 0).0, 1);
}

#[test]
fn malformed_chains_do_no_harm() {
    let mut r = Rig::new("bad", 1 << 20, false);
    // No writable status byte at all.
    r.submit(&[(0x10_0000, 16, 0)]);
    assert_eq!(r.last_used_len(), 0);
    // Header too short.
    r.submit(&[(0x10_0000, 8, 0), (0x80_0000, 1, W)]);
    assert_eq!(r.last_used_len(), 1);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x80_0000)).unwrap(), 1);
    // Descriptor outside guest memory.
    r.submit(&[(u64::MAX - 8, 16, 0), (0x80_0000, 1, W)]);
    r.last_used_len();
    // Still works afterwards.
    assert_eq!(r.request(0, 0, &[], 512).0, 0);
}

#[test]
fn a_writable_disk_is_locked_against_a_second_opener() {
    let path = std::env::temp_dir().join(format!("berth-blk-lock-{}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let first = Block::open(&path, false).unwrap();
    assert!(matches!(
        Block::open(&path, false),
        Err(BlockError::InUse(_))
    ));
    assert!(matches!(
        Block::open(&path, true),
        Err(BlockError::InUse(_))
    ));
    drop(first);
    // Read-only openers share.
    let a = Block::open(&path, true).unwrap();
    let b = Block::open(&path, true).unwrap();
    assert!(matches!(
        Block::open(&path, false),
        Err(BlockError::InUse(_))
    ));
    drop((a, b));
    Block::open(&path, false).unwrap();
    std::fs::remove_file(&path).unwrap();
}

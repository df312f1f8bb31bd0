//! virtio-blk on test virtqueues and a real sparse file.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::device::{InterruptLine, QueueInterrupt, VirtioDevice};
use crate::virtio::testing::TestQueue;

/// Storage in memory that counts syncs and fails on demand.
#[derive(Default)]
struct MemStorage {
    bytes: Mutex<Vec<u8>>,
    /// Bytes written since the last good sync: what a crash would lose.
    unsynced: AtomicU64,
    syncs: AtomicU64,
    fail_syncs: AtomicBool,
    /// Writes fail with ENOSPC while set.
    full: AtomicBool,
}

impl MemStorage {
    fn new(len: usize) -> Arc<MemStorage> {
        Arc::new(MemStorage {
            bytes: Mutex::new(vec![0; len]),
            ..MemStorage::default()
        })
    }
}

/// The device side holds one handle, the test another.
struct Shared(Arc<MemStorage>);

impl Storage for Shared {
    fn size(&self) -> u64 {
        self.0.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let b = self.0.bytes.lock().unwrap();
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.0.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut b = self.0.bytes.lock().unwrap();
        b[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        self.0
            .unsynced
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.syncs.fetch_add(1, Ordering::SeqCst);
        if self.0.fail_syncs.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.0.unsynced.store(0, Ordering::SeqCst);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.zero_range(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut b = self.0.bytes.lock().unwrap();
        b[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// A guest driving one queue, with the device's engine run inline (the
/// pure queue handler), or a whole [`Block`] with its worker thread.
struct Rig {
    mem: &'static GuestMemoryMmap,
    vq: TestQueue,
    queue: Queue,
    engine: Engine,
    next_desc: u16,
    seen_used: u16,
    path: Option<std::path::PathBuf>,
}

const W: u16 = VRING_DESC_F_WRITE as u16;

fn test_mem() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
    ))
}

impl Rig {
    /// Over a real sparse file.
    fn new(name: &str, size: u64, read_only: bool) -> Rig {
        let path =
            std::env::temp_dir().join(format!("berth-blk-{name}-{}.img", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let storage = FileStorage::open(&path, read_only).unwrap();
        let mut r = Rig::with(Box::new(storage), read_only, name);
        r.path = Some(path);
        r
    }

    fn with(storage: Box<dyn Storage>, read_only: bool, name: &str) -> Rig {
        let mem = test_mem();
        let vq = TestQueue::new(mem, GuestAddress(0), 256);
        let mut id = [0u8; 20];
        let n = format!("berth-blk-{name}");
        id[..n.len().min(20)].copy_from_slice(&n.as_bytes()[..n.len().min(20)]);
        Rig {
            mem,
            queue: vq.queue(),
            vq,
            engine: Engine::new(storage, read_only, id),
            next_desc: 0,
            seen_used: 0,
            path: None,
        }
    }

    fn metrics(&self) -> BlockMetrics {
        BlockMetrics::from(&*self.engine.counters)
    }

    /// Submits one request: header, optional data (in or out), status.
    /// Returns (status byte, used length, data read).
    fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, u32, Vec<u8>) {
        self.post(kind, sector, out, in_len);
        self.engine.process(&mut self.queue, self.mem);
        self.completion(in_len)
    }

    fn post(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) {
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
        self.add(&descs);
    }

    fn completion(&mut self, in_len: u32) -> (u8, u32, Vec<u8>) {
        let status = self.mem.read_obj::<u8>(GuestAddress(0x80_0000)).unwrap();
        let mut data = vec![0u8; in_len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(0x40_0000))
            .unwrap();
        let used_len = self.last_used_len();
        (status, used_len, data)
    }

    fn add(&mut self, descs: &[(u64, u32, u16)]) {
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
        for (i, d) in raw.into_iter().enumerate() {
            self.vq.set_desc(self.mem, base + i as u16, d);
        }
        self.vq.offer(self.mem, base);
        self.next_desc = (base + n) % 256;
    }

    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        self.add(descs);
        self.engine.process(&mut self.queue, self.mem);
    }

    fn used_idx(&self) -> u16 {
        self.vq.used_idx(self.mem)
    }

    fn last_used_len(&mut self) -> u32 {
        let idx = self.used_idx();
        assert_eq!(idx, self.seen_used + 1, "exactly one request completed");
        let (_, len) = self.vq.used_elem(self.mem, self.seen_used);
        self.seen_used = idx;
        len
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
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
    assert_eq!(r.metrics().bytes_written, 1024);
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
    assert_eq!(r.request(1, 0, &[1; 512], 0).0, 1);
    assert_eq!(r.request(0, 0, &[], 512).0, 0);
}

#[test]
fn get_id_and_unknown_types() {
    let mut r = Rig::new("misc", 1 << 20, false);
    let (st, _, id) = r.request(8, 0, &[], 20);
    assert_eq!(st, 0);
    assert!(String::from_utf8_lossy(&id).starts_with("berth-blk-misc"));
    assert_eq!(r.request(99, 0, &[], 0).0, 2, "unsupported");
}

#[test]
fn flush_syncs_the_storage_and_a_failed_sync_fails_every_later_flush() {
    let mem = MemStorage::new(1 << 20);
    let mut r = Rig::with(Box::new(Shared(mem.clone())), false, "flush");
    assert_eq!(r.request(1, 0, &[5; 4096], 0).0, 0);
    assert_eq!(
        mem.syncs.load(Ordering::SeqCst),
        0,
        "writeback: no sync per write"
    );
    assert_eq!(mem.unsynced.load(Ordering::SeqCst), 4096);
    assert_eq!(r.request(4, 0, &[], 0).0, 0, "FLUSH succeeds");
    assert_eq!(mem.syncs.load(Ordering::SeqCst), 1, "FLUSH is a sync");
    assert_eq!(mem.unsynced.load(Ordering::SeqCst), 0);
    // The host fails one sync: that flush fails, and so does every later
    // one, although the storage would now sync fine.
    assert_eq!(r.request(1, 8, &[6; 4096], 0).0, 0);
    mem.fail_syncs.store(true, Ordering::SeqCst);
    assert_eq!(r.request(4, 0, &[], 0).0, 1, "the failed flush is reported");
    mem.fail_syncs.store(false, Ordering::SeqCst);
    assert_eq!(r.request(4, 0, &[], 0).0, 1, "and never forgotten");
    assert_eq!(r.request(4, 0, &[], 0).0, 1);
    let m = r.metrics();
    assert_eq!((m.flush_failed, m.flush_errors), (1, 3), "{m:?}");
    // Reads and writes still work; only durability is in doubt.
    assert_eq!(r.request(0, 0, &[], 512).0, 0);
}

#[test]
fn without_negotiated_flush_every_write_is_synced_before_it_completes() {
    let mem = MemStorage::new(1 << 20);
    let mut r = Rig::with(Box::new(Shared(mem.clone())), false, "wt");
    r.engine.writeback = false;
    for i in 0..3u64 {
        assert_eq!(r.request(1, i * 8, &[7; 4096], 0).0, 0);
        assert_eq!(mem.syncs.load(Ordering::SeqCst), i + 1);
        assert_eq!(
            mem.unsynced.load(Ordering::SeqCst),
            0,
            "durable on completion"
        );
    }
    // A failing sync fails the write itself.
    mem.fail_syncs.store(true, Ordering::SeqCst);
    assert_eq!(r.request(1, 0, &[8; 512], 0).0, 1);
}

#[test]
fn a_full_host_disk_makes_requests_wait_not_fail() {
    let mem = MemStorage::new(1 << 20);
    let mut r = Rig::with(Box::new(Shared(mem.clone())), false, "full");
    mem.full.store(true, Ordering::SeqCst);
    r.post(1, 0, &[9; 4096], 0);
    let pass = r.engine.process(&mut r.queue, r.mem);
    assert!(!pass.used && r.engine.stalled(), "{pass:?}");
    assert_eq!(r.used_idx(), 0, "nothing completed, no error reported");
    assert_eq!(r.metrics().stalled, 1);
    // Retried: still full, still waiting.
    r.engine.process(&mut r.queue, r.mem);
    assert_eq!(r.used_idx(), 0);
    // Space again: the same request completes, intact.
    mem.full.store(false, Ordering::SeqCst);
    let pass = r.engine.process(&mut r.queue, r.mem);
    assert!(pass.used && !r.engine.stalled());
    assert_eq!(r.completion(0).0, 0);
    assert_eq!(&mem.bytes.lock().unwrap()[..4096], &[9; 4096][..]);
    let m = r.metrics();
    assert_eq!((m.enospc_waits, m.stalled, m.errors), (2, 0, 0), "{m:?}");
}

#[test]
fn requests_longer_than_the_advertised_maximum_fail() {
    let mut r = Rig::new("long", 1 << 30, false);
    // 129 descriptors all aliasing the same 1 MiB of guest memory: 129 MiB
    // of "data" in 1 MiB of memory.
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&0u32.to_le_bytes());
    r.mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
    let mut descs = vec![(0x10_0000u64, 16u32, 0u16)];
    descs.extend(std::iter::repeat_n((0x40_0000u64, 1u32 << 20, W), 127));
    descs.push((0x80_0000, 1, W));
    r.submit(&descs);
    let used = r.last_used_len();
    assert_eq!(used, 1, "status only");
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x80_0000)).unwrap(), 1);
    assert_eq!(r.metrics().bytes_read, 0, "nothing was read");
    // The largest allowed request works.
    let mut descs = vec![(0x10_0000u64, 16u32, 0u16)];
    descs.extend(std::iter::repeat_n((0x40_0000u64, 1u32 << 20, W), 126));
    descs.push((0x80_0000, 1, W));
    r.submit(&descs);
    assert_eq!(r.last_used_len(), (126 << 20) + 1);
}

#[derive(Default)]
struct Line(AtomicUsize);
impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The whole device: a notification is served on the worker thread, the
/// guest is interrupted, and a reset gives the engine back for the next
/// activation.
#[test]
fn the_device_serves_its_queue_on_a_worker_thread() {
    let mem = MemStorage::new(1 << 20);
    let mut dev = Block::with_storage(Box::new(Shared(mem.clone())), false, "worker");
    assert_eq!(dev.features() & F_FLUSH, F_FLUSH);
    for round in 0..2 {
        let mut r = Rig::with(Box::new(Shared(MemStorage::new(512))), false, "unused");
        let line = Arc::new(Line::default());
        let irq = QueueInterrupt::new(line.clone(), Arc::new(AtomicU32::new(0)));
        dev.ack_features(F_VERSION_1 | F_FLUSH);
        dev.activate(r.mem.clone(), vec![r.vq.queue()], irq);
        r.post(1, 0, &[round as u8 + 1; 512], 0);
        dev.queue_notify(0);
        let t0 = std::time::Instant::now();
        while line.0.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r.completion(0).0, 0);
        dev.reset();
    }
    assert_eq!(mem.bytes.lock().unwrap()[0], 2);
    assert_eq!(dev.metrics().writes, 2);
}

#[test]
fn discard_punches_holes_so_the_file_shrinks() {
    let mut r = Rig::new("discard", 8 << 20, false);
    let mb = vec![7u8; 1 << 20];
    for i in 0..4u64 {
        assert_eq!(r.request(1, i * 2048, &mb, 0).0, 0);
    }
    let path = r.path.clone().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks() * 512;
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
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
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

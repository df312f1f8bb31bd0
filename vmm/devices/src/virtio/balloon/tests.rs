//! virtio-balloon on test virtqueues over real guest memory: reported and
//! inflated pages really read as zero afterwards, malformed ranges are
//! refused without harm to the rest.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::release::{HostRelease, Releaser, PAGE};
use super::*;
use crate::virtio::device::InterruptLine;
use crate::virtio::testing::TestQueue;

#[derive(Default)]
struct Line(AtomicUsize);
impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Two regions, as a VM with a hole below 4 GiB has: 0..16 MiB, 32..48 MiB.
const R1: u64 = 32 << 20;
fn two_regions() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20), (GuestAddress(R1), 16 << 20)])
        .unwrap()
}

fn fill(mem: &GuestMemoryMmap, at: u64, len: usize) {
    mem.write_slice(&vec![0xa5; len], GuestAddress(at)).unwrap();
}

fn zero(mem: &GuestMemoryMmap, at: u64, len: usize) -> bool {
    let mut buf = vec![1u8; len];
    mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
    buf.iter().all(|&b| b == 0)
}

/// A balloon activated on three test queues at 0x1000, 0x5000 and 0x9000.
fn balloon(mem: &GuestMemoryMmap, r: Box<dyn Releaser>) -> (Balloon, [TestQueue; 3], Arc<Line>) {
    let qs = [0x1000, 0x5000, 0x9000].map(|a| TestQueue::new(mem, GuestAddress(a), 64));
    let line = Arc::new(Line::default());
    let mut b = Balloon::new(r);
    b.ack_features(F_VERSION_1 | F_REPORTING);
    b.activate(
        mem.clone(),
        qs.iter().map(|q| q.queue()).collect(),
        QueueInterrupt::new(line.clone(), Arc::new(AtomicU32::new(0))),
    );
    (b, qs, line)
}

/// Puts a chain of `(addr, len)` writable buffers at descriptor 0.
fn offer_ranges(mem: &GuestMemoryMmap, q: &TestQueue, ranges: &[(u64, u32)]) {
    for (i, &(addr, len)) in ranges.iter().enumerate() {
        let last = i + 1 == ranges.len();
        let flags = VRING_DESC_F_WRITE as u16 | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
        q.set_desc(
            mem,
            i as u16,
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1)),
        );
    }
    q.offer(mem, 0);
}

/// Offers one inflate/deflate request: the page numbers `pfns`, written at
/// 0xd000.
fn offer_pfns(mem: &GuestMemoryMmap, q: &TestQueue, pfns: impl IntoIterator<Item = u32>) {
    let bytes: Vec<u8> = pfns.into_iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(0xd000)).unwrap();
    q.set_desc(
        mem,
        0,
        RawDescriptor::from(SplitDescriptor::new(0xd000, bytes.len() as u32, 0, 0)),
    );
    q.offer(mem, 0);
}

#[test]
fn reported_ranges_are_released_and_read_as_zero() {
    let mem = two_regions();
    fill(&mem, 0x20_0000, 0x20_0000);
    fill(&mem, R1, 0x1000);
    fill(&mem, 0x40_0000, 0x1000);
    let (mut b, qs, line) = balloon(&mem, Box::new(HostRelease));
    offer_ranges(&mem, &qs[2], &[(0x20_0000, 0x20_0000), (R1, 0x1000)]);
    b.queue_notify(REPORTING_Q);
    assert_eq!(qs[2].used_idx(&mem), 1);
    assert_eq!(qs[2].used_elem(&mem, 0), (0, 0));
    assert!(zero(&mem, 0x20_0000, 0x20_0000), "first range released");
    assert!(zero(&mem, R1, 0x1000), "second region's range released");
    assert!(!zero(&mem, 0x40_0000, 0x1000), "unreported memory kept");
    assert_eq!(b.stats.reported_bytes, 0x20_1000);
    assert_eq!(b.stats.reported_ranges, 2);
    assert_eq!(line.0.load(Ordering::SeqCst), 1);
}

#[test]
fn malformed_ranges_are_refused_and_the_rest_served() {
    let mem = two_regions();
    fill(&mem, 0x10_0000, 0x1000);
    fill(&mem, (16 << 20) - 0x1000, 0x1000);
    let (mut b, qs, _) = balloon(&mem, Box::new(HostRelease));
    offer_ranges(
        &mem,
        &qs[2],
        &[
            (0x10_0800, 0x1000),           // not page-aligned
            (0x10_0000, 0x800),            // not a whole page
            (0x10_0000, 0),                // empty
            ((16 << 20) - 0x1000, 0x2000), // runs off the end of a region
            (20 << 20, 0x1000),            // in the hole between regions
            (u64::MAX - 0xfff, 0x1000),    // at the very top
            (0x10_0000, 0x1000),           // fine
        ],
    );
    b.queue_notify(REPORTING_Q);
    assert_eq!(b.stats.refused, 6);
    assert_eq!(b.stats.reported_ranges, 1);
    assert!(zero(&mem, 0x10_0000, 0x1000));
    assert!(
        !zero(&mem, (16 << 20) - 0x1000, 0x1000),
        "a range running off its region releases nothing"
    );
    assert_eq!(qs[2].used_idx(&mem), 1, "the request is still completed");
}

#[test]
fn inflated_pages_are_released_and_deflation_is_counted() {
    let mem = two_regions();
    fill(&mem, 0x30_0000, 0x3000);
    let (mut b, qs, _) = balloon(&mem, Box::new(HostRelease));
    // Page numbers 0x300 and 0x302, and one beyond guest memory.
    offer_pfns(&mem, &qs[0], [0x300, 0x302, 0xffff_ffff]);
    b.queue_notify(INFLATE_Q);
    assert_eq!(b.stats.inflated_pages, 2);
    assert_eq!(b.stats.refused, 1);
    assert!(zero(&mem, 0x30_0000, 0x1000));
    assert!(
        !zero(&mem, 0x30_1000, 0x1000),
        "page 0x301 was not inflated"
    );
    assert!(zero(&mem, 0x30_2000, 0x1000));

    qs[1].set_desc(
        &mem,
        0,
        RawDescriptor::from(SplitDescriptor::new(0xd000, 8, 0, 0)),
    );
    qs[1].offer(&mem, 0);
    b.queue_notify(DEFLATE_Q);
    assert_eq!(b.stats.deflated_pages, 2);
    assert_eq!(qs[1].used_idx(&mem), 1);
}

#[test]
fn one_request_carries_at_most_256_page_numbers() {
    let mem = two_regions();
    let (mut b, qs, _) = balloon(&mem, Box::new(HostRelease));
    offer_pfns(&mem, &qs[0], 0x400..0x400 + 300);
    b.queue_notify(INFLATE_Q);
    assert_eq!(b.stats.inflated_pages, 256);
    assert_eq!(b.stats.refused, 44);
}

#[test]
fn shared_memory_is_released_by_punching_the_file() {
    // Guest memory in a file, as when vhost-user backends map it.
    let f = unlinked_file(8 << 20);
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        8 << 20,
        Some(FileOffset::new(f.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    fill(&mem, 0x40_0000, 0x20_0000);
    let blocks = |f: &std::fs::File| {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks()
    };
    let (mut b, qs, _) = balloon(&mem, Box::new(HostRelease));
    offer_ranges(&mem, &qs[2], &[(0x40_0000, 0x20_0000)]);
    let before = blocks(&f);
    b.queue_notify(REPORTING_Q);
    assert_eq!(b.stats.reported_bytes, 0x20_0000);
    assert!(zero(&mem, 0x40_0000, 0x20_0000));
    let after = blocks(&f);
    assert!(
        before - after >= (0x20_0000 / 512) as u64,
        "the file gave back its 2 MiB: {before} → {after} blocks"
    );
}

fn unlinked_file(len: u64) -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "berth-balloon-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f.set_len(len).unwrap();
    f
}

/// Records what it was asked to release, and fails on demand.
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<(u64, u64)>>>, bool);
impl Releaser for Recorder {
    fn release(&self, _: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> std::io::Result<()> {
        if self.1 {
            return Err(std::io::Error::other("no"));
        }
        self.0.lock().unwrap().push((addr.0, len));
        Ok(())
    }
}

#[test]
fn a_host_that_refuses_costs_nothing_but_a_count() {
    let mem = two_regions();
    fill(&mem, 0x10_0000, 0x1000);
    let (mut b, qs, _) = balloon(&mem, Box::new(Recorder(Default::default(), true)));
    offer_ranges(&mem, &qs[2], &[(0x10_0000, 0x1000)]);
    b.queue_notify(REPORTING_Q);
    assert_eq!(b.stats.release_errors, 1);
    assert_eq!(b.stats.reported_bytes, 0);
    assert!(!zero(&mem, 0x10_0000, 0x1000));
    assert_eq!(qs[2].used_idx(&mem), 1);
}

#[test]
fn config_space_never_asks_to_inflate_and_keeps_actual() {
    let mem = two_regions();
    let rec = Recorder::default();
    let (mut b, _, _) = balloon(&mem, Box::new(rec.clone()));
    let mut c = [0xffu8; 16];
    b.read_config(0, &mut c);
    assert_eq!(c, [0; 16]);
    b.write_config(4, &7u32.to_le_bytes());
    b.write_config(0, &9u32.to_le_bytes()); // num_pages is ours
    b.write_config(5, &[1]); // torn write
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(c, [0, 0, 0, 0, 7, 0, 0, 0]);
    let mut far = [1u8; 4];
    b.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    // An unknown queue and a notify before activation are ignored.
    b.queue_notify(9);
    b.reset();
    b.queue_notify(REPORTING_Q);
    assert!(rec.0.lock().unwrap().is_empty());
    assert_eq!(b.features() & F_REPORTING, F_REPORTING);
    assert_eq!(PAGE, 4096);
}

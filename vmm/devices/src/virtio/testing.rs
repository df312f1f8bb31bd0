//! A split virtqueue in test memory, laid out as a driver lays it out, for
//! unit tests and benchmarks (feature `test-utils`). virtio-queue 0.17's
//! `MockSplitQueue` places its used ring over the second half of its
//! available ring, so it only works for fewer than `size / 2` offers.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Where one queue's three parts live.
#[derive(Debug, Clone, Copy)]
pub struct TestQueue {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub size: u16,
}

impl TestQueue {
    /// A queue of `size` entries at `base`.
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> TestQueue {
        let desc = base;
        let avail = desc.unchecked_add(16 * size as u64);
        let used = avail
            .unchecked_add(6 + 2 * size as u64)
            .unchecked_align_up(4);
        let q = TestQueue {
            desc,
            avail,
            used,
            size,
        };
        for at in [q.avail, q.used] {
            mem.write_obj(0u32, at).expect("queue outside test memory");
        }
        q
    }

    /// The first address after the used ring.
    pub fn end(&self) -> GuestAddress {
        self.used.unchecked_add(6 + 8 * self.size as u64)
    }

    /// The device's view: a ready queue at these addresses.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    pub fn set_desc(&self, mem: &GuestMemoryMmap, index: u16, d: RawDescriptor) {
        let at = self.desc.unchecked_add((index % self.size) as u64 * 16);
        mem.write_obj(d, at).expect("descriptor table");
    }

    /// Offers the chain starting at `head` (the available ring wraps).
    pub fn offer(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx_at = self.avail.unchecked_add(2);
        let idx: u16 = mem.read_obj(idx_at).expect("avail idx");
        let slot = self.avail.unchecked_add(4 + (idx % self.size) as u64 * 2);
        mem.write_obj(head % self.size, slot).expect("avail ring");
        mem.write_obj(idx.wrapping_add(1), idx_at)
            .expect("avail idx");
    }

    /// How many chains the device has completed (wrapping).
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.used.unchecked_add(2)).expect("used idx")
    }

    /// Used element `n` (wrapping): (descriptor head, bytes written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + (n % self.size) as u64 * 8);
        (
            mem.read_obj(at).expect("used ring"),
            mem.read_obj(at.unchecked_add(4)).expect("used ring"),
        )
    }
}

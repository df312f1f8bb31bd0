//! Turning fuzz input into descriptor chains on a test virtqueue.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: u64 = 1 << 20;

/// Input layout: [n_descs:u8] then n × (addr:u32, len:u32, flags:u16, next:u16),
/// then bytes copied to guest memory at 0x10000.
pub fn load(data: &[u8]) -> Option<(GuestMemoryMmap, Vec<RawDescriptor>)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).ok()?;
    let (&n, mut rest) = data.split_first()?;
    let n = (n % 16) as usize + 1;
    let mut descs = Vec::new();
    for _ in 0..n {
        if rest.len() < 12 {
            return None;
        }
        let addr = u32::from_le_bytes(rest[0..4].try_into().ok()?) as u64;
        let len = u32::from_le_bytes(rest[4..8].try_into().ok()?);
        let flags = u16::from_le_bytes(rest[8..10].try_into().ok()?);
        let next = u16::from_le_bytes(rest[10..12].try_into().ok()?);
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            addr, len, flags, next,
        )));
        rest = &rest[12..];
    }
    let payload = &rest[..rest.len().min(0x8000)];
    mem.write_slice(payload, GuestAddress(0x10000)).ok()?;
    Some((mem, descs))
}

/// A queue at 0 with `descs` in its table and all of them offered.
pub fn queue<'a>(
    mem: &'a GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> Option<(MockSplitQueue<'a, GuestMemoryMmap>, virtio_queue::Queue)> {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
    vq.add_desc_chains(descs, 0).ok()?;
    let q = vq.create_queue().ok()?;
    Some((vq, q))
}

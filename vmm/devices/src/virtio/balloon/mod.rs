//! virtio-balloon with free page reporting: the guest tells us which of its
//! pages are free and we give their host memory back.
//!
//! Berth never asks the guest to inflate (`num_pages` stays 0); what gives
//! memory back is `VIRTIO_BALLOON_F_REPORTING`. The guest's page allocator
//! reports free blocks (2 MiB by default) on the reporting queue a couple
//! of seconds after they were freed, and each reported range is released
//! (see [`release`]). Pages a guest inflates anyway are released the same
//! way; deflating needs nothing from us, as a released page comes back
//! zeroed the next time the guest touches it.
//!
//! Everything the guest puts on the queues is checked: ranges outside its
//! memory, not page-aligned or crossing a memory region are refused and
//! counted, and the rest of the request is still served.

pub mod release;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, ByteValued, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::device::{read_config_window, QueueInterrupt, VirtioDevice};
use release::{Releaser, PAGE};

const VIRTIO_ID_BALLOON: u32 = 5;
const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_BALLOON_F_REPORTING`.
pub const F_REPORTING: u64 = 1 << 5;

const INFLATE_Q: u16 = 0;
const DEFLATE_Q: u16 = 1;
/// With neither the stats nor the free-page-hint queue offered, the driver
/// numbers the reporting queue 2 (absent queues take no index).
const REPORTING_Q: u16 = 2;

/// Page frame numbers one inflate/deflate request may carry (Linux sends at
/// most 256); more are refused, so one request cannot keep us busy.
const MAX_PFNS: usize = 256;

/// The balloon's counters, all since the device was made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStats {
    /// Bytes the guest reported free and we released.
    pub reported_bytes: u64,
    /// Reported ranges released.
    pub reported_ranges: u64,
    /// Pages inflated (and released) and deflated.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Ranges or page numbers refused as malformed.
    pub refused: u64,
    /// Releases the host refused (the memory stays in use; nothing is lost).
    pub release_errors: u64,
}

#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct Config {
    num_pages: u32,
    actual: u32,
    free_page_hint_cmd_id: u32,
    poison_val: u32,
}
// SAFETY: plain old data of four u32s, no padding; any bytes are a valid value.
unsafe impl ByteValued for Config {}

/// The virtio-balloon device.
pub struct Balloon {
    releaser: Box<dyn Releaser>,
    acked: u64,
    actual: u32,
    active: Option<(GuestMemoryMmap, Vec<Queue>, QueueInterrupt)>,
    pub stats: BalloonStats,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("acked", &self.acked)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Balloon {
    /// A balloon that releases memory with `releaser`.
    pub fn new(releaser: Box<dyn Releaser>) -> Balloon {
        Balloon {
            releaser,
            acked: 0,
            actual: 0,
            active: None,
            stats: BalloonStats::default(),
        }
    }

    /// Serves one chain of queue `index`; false if the queue is unknown.
    fn serve_chain(
        &mut self,
        index: u16,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) {
        match index {
            REPORTING_Q => {
                // Each buffer is one free range; the driver offers them
                // device-writable, but only their place and length matter.
                for d in chain {
                    self.release_range(mem, d.addr(), u64::from(d.len()), true);
                }
            }
            INFLATE_Q | DEFLATE_Q => {
                let Ok(mut r) = chain.reader(mem) else {
                    self.stats.refused += 1;
                    return;
                };
                let mut n = 0;
                let mut raw = [0u8; 4];
                while r.available_bytes() >= 4 {
                    if n == MAX_PFNS {
                        self.stats.refused += (r.available_bytes() / 4) as u64;
                        break;
                    }
                    if std::io::Read::read_exact(&mut r, &mut raw).is_err() {
                        self.stats.refused += 1;
                        break;
                    }
                    n += 1;
                    let pfn = u64::from(u32::from_le_bytes(raw));
                    if index == DEFLATE_Q {
                        self.stats.deflated_pages += 1;
                        continue;
                    }
                    // Balloon page numbers are always 4 KiB pages.
                    let addr = GuestAddress(pfn << 12);
                    if self.release_range(mem, addr, PAGE, false) {
                        self.stats.inflated_pages += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// Checks a guest range and releases it; true if released.
    fn release_range(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u64,
        reported: bool,
    ) -> bool {
        if !range_ok(mem, addr, len) {
            self.stats.refused += 1;
            return false;
        }
        match self.releaser.release(mem, addr, len) {
            Ok(()) => {
                if reported {
                    self.stats.reported_bytes += len;
                    self.stats.reported_ranges += 1;
                }
                true
            }
            Err(e) => {
                self.stats.release_errors += 1;
                tracing::debug!("releasing {len} bytes at {:#x}: {e}", addr.0);
                false
            }
        }
    }
}

/// Page-aligned, not empty and within one region of guest memory.
pub fn range_ok(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> bool {
    if len == 0 || !addr.0.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return false;
    }
    let Some(last) = addr.checked_add(len - 1) else {
        return false;
    };
    match (mem.to_region_addr(addr), mem.to_region_addr(last)) {
        (Some((a, _)), Some((b, _))) => std::ptr::eq(a, b),
        _ => false,
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        // The reporting queue needs room for the allocator's 32 ranges.
        &[256, 256, 64]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_REPORTING
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = Config {
            num_pages: 0,
            actual: self.actual.to_le(),
            ..Config::default()
        };
        read_config_window(c.as_slice(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: QueueInterrupt) {
        self.active = Some((mem, queues, interrupt));
    }
    fn queue_notify(&mut self, index: u16) {
        let Some((mem, mut queues, irq)) = self.active.take() else {
            return;
        };
        let mut used = false;
        if let Some(q) = queues.get_mut(usize::from(index)) {
            // The split queue gives each chain once; its size bounds a pass.
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                self.serve_chain(index, &mem, chain);
                let _ = q.add_used(&mem, head, 0);
                used = true;
            }
        }
        if used {
            irq.signal_used();
        }
        self.active = Some((mem, queues, irq));
    }
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.actual = 0;
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        vec![
            // The driver took free page reporting.
            ("reporting", u64::from(self.acked & F_REPORTING != 0)),
            ("reported_bytes", s.reported_bytes),
            ("reported_ranges", s.reported_ranges),
            ("inflated_pages", s.inflated_pages),
            ("deflated_pages", s.deflated_pages),
            ("refused", s.refused),
            ("release_errors", s.release_errors),
        ]
    }
}

/// Serves every available chain of queue `index` of a balloon on `queue`:
/// the queue handler alone, for fuzzing and benchmarks.
pub fn serve_queue(b: &mut Balloon, index: u16, queue: &mut Queue, mem: &GuestMemoryMmap) {
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        b.serve_chain(index, mem, chain);
        let _ = queue.add_used(mem, head, 0);
    }
}

#[cfg(test)]
mod tests;

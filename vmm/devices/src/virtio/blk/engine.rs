//! The queue handler: takes requests off the queue, runs them against the
//! storage, completes them. Pure over the queue, guest memory and a
//! [`Storage`]: no threads or transport here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use berth_limits::RateLimiter;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::request::{self, Outcome};
use super::storage::Storage;
use super::SECTOR_SIZE;
use crate::virtio::queue::Pass;

/// Per-device counters, readable without stopping the device.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    /// FLUSH requests (or writethrough syncs) that failed.
    pub flush_errors: AtomicU64,
    /// 1 once a sync has failed: every later FLUSH fails too.
    pub flush_failed: AtomicU64,
    /// Times a request found the host disk full and waited for space.
    pub enospc_waits: AtomicU64,
    /// 1 while a request waits for space on the host disk.
    pub stalled: AtomicU64,
}

impl Counters {
    pub(super) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// One disk's request logic and durability state.
pub struct Engine {
    pub(super) storage: Box<dyn Storage>,
    pub(super) read_only: bool,
    pub(super) sectors: u64,
    pub(super) id: [u8; 20],
    /// The driver negotiated FLUSH, so completed writes may sit in the
    /// host's page cache until it asks for a flush. Without it every write
    /// is made durable before it completes (writethrough).
    pub(super) writeback: bool,
    /// A sync failed: data the guest was told is written may be gone, and
    /// a later sync could succeed without bringing it back (the kernel
    /// drops dirty pages it failed to write). So every later flush fails.
    pub(super) flush_failed: bool,
    /// The last request found the host disk full and was put back.
    pub(super) stalled: bool,
    pub counters: Arc<Counters>,
    pub(super) log: RateLimiter,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("read_only", &self.read_only)
            .field("sectors", &self.sectors)
            .field("writeback", &self.writeback)
            .field("flush_failed", &self.flush_failed)
            .finish()
    }
}

impl Engine {
    pub fn new(storage: Box<dyn Storage>, read_only: bool, id: [u8; 20]) -> Engine {
        Engine {
            sectors: storage.size() / SECTOR_SIZE,
            storage,
            read_only,
            id,
            writeback: true,
            flush_failed: false,
            stalled: false,
            counters: Arc::new(Counters::default()),
            log: RateLimiter::default(),
        }
    }

    /// Whether the last pass stopped at a request that waits for space on
    /// the host disk; the caller retries later.
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Serves the requests available on `queue`, in order. A request that
    /// finds the host disk full is put back and stops the pass: nothing
    /// after it runs until it has succeeded, so the guest never sees an
    /// error for a full host disk, only a slow one.
    pub fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        let mut used = false;
        self.stalled = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match request::execute(mem, chain, self) {
                Outcome::Done(len) => {
                    if queue.add_used(mem, head, len).is_err() {
                        Counters::add(&self.counters.errors, 1);
                    }
                    used = true;
                }
                Outcome::HostFull => {
                    queue.go_to_previous_position();
                    self.stalled = true;
                    break;
                }
            }
        }
        self.counters
            .stalled
            .store(self.stalled as u64, Ordering::Relaxed);
        Pass {
            used,
            drained: !self.stalled,
        }
    }
}

impl crate::virtio::worker::QueueEngine for Engine {
    fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        Engine::process(self, queue, mem)
    }

    fn stalled(&self) -> bool {
        self.stalled
    }
}

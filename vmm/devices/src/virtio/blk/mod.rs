//! virtio-blk on a raw file: read-only root or read-write data disk.
//!
//! * FLUSH is `fdatasync`; a driver that does not negotiate FLUSH gets
//!   writethrough (every write synced before it completes). Once a sync
//!   has failed, every later flush fails too.
//! * DISCARD and WRITE_ZEROES punch holes, so a sparse file gives space
//!   back.
//! * A full host disk (`ENOSPC`) is never reported to the guest: the
//!   request waits and is retried until there is room (the same policy as
//!   QEMU's default `werror=enospc`, which pauses the VM).
//! * Every request is checked against the disk's size, the chain's shape
//!   and [`MAX_REQUEST_BYTES`]; a bad one gets an error status.
//!
//! Requests run on a worker thread per device ([`worker`]), so a slow
//! `fdatasync` stalls neither the vCPUs nor the VMM's event loop.

mod engine;
mod request;
mod storage;

use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::{read_config_window, QueueInterrupt, VirtioDevice};
use super::worker::Worker;
pub use engine::{Counters, Engine};
pub use request::{RequestError, Status};
pub use storage::{FileStorage, Storage};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
const VIRTIO_ID_BLOCK: u32 = 2;

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Most segments in one DISCARD/WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Most data segments in one request, and the largest segment.
const SEG_MAX: u32 = 126;
const SIZE_MAX: u32 = 1 << 20;
/// The largest request the driver can build from what the config space
/// advertises; anything longer is refused.
pub const MAX_REQUEST_BYTES: usize = SEG_MAX as usize * SIZE_MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {0}: {1}")]
    Open(String, std::io::Error),
    #[error("disk image {0} is {1} bytes, not a multiple of 512")]
    Size(String, u64),
    #[error("disk image {0} is in use by another VM (it holds a lock on it)")]
    InUse(String),
    #[error("cannot start the disk's worker thread: {0}")]
    Worker(std::io::Error),
}

/// A snapshot of the counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockMetrics {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub flush_errors: u64,
    pub flush_failed: u64,
    pub enospc_waits: u64,
    pub stalled: u64,
}

impl From<&Counters> for BlockMetrics {
    fn from(c: &Counters) -> Self {
        let g = Counters::get;
        BlockMetrics {
            reads: g(&c.reads),
            writes: g(&c.writes),
            flushes: g(&c.flushes),
            discards: g(&c.discards),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            errors: g(&c.errors),
            flush_errors: g(&c.flush_errors),
            flush_failed: g(&c.flush_failed),
            enospc_waits: g(&c.enospc_waits),
            stalled: g(&c.stalled),
        }
    }
}

/// The device: features and config here, requests in the [`Engine`],
/// which lives on the worker thread while the device is active.
#[derive(Debug)]
pub struct Block {
    engine: Option<Engine>,
    worker: Option<Worker<Engine>>,
    counters: Arc<Counters>,
    read_only: bool,
    sectors: u64,
    config: Vec<u8>,
    acked: u64,
    name: String,
}

impl Block {
    /// Opens (and locks) a disk image file.
    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let storage = FileStorage::open(path, read_only)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Block::with_storage(Box::new(storage), read_only, &name))
    }

    /// A device over any storage; `name` is its serial (GET_ID) and the
    /// worker thread's name.
    pub fn with_storage(storage: Box<dyn Storage>, read_only: bool, name: &str) -> Block {
        let mut id = [0u8; 20];
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let engine = Engine::new(storage, read_only, id);
        Block {
            counters: engine.counters.clone(),
            sectors: engine.sectors,
            config: config_space(engine.sectors),
            engine: Some(engine),
            worker: None,
            read_only,
            acked: 0,
            name: name.to_owned(),
        }
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn metrics(&self) -> BlockMetrics {
        BlockMetrics::from(&*self.counters)
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            match w.stop() {
                Some(engine) => self.engine = Some(engine),
                None => tracing::error!("virtio-blk {}: the worker thread died", self.name),
            }
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// virtio_blk_config: capacity, size_max, seg_max, and the discard and
/// write-zeroes limits.
fn config_space(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    let max_sectors = u32::MAX / 512;
    c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = F_VERSION_1 | F_EVENT_IDX | F_SIZE_MAX | F_SEG_MAX | F_FLUSH;
        if self.read_only {
            base | F_RO
        } else {
            base | F_DISCARD | F_WRITE_ZEROES
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: QueueInterrupt,
    ) {
        self.stop_worker();
        let (Some(queue), Some(mut engine)) = (queues.pop(), self.engine.take()) else {
            return;
        };
        engine.writeback = self.acked & F_FLUSH != 0;
        match Worker::start(&format!("blk-{}", self.name), engine, mem, queue, interrupt) {
            Ok(w) => self.worker = Some(w),
            Err((engine, e)) => {
                self.engine = engine;
                tracing::error!("virtio-blk {}: {}", self.name, BlockError::Worker(e));
            }
        }
    }

    fn queue_notify(&mut self, _index: u16) {
        if let Some(w) = &self.worker {
            w.notify();
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let m = self.metrics();
        vec![
            ("reads", m.reads),
            ("writes", m.writes),
            ("flushes", m.flushes),
            ("discards", m.discards),
            ("bytes_read", m.bytes_read),
            ("bytes_written", m.bytes_written),
            ("errors", m.errors),
            ("flush_errors", m.flush_errors),
            ("flush_failed", m.flush_failed),
            ("enospc_waits", m.enospc_waits),
            ("stalled", m.stalled),
        ]
    }
}

#[cfg(test)]
mod tests;

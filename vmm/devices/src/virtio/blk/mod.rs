//! virtio-blk on a raw file: read-only root or read-write data disk.
//! FLUSH is `fdatasync`; DISCARD and WRITE_ZEROES punch holes so a sparse
//! file gives space back. Every request is checked against the disk's size
//! and the descriptor chain's shape; a bad one gets an error status.

mod request;

use std::fs::{File, OpenOptions};
use std::path::Path;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{read_config_window, QueueInterrupt, VirtioDevice};
pub use request::{RequestError, Status};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_ID_BLOCK: u32 = 2;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;

/// Most segments in one DISCARD/WRITE_ZEROES request, and data segments.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
const SEG_MAX: u32 = 126;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {0}: {1}")]
    Open(String, std::io::Error),
    #[error("disk image {0} is {1} bytes, not a multiple of 512")]
    Size(String, u64),
    #[error("disk image {0} is in use by another VM (it holds a lock on it)")]
    InUse(String),
}

/// Locks the whole image with an open-file-description lock: exclusive for
/// a writable disk, shared for a read-only one. QEMU takes the same kind of
/// locks, so neither a second berth-vmm nor a QEMU can open a data disk that
/// a running VM writes. The lock goes away with the file, however the
/// process ends.
fn lock_image(file: &std::fs::File, read_only: bool) -> Result<(), std::io::Error> {
    use nix::fcntl::{fcntl, FcntlArg};
    let lock = libc::flock {
        l_type: if read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_SETLK(&lock))
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Per-device counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockMetrics {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

#[derive(Debug)]
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; 20],
    config: Vec<u8>,
    acked: u64,
    active: Option<Active>,
    pub metrics: BlockMetrics,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: QueueInterrupt,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(shown.clone(), e))?;
        if let Err(e) = lock_image(&file, read_only) {
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => BlockError::InUse(shown),
                _ => BlockError::Open(shown, e),
            });
        }
        let len = file
            .metadata()
            .map_err(|e| BlockError::Open(shown.clone(), e))?
            .len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size(shown, len));
        }
        let sectors = len / SECTOR_SIZE;
        let mut id = [0u8; 20];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            sectors,
            id,
            config: config_space(sectors),
            acked: 0,
            active: None,
            metrics: BlockMetrics::default(),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn process_queue(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        loop {
            if a.queue.event_idx_enabled() {
                let _ = a.queue.disable_notification(&a.mem);
            }
            while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
                let head = chain.head_index();
                let len = request::execute(
                    &a.mem,
                    chain,
                    &self.file,
                    self.read_only,
                    self.sectors,
                    &self.id,
                    &mut self.metrics,
                );
                if a.queue.add_used(&a.mem, head, len).is_err() {
                    self.metrics.errors += 1;
                }
                used_any = true;
            }
            if !a.queue.event_idx_enabled() || !a.queue.enable_notification(&a.mem).unwrap_or(false)
            {
                break;
            }
        }
        if used_any && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used();
        }
    }
}

/// virtio_blk_config: capacity, seg_max, and the discard/write-zeroes limits.
fn config_space(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
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
        let base = F_VERSION_1 | F_EVENT_IDX | F_SEG_MAX | F_FLUSH;
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
        if let Some(queue) = queues.pop() {
            self.active = Some(Active {
                mem,
                queue,
                interrupt,
            });
        }
    }

    fn queue_notify(&mut self, _index: u16) {
        self.process_queue();
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let m = &self.metrics;
        vec![
            ("reads", m.reads),
            ("writes", m.writes),
            ("flushes", m.flushes),
            ("discards", m.discards),
            ("bytes_read", m.bytes_read),
            ("bytes_written", m.bytes_written),
            ("errors", m.errors),
        ]
    }
}

#[cfg(test)]
mod tests;

//! virtio-fs: one shared host folder per device, served by
//! `fuse-backend-rs`'s FUSE server over [`ShareFs`] (the passthrough file
//! system behind Berth's confinement and ownership layer).
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the
//! request queue; each is served on its own worker thread ([`Worker`]), so
//! a slow host disk stalls neither the vCPUs nor the VMM's event loop. The
//! same [`FsEngine`] serves the queues of the vhost-user backend.

pub mod hostevents;
mod share;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{read_config_window, QueueInterrupt, VirtioDevice};
use super::queue::Pass;
use super::worker::{QueueEngine, Worker};
pub use share::{ShareFs, ShareOptions, CACHE_TIMEOUT, OWNER_XATTR, RECLAIM_WAIT};

const VIRTIO_ID_FS: u32 = 26;
/// QEMU's vhost-user-fs-device asks for 1024 (its default), as virtiofsd offers.
pub const QUEUE_SIZE: u16 = 1024;
/// The high-priority queue and one request queue.
pub const NUM_QUEUES: usize = 2;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
/// The features the device offers (the same under both transports).
pub const FEATURES: u64 = F_VERSION_1 | F_EVENT_IDX;
/// The longest tag the config space holds.
pub const TAG_MAX: usize = 36;

/// Why a share cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("share tag {0:?} must be 1 to 36 bytes of letters, digits, '-' or '_'")]
    Tag(String),
    #[error("cannot share {0}: {1}")]
    Share(String, std::io::Error),
}

/// Checks a share's tag (what the guest mounts it by).
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    let ok = !tag.is_empty()
        && tag.len() <= TAG_MAX
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FsError::Tag(tag.to_owned()))
    }
}

/// The FUSE server of one share.
pub type FsServer = Server<Arc<ShareFs>>;

/// Counters shared by a device's queues.
#[derive(Debug, Default)]
pub struct FsCounters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
}

/// Serves FUSE requests from one queue.
pub struct FsEngine {
    server: Arc<FsServer>,
    counters: Arc<FsCounters>,
    log: berth_limits::RateLimiter,
}

impl std::fmt::Debug for FsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsEngine")
            .field("counters", &self.counters)
            .finish()
    }
}

impl FsEngine {
    pub fn new(server: Arc<FsServer>, counters: Arc<FsCounters>) -> FsEngine {
        FsEngine {
            server,
            counters,
            log: berth_limits::RateLimiter::default(),
        }
    }

    /// Answers every request available on `queue`. A chain the server
    /// cannot parse is completed with nothing written (the guest's request
    /// fails) and counted; nothing a guest sends stops the queue.
    pub fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let reader = Reader::from_descriptor_chain(mem, chain.clone());
            let writer = VirtioFsWriter::new(mem, chain);
            let written = match (reader, writer) {
                (Ok(r), Ok(w)) => {
                    match self
                        .server
                        .handle_message(r, Writer::VirtioFs(w), None, None)
                    {
                        Ok(n) => n,
                        Err(e) => {
                            self.counters.errors.fetch_add(1, Ordering::Relaxed);
                            if let Some(s) = self.log.hit() {
                                tracing::warn!("virtio-fs: bad request: {e}{s}");
                            }
                            0
                        }
                    }
                }
                _ => {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = self.log.hit() {
                        tracing::warn!("virtio-fs: a descriptor chain outside guest memory{s}");
                    }
                    0
                }
            };
            let len = u32::try_from(written).unwrap_or(0);
            if queue.add_used(mem, head, len).is_err() {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            }
            used = true;
        }
        Pass {
            used,
            drained: true,
        }
    }
}

impl QueueEngine for FsEngine {
    fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        FsEngine::process(self, queue, mem)
    }
}

/// The config space: the tag (NUL padded) and the number of request queues.
pub fn config_space(tag: &str) -> Vec<u8> {
    let mut c = vec![0u8; TAG_MAX + 4];
    let n = tag.len().min(TAG_MAX);
    c[..n].copy_from_slice(&tag.as_bytes()[..n]);
    c[TAG_MAX..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
    c
}

/// A virtio-fs device on berth-vmm's own transport.
pub struct Fs {
    tag: String,
    server: Arc<FsServer>,
    share: Arc<ShareFs>,
    counters: Arc<FsCounters>,
    workers: Vec<Worker<FsEngine>>,
    config: Vec<u8>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("share", &self.share)
            .finish()
    }
}

impl Fs {
    /// Serves `share` to the guest as `tag`.
    pub fn new(tag: &str, share: ShareFs) -> Result<Fs, FsError> {
        check_tag(tag)?;
        let share = Arc::new(share);
        Ok(Fs {
            tag: tag.to_owned(),
            server: Arc::new(Server::new(share.clone())),
            share,
            counters: Arc::default(),
            workers: Vec::new(),
            config: config_space(tag),
        })
    }

    fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            if w.stop().is_none() {
                tracing::error!("virtio-fs {}: a worker thread died", self.tag);
            }
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: QueueInterrupt) {
        self.stop_workers();
        for (i, queue) in queues.into_iter().enumerate() {
            let engine = FsEngine::new(self.server.clone(), self.counters.clone());
            let name = format!("fs-{}-{i}", self.tag);
            match Worker::start(&name, engine, mem.clone(), queue, interrupt.clone()) {
                Ok(w) => self.workers.push(w),
                Err((_, e)) => {
                    tracing::error!("virtio-fs {}: cannot start a worker thread: {e}", self.tag)
                }
            }
        }
    }

    fn queue_notify(&mut self, index: u16) {
        if let Some(w) = self.workers.get(index as usize) {
            w.notify();
        }
    }

    fn reset(&mut self) {
        self.stop_workers();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("requests", g(&self.counters.requests)),
            ("errors", g(&self.counters.errors)),
            ("malformed", g(&self.counters.malformed)),
            ("inodes", self.share.inodes() as u64),
        ]
    }
}

#[cfg(test)]
mod tests;

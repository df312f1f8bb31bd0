//! vhost-user-fs: one shared folder served by `berth-devices`' FUSE engine
//! to QEMU's `vhost-user-fs-device` (QEMU owns the config space: the tag).
//! The high-priority queue and the request queue each run on their own
//! thread of the vhost-user daemon, so neither QEMU's vCPUs nor one queue
//! waits for a slow host disk behind the other.

use std::path::Path;
use std::sync::{Arc, Mutex};

use berth_devices::virtio::fs::watch::HostWatcher;
use berth_devices::virtio::fs::{
    FsCounters, FsEngine, FsServer, ShareFs, ShareOptions, FEATURES, NUM_QUEUES, QUEUE_SIZE,
};
use fuse_backend_rs::api::server::Server;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Why the vhost-user fs backend stopped.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    #[error("cannot serve {0}: {1}")]
    Share(String, std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// One engine per daemon thread (one queue each), each behind its own lock
/// with its own handle on guest memory: the two threads never wait for
/// each other. (Engines were once picked by the event number, which is the
/// queue's index among its thread's queues, so 0 on both threads: the two
/// shared one engine and every FORGET on the hiprio queue held up the
/// request queue, about one contended lock per removed file.)
struct FsBackend {
    engines: Vec<Mutex<QueueEngine>>,
    exit: Vec<(EventConsumer, EventNotifier)>,
}

/// What one queue's thread works with.
struct QueueEngine {
    engine: FsEngine,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    log: berth_limits::RateLimiter,
}

impl FsBackend {
    /// An engine per queue thread, all serving `server`.
    fn new(
        server: &Arc<FsServer>,
        counters: &Arc<FsCounters>,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        exit: Vec<(EventConsumer, EventNotifier)>,
    ) -> FsBackend {
        FsBackend {
            engines: (0..NUM_QUEUES)
                .map(|_| {
                    Mutex::new(QueueEngine {
                        engine: FsEngine::new(server.clone(), counters.clone()),
                        mem: mem.clone(),
                        log: berth_limits::RateLimiter::default(),
                    })
                })
                .collect(),
            exit,
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        for e in &self.engines {
            e.lock().unwrap_or_else(|e| e.into_inner()).mem = mem.clone();
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..NUM_QUEUES).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exit.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // `vrings` holds this thread's queues only, and `device_event` is
        // an index into them; each thread serves one queue.
        let (Some(vring), Some(engine)) = (
            vrings.get(usize::from(device_event)),
            self.engines.get(thread_id),
        ) else {
            tracing::debug!("vhost-user fs: unexpected event {device_event} on thread {thread_id}");
            return Ok(());
        };
        let mut guard = engine.lock().unwrap_or_else(|e| e.into_inner());
        let QueueEngine { engine, mem, log } = &mut *guard;
        let mem = mem.memory();
        super::serve_vring(vring, &mem, log, "vhost-user fs", |queue| {
            engine.process(queue, &mem)
        });
        Ok(())
    }
}

/// Serves `dir` on `socket` until the VMM disconnects; returns the
/// request counters.
pub fn serve(
    socket: &Path,
    dir: &Path,
    opts: ShareOptions,
    events_vsock: Option<&Path>,
) -> Result<Arc<FsCounters>, VhostUserFsError> {
    let mut share = ShareFs::new(dir, opts)
        .map_err(|e| VhostUserFsError::Share(dir.display().to_string(), e))?;
    if let Some(uds) = events_vsock {
        match HostWatcher::start(uds) {
            Ok(w) => share = share.with_watch(w),
            Err(e) => tracing::warn!("vhost-user fs: no file events for {}: {e}", dir.display()),
        }
    }
    let server: Arc<FsServer> = Arc::new(Server::new(Arc::new(share)));
    let counters = Arc::new(FsCounters::default());
    let mut exit = Vec::new();
    for _ in 0..NUM_QUEUES {
        exit.push(
            new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                .map_err(VhostUserFsError::EventFd)?,
        );
    }
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(FsBackend::new(&server, &counters, &mem, exit));
    let mut daemon = VhostUserDaemon::new("berth-fs".into(), backend, mem)
        .map_err(|e| VhostUserFsError::Daemon(e.to_string()))?;
    tracing::info!(
        "vhost-user fs: serving {} on {}",
        dir.display(),
        socket.display()
    );
    daemon
        .serve(socket)
        .map_err(|e| VhostUserFsError::Daemon(e.to_string()))?;
    Ok(counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_user_backend::VringT;

    fn backend(dir: &Path) -> FsBackend {
        let share = ShareFs::new(dir, ShareOptions::within_fds(false, 1024)).unwrap();
        let server: Arc<FsServer> = Arc::new(Server::new(Arc::new(share)));
        let counters = Arc::new(FsCounters::default());
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        FsBackend::new(&server, &counters, &mem, Vec::new())
    }

    /// Each daemon thread's first (only) queue is event 0: the request
    /// queue's thread must not wait while the hiprio thread is busy.
    #[test]
    fn the_queue_threads_do_not_share_an_engine() {
        let dir = std::env::temp_dir().join(format!("berth-vufs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = Arc::new(backend(&dir));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        // The hiprio thread (0) is in the middle of a request.
        let busy = b.engines[0].lock().unwrap();
        let (done, wait) = std::sync::mpsc::channel();
        let b2 = b.clone();
        std::thread::spawn(move || {
            let vring = VringRwLock::new(mem, QUEUE_SIZE).unwrap();
            let r = b2.handle_event(0, EventSet::IN, &[vring], 1);
            let _ = done.send(r.is_ok());
        });
        // Not a timing figure: without separate engines this never returns
        // while `busy` is held.
        let served = wait.recv_timeout(std::time::Duration::from_secs(20));
        drop(busy);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            served,
            Ok(true),
            "the request queue's thread waited for the hiprio thread"
        );
    }
}

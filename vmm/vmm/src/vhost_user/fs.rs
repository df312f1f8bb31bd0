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

/// One engine per queue, each behind its own lock: the two daemon threads
/// never wait for each other.
struct FsBackend {
    engines: Vec<Mutex<(FsEngine, berth_limits::RateLimiter)>>,
    mem: Mutex<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: Vec<(EventConsumer, EventNotifier)>,
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
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
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
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let q = device_event as usize;
        let (Some(vring), Some(engine)) = (vrings.get(q), self.engines.get(q)) else {
            tracing::debug!("vhost-user fs: unexpected event {device_event}");
            return Ok(());
        };
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner()).memory();
        let mut guard = engine.lock().unwrap_or_else(|e| e.into_inner());
        let (engine, log) = &mut *guard;
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
    let backend = Arc::new(FsBackend {
        engines: (0..NUM_QUEUES)
            .map(|_| {
                Mutex::new((
                    FsEngine::new(server.clone(), counters.clone()),
                    berth_limits::RateLimiter::default(),
                ))
            })
            .collect(),
        mem: Mutex::new(mem.clone()),
        exit,
    });
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

//! vhost-user-vsock: the vsock device of `berth-devices` behind the
//! vhost-user protocol. QEMU owns the event queue; we serve RX and TX.

use std::path::Path;
use std::sync::{Arc, RwLock};

use berth_devices::virtio::device::read_config_window;
use berth_devices::virtio::queue::Pass;
use berth_devices::virtio::vsock::{Metrics, Vsock, FEATURES, NUM_QUEUES, QUEUE_SIZE};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Device event numbers as `handle_event` sees them: the thread's vrings
/// (RX, TX) come first; `NUM_QUEUES` is the library's exit event.
const RX_EVENT: u16 = 0;
const TX_EVENT: u16 = 1;
const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Why the vhost-user vsock backend stopped.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    #[error(transparent)]
    Device(#[from] berth_devices::virtio::vsock::VsockError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot watch the host sockets: {0}")]
    Register(std::io::Error),
}

/// The backend state behind the vhost-user handler.
pub struct VsockBackend {
    dev: Vsock,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    exit: (EventConsumer, EventNotifier),
    notify_log: berth_limits::RateLimiter,
}

impl std::fmt::Debug for VsockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockBackend")
            .field("dev", &self.dev)
            .field("event_idx", &self.event_idx)
            .finish()
    }
}

impl VsockBackend {
    fn new(
        guest_cid: u64,
        uds: &Path,
        max_conns: usize,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<Self, VhostUserVsockError> {
        Ok(VsockBackend {
            dev: Vsock::new(guest_cid, uds, max_conns)?,
            mem,
            event_idx: false,
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                .map_err(VhostUserVsockError::EventFd)?,
            notify_log: berth_limits::RateLimiter::default(),
        })
    }

    /// Serves one queue with `work`, then notifies the guest if needed.
    fn run_queue(
        &mut self,
        vring: &VringRwLock,
        work: fn(&mut Vsock, &mut Queue, &GuestMemoryMmap) -> Pass,
    ) {
        let mem = self.mem.memory();
        let dev = &mut self.dev;
        super::serve_vring(vring, &mem, &mut self.notify_log, "vsock", |q| {
            work(dev, q, &mem)
        });
    }
}

impl VhostUserBackendMut for VsockBackend {
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
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        read_config_window(&self.dev.config(), offset as u64, &mut out);
        out
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // RX and TX on one thread; the event queue stays with QEMU.
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let [rx, tx] = vrings else {
            return Ok(());
        };
        match device_event {
            TX_EVENT => self.run_queue(tx, Vsock::process_tx),
            HOST_EVENT => self.dev.handle_host_events(),
            RX_EVENT => {}
            other => tracing::debug!("vsock: unexpected event {other}"),
        }
        // Whatever happened may have produced packets for the guest, and a
        // RX kick means the guest posted buffers for pending ones.
        self.run_queue(rx, Vsock::process_rx);
        Ok(())
    }
}

/// Serves one VMM connection on `socket` with the host side on `uds`, at
/// most `max_conns` host connections at once. Returns the device's
/// counters when the VMM disconnects.
pub fn serve(
    socket: &Path,
    uds: &Path,
    guest_cid: u64,
    max_conns: usize,
) -> Result<Metrics, VhostUserVsockError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(RwLock::new(VsockBackend::new(
        guest_cid,
        uds,
        max_conns,
        mem.clone(),
    )?));
    let host_fd = backend
        .read()
        .map_err(|_| VhostUserVsockError::Daemon("lock poisoned".into()))?
        .dev
        .host_fd();
    let mut daemon = VhostUserDaemon::new("berth-vsock".into(), backend.clone(), mem)
        .map_err(|e| VhostUserVsockError::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    let handler = handlers
        .first()
        .ok_or_else(|| VhostUserVsockError::Daemon("no worker thread".into()))?;
    handler
        .register_listener(host_fd, EventSet::IN, HOST_EVENT as u64)
        .map_err(VhostUserVsockError::Register)?;
    tracing::info!(
        "vhost-user vsock: waiting for the VMM on {}",
        socket.display()
    );
    let served = daemon.serve(socket);
    let metrics = backend.read().map(|b| b.dev.metrics()).unwrap_or_default();
    served.map_err(|e| VhostUserVsockError::Daemon(e.to_string()))?;
    Ok(metrics)
}

//! The vhost-user transport: serves Berth's device logic to an external VMM
//! (QEMU's `vhost-user-*-device`) over a unix socket, for hosts where our
//! own hypervisor backend cannot run.

pub mod fs;
pub mod vsock;

use berth_devices::virtio::queue::{serve as serve_queue, Pass};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Serves one vring with `work` (see [`serve_queue`]), then notifies the
/// guest if needed, never while holding the vring lock. A failed notify is
/// logged through `log` (rate-limited).
pub(crate) fn serve_vring(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    log: &mut berth_limits::RateLimiter,
    what: &str,
    mut work: impl FnMut(&mut Queue) -> Pass,
) {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return;
    }
    let notify = serve_queue(queue, mem, &mut work);
    drop(state);
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            if let Some(s) = log.hit() {
                tracing::warn!("{what}: cannot notify the guest: {e}{s}");
            }
        }
    }
}

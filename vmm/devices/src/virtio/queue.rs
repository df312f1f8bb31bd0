//! Serving a queue with or without `VIRTIO_RING_F_EVENT_IDX`, the one loop
//! every device and transport uses.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

/// What one pass over a queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pass {
    /// Some descriptor chain was completed.
    pub used: bool,
    /// Every available chain was taken (a TX-like queue). A queue whose
    /// handler leaves buffers it has no use for yet (RX) says false.
    pub drained: bool,
}

/// Runs `work` over `queue` until the driver has nothing more for it now,
/// and says whether the driver must be notified.
///
/// With EVENT_IDX the driver does not notify us of buffers it adds while
/// notifications are off, so after each pass notifications are re-enabled
/// and, if buffers arrived meanwhile, the pass repeats (a handler that
/// leaves buffers unused only repeats after it used some, or it would spin
/// on buffers it cannot fill). Without EVENT_IDX one pass suffices.
pub fn serve<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    mut work: impl FnMut(&mut Queue) -> Pass,
) -> bool {
    let event_idx = queue.event_idx_enabled();
    let mut used = false;
    loop {
        if event_idx {
            let _ = queue.disable_notification(mem);
        }
        let pass = work(queue);
        used |= pass.used;
        let more = event_idx && queue.enable_notification(mem).unwrap_or(false);
        if !more || !(pass.used || pass.drained) {
            break;
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

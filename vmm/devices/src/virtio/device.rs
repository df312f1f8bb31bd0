//! What every virtio device offers its transport.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Raises the device's interrupt line (the transport has already set the
/// interrupt status the driver reads).
pub trait InterruptLine: Send + Sync {
    fn trigger(&self);
}

/// Signals the driver that a queue has used buffers.
#[derive(Clone)]
pub struct QueueInterrupt {
    line: Arc<dyn InterruptLine>,
    status: Arc<std::sync::atomic::AtomicU32>,
}

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

impl QueueInterrupt {
    pub fn new(
        line: Arc<dyn InterruptLine>,
        status: Arc<std::sync::atomic::AtomicU32>,
    ) -> QueueInterrupt {
        QueueInterrupt { line, status }
    }

    pub fn signal_used(&self) {
        self.status
            .fetch_or(INT_USED_RING, std::sync::atomic::Ordering::SeqCst);
        self.line.trigger();
    }
}

impl std::fmt::Debug for QueueInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueInterrupt")
    }
}

/// A virtio device: features, config space, activation and its queues'
/// work. No transport, event-loop or hypervisor type appears here.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 4 = entropy, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: take the queues and start.
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: QueueInterrupt);
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// The driver reset the device: drop the queues.
    fn reset(&mut self);
    /// Named counters for the VMM's metrics.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// Copies the window `offset..offset + data.len()` of a config space into
/// `data`; bytes past the end read as zero (the guest may probe anywhere).
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use super::read_config_window;

    #[test]
    fn config_windows() {
        let c = [1u8, 2, 3, 4];
        let mut d = [9u8; 3];
        read_config_window(&c, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        read_config_window(&c, u64::MAX, &mut d);
        assert_eq!(d, [0, 0, 0]);
    }
}

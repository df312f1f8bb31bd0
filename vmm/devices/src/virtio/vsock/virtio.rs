//! The vsock logic as a [`VirtioDevice`], for berth-vmm's own virtio-mmio
//! transport. The VMM calls [`VsockDevice::host_ready`] when
//! [`VsockDevice::host_fd`] is readable.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{Vsock, VsockError, FEATURES, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::device::{read_config_window, QueueInterrupt, VirtioDevice};
use crate::virtio::queue::serve;

const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

#[derive(Debug)]
struct Inner {
    dev: Vsock,
    active: Option<(GuestMemoryMmap, Vec<Queue>, QueueInterrupt)>,
}

/// A cheap handle: the transport owns one, the VMM's host-event loop
/// another.
#[derive(Debug, Clone)]
pub struct VsockDevice {
    inner: Arc<Mutex<Inner>>,
    host_fd: RawFd,
    config: [u8; 8],
    max_conns: usize,
}

impl VsockDevice {
    pub fn new(guest_cid: u64, uds: &Path, max_conns: usize) -> Result<VsockDevice, VsockError> {
        let dev = Vsock::new(guest_cid, uds, max_conns)?;
        Ok(VsockDevice {
            host_fd: dev.host_fd(),
            config: dev.config(),
            max_conns: dev.max_conns(),
            inner: Arc::new(Mutex::new(Inner { dev, active: None })),
        })
    }

    pub fn host_fd(&self) -> RawFd {
        self.host_fd
    }

    /// Host sockets need attention: accept, read, and fill RX buffers.
    pub fn host_ready(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        inner.dev.handle_host_events();
        if let Some((mem, queues, irq)) = inner.active.as_mut() {
            let dev = &mut inner.dev;
            if serve(&mut queues[RX_QUEUE], mem, |q| dev.process_rx(q, mem)) {
                irq.signal_used();
            }
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
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
        if queues.len() == NUM_QUEUES {
            self.inner.lock().unwrap_or_else(|e| e.into_inner()).active =
                Some((mem, queues, interrupt));
        }
    }
    fn queue_notify(&mut self, index: u16) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        let Some((mem, queues, irq)) = inner.active.as_mut() else {
            return;
        };
        let dev = &mut inner.dev;
        let mut notify = false;
        if index as usize == TX_QUEUE {
            notify |= serve(&mut queues[TX_QUEUE], mem, |q| dev.process_tx(q, mem));
        }
        // TX may have produced replies; an RX kick means new buffers.
        notify |= serve(&mut queues[RX_QUEUE], mem, |q| dev.process_rx(q, mem));
        if notify {
            irq.signal_used();
        }
    }
    fn reset(&mut self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).active = None;
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let m = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dev
            .metrics();
        vec![
            ("host_connects", m.host_connects),
            ("guest_connects", m.guest_connects),
            ("conns_open", m.conns_open),
            ("handshakes", m.handshakes),
            ("bytes_to_guest", m.bytes_to_guest),
            ("bytes_to_host", m.bytes_to_host),
            ("rst_sent", m.rst_sent),
            ("bad_packets", m.bad_packets),
            ("timeouts", m.timeouts),
            ("accept_errors", m.accept_errors),
            ("refused_at_cap", m.refused_at_cap),
            ("max_conns", self.max_conns as u64),
        ]
    }
}

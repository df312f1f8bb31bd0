//! virtio-net as a [`VirtioDevice`] for berth-vmm's virtio-mmio transport.
//! The VMM's event loop calls [`NetDevice::backend_ready`] when
//! [`NetDevice::backend_fd`] is readable.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{Net, NetBackend, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
use crate::virtio::device::{read_config_window, QueueInterrupt, VirtioDevice};
use crate::virtio::queue::serve;

const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

#[derive(Debug)]
struct Inner<B> {
    net: Net<B>,
    active: Option<(GuestMemoryMmap, Vec<Queue>, QueueInterrupt)>,
}

impl<B: NetBackend> Inner<B> {
    /// Moves frames both ways as far as buffers and the backend allow.
    fn pump(&mut self, tx_kick: bool) {
        self.net.pull_from_backend();
        let Some((mem, queues, irq)) = self.active.as_mut() else {
            return;
        };
        let net = &mut self.net;
        let mut notify = false;
        if tx_kick || net.tx_blocked() {
            notify |= serve(&mut queues[TX_QUEUE], mem, |q| net.process_tx(q, mem));
        }
        notify |= serve(&mut queues[RX_QUEUE], mem, |q| net.process_rx(q, mem));
        if notify {
            irq.signal_used();
        }
    }
}

/// A cheap handle: the transport owns one, the event loop another.
#[derive(Debug)]
pub struct NetDevice<B> {
    inner: Arc<Mutex<Inner<B>>>,
    backend_fd: RawFd,
    features: u64,
    config: [u8; 12],
}

impl<B> Clone for NetDevice<B> {
    fn clone(&self) -> Self {
        NetDevice {
            inner: self.inner.clone(),
            backend_fd: self.backend_fd,
            features: self.features,
            config: self.config,
        }
    }
}

impl<B: NetBackend> NetDevice<B> {
    pub fn new(backend: B, mac: [u8; 6], mtu: u16) -> NetDevice<B> {
        let net = Net::new(backend, mac, mtu);
        NetDevice {
            backend_fd: net.backend.fd(),
            features: net.features(),
            config: net.config(),
            inner: Arc::new(Mutex::new(Inner { net, active: None })),
        }
    }

    pub fn backend_fd(&self) -> RawFd {
        self.backend_fd
    }

    /// The backend's descriptor was readable.
    pub fn backend_ready(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let writable = g.net.backend.ready();
        let retry_tx = writable && g.net.tx_blocked();
        g.pump(retry_tx);
    }
}

impl<B: NetBackend> VirtioDevice for NetDevice<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .net
            .ack_features(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>, interrupt: QueueInterrupt) {
        if queues.len() == NUM_QUEUES {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            g.active = Some((mem, queues, interrupt));
            g.pump(true);
        }
    }
    fn queue_notify(&mut self, index: u16) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pump(index as usize == TX_QUEUE);
    }
    fn reset(&mut self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).active = None;
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let m = g.net.metrics();
        let mut v = vec![
            ("tx_frames", m.tx_frames),
            ("tx_bytes", m.tx_bytes),
            ("tx_no_peer", m.tx_no_peer),
            ("tx_malformed", m.tx_malformed),
            ("rx_frames", m.rx_frames),
            ("rx_bytes", m.rx_bytes),
            ("rx_dropped", m.rx_dropped),
            ("rx_too_big", m.rx_too_big),
            ("rx_malformed", m.rx_malformed),
            ("rx_pending", g.net.pending_frames() as u64),
        ];
        v.extend(g.net.backend.counters());
        v
    }
}

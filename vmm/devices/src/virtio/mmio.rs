//! The virtio-mmio transport, version 2: registers only. The device's logic
//! sits behind [`VirtioDevice`].
//!
//! A driver notifies queue `i` by writing `i` to QueueNotify. Where the
//! hypervisor can turn such writes into eventfd signals, the VMM wires one
//! per queue ([`MmioTransport::queue_notifiers`]) and calls
//! [`MmioTransport::notify_queue`] from its event loop; otherwise the write
//! reaches [`MmioTransport::write`] and the queue is served inline.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{InterruptLine, QueueInterrupt, VirtioDevice};
use berth_limits::RateLimiter;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4854_5242; // "BRTH"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;
/// The modern interface, which this transport (version 2) requires.
const F_VERSION_1: u64 = 1 << 32;

/// Offset of the InterruptStatus register, which a vCPU may read without
/// the transport's lock (see [`MmioTransport::interrupt_status`]).
pub const INTERRUPT_STATUS: u64 = 0x060;

/// Offset of the QueueNotify register in a device's window.
pub const QUEUE_NOTIFY: u64 = 0x050;

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    line: Arc<dyn InterruptLine>,
    interrupt_status: Arc<AtomicU32>,
    queues: Vec<Queue>,
    /// Each queue's ready bit once the queues went to the device, so the
    /// driver can still read it back.
    live_ready: Vec<bool>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
    bad_access: RateLimiter,
    bad_accesses: u64,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish()
    }
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
    ) -> MmioTransport {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            line,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            queues,
            live_ready: Vec::new(),
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            bad_access: RateLimiter::default(),
            bad_accesses: 0,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| Queue::new(max).ok())
            .collect()
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn bad(&mut self, what: &str, offset: u64) {
        self.bad_accesses += 1;
        if let Some(sup) = self.bad_access.hit() {
            tracing::warn!(
                "virtio-mmio: {what} at offset {offset:#x} ({} so far){sup}",
                self.bad_accesses
            );
        }
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The InterruptStatus register's value, shared: reading it needs no
    /// lock, so a vCPU polling it never waits for a device's work.
    pub fn interrupt_status(&self) -> Arc<AtomicU32> {
        self.interrupt_status.clone()
    }

    /// Where the driver notifies each queue: (offset in the window, the
    /// value it writes there, which is the queue's index).
    pub fn queue_notifiers(&self) -> Vec<(u64, u16)> {
        (0..)
            .zip(self.device.queue_max_sizes())
            .map(|(q, _)| (QUEUE_NOTIFY, q))
            .collect()
    }

    /// The driver notified queue `index`, seen here or through a notifier
    /// outside the vCPU. Ignored until the device is live.
    pub fn notify_queue(&mut self, index: u16) {
        if self.activated {
            self.device.queue_notify(index);
        }
    }

    /// The device's counters plus the transport's own.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut c = self.device.counters();
        c.push(("bad_register_accesses", self.bad_accesses));
        c.push(("driver_ok", self.activated as u64));
        c
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            self.bad("register read not 4 bytes wide", offset);
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.features();
                match self.device_features_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self
                .device
                .queue_max_sizes()
                .get(self.queue_select as usize)
                .map_or(0, |&m| m as u32),
            0x044 if self.activated => self
                .live_ready
                .get(self.queue_select as usize)
                .map_or(0, |&r| r as u32),
            0x044 => self.queue().map_or(0, |q| q.ready() as u32),
            INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                self.bad("read of an unknown register", offset);
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & STATUS_DRIVER_OK != 0 && !self.activated {
                return;
            }
            self.device.write_config(offset - 0x100, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad("register write not 4 bytes wide", offset);
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue registers may only change before the queue is ready and
        // the device is live.
        let queue_setup_allowed = |t: &MmioTransport| {
            t.status & STATUS_FEATURES_OK != 0 && t.status & STATUS_DRIVER_OK == 0
        };
        match offset {
            0x014 => self.device_features_select = v,
            0x020 => {
                if self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_features_select {
                        0 => {
                            self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                        }
                        _ => {}
                    }
                }
            }
            0x024 => self.driver_features_select = v,
            0x030 => self.queue_select = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !queue_setup_allowed(self) {
                    self.bad("queue set up outside FEATURES_OK", offset);
                    return;
                }
                let Some(q) = self.queue() else { return };
                match offset {
                    0x038 => q.set_size(v as u16),
                    0x044 => q.set_ready(v == 1),
                    0x080 => q.set_desc_table_address(Some(v), None),
                    0x084 => q.set_desc_table_address(None, Some(v)),
                    0x090 => q.set_avail_ring_address(Some(v), None),
                    0x094 => q.set_avail_ring_address(None, Some(v)),
                    0x0a0 => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            QUEUE_NOTIFY => {
                // A queue index that doesn't fit is no queue at all.
                if let Ok(index) = u16::try_from(v) {
                    self.notify_queue(index);
                }
            }
            0x064 => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            0x070 => self.set_status(v),
            _ => self.bad("write to an unknown register", offset),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Status only gains bits until a reset; a driver that clears one
        // (or writes after the device asked for a reset) is told to reset.
        if v & self.status != self.status || self.status & STATUS_NEEDS_RESET != 0 {
            self.bad("status write clears bits without a reset", 0x70);
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        let added = v & !self.status;
        // FEATURES_OK only sticks if the driver accepted VERSION_1 (this is
        // the modern transport) and nothing we don't offer.
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = v;
        if added & STATUS_DRIVER_OK != 0 && !self.activated {
            let needed = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if v & needed != needed || !valid || v & STATUS_FAILED != 0 {
                self.bad("DRIVER_OK with invalid queues or features", 0x70);
                self.status |= STATUS_FAILED;
                return;
            }
            let mut queues = std::mem::take(&mut self.queues);
            self.live_ready = queues.iter().map(|q| q.ready()).collect();
            for q in &mut queues {
                q.set_event_idx(
                    self.driver_features
                        & (1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                        != 0,
                );
            }
            let interrupt = QueueInterrupt::new(self.line.clone(), self.interrupt_status.clone());
            self.device.activate(self.mem.clone(), queues, interrupt);
            self.activated = true;
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.live_ready.clear();
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::vsock::VsockDevice;
    use vm_memory::GuestAddress;

    struct NoIrq;
    impl InterruptLine for NoIrq {
        fn trigger(&self) {}
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn identifies_itself_and_exposes_config() {
        let dir = std::env::temp_dir().join(format!("berth-mmio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = VsockDevice::new(7, &dir.join("v.sock"), 16).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem(), Arc::new(NoIrq));
        assert_eq!(r32(&mut t, 0), MAGIC);
        assert_eq!(r32(&mut t, 4), 2);
        assert_eq!(r32(&mut t, 8), 19);
        w32(&mut t, 0x14, 1);
        assert_eq!(r32(&mut t, 0x10), 1, "VERSION_1 in the high word");
        let mut cid = [0u8; 8];
        t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 7);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn names_one_notifier_per_queue() {
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem(), Arc::new(NoIrq));
        assert_eq!(t.queue_notifiers(), [(QUEUE_NOTIFY, 0)]);
        // Before DRIVER_OK a notification is nothing to act on.
        t.notify_queue(0);
        t.notify_queue(u16::MAX);
        let dir = std::env::temp_dir().join(format!("berth-mmio-n-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = VsockDevice::new(7, &dir.join("v.sock"), 16).unwrap();
        let t = MmioTransport::new(Box::new(dev), mem(), Arc::new(NoIrq));
        assert_eq!(
            t.queue_notifiers(),
            [(QUEUE_NOTIFY, 0), (QUEUE_NOTIFY, 1), (QUEUE_NOTIFY, 2)]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Drives a transport to DRIVER_OK with queue 0 set up in `mem`.
    fn bring_up(t: &mut MmioTransport, features_hi: u32) -> u32 {
        w32(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(t, 0x24, 1);
        w32(t, 0x20, features_hi);
        w32(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if r32(t, 0x70) & STATUS_FEATURES_OK == 0 {
            return r32(t, 0x70);
        }
        w32(t, 0x30, 0);
        w32(t, 0x38, 64);
        for (lo, addr) in [(0x080, 0x1000u32), (0x090, 0x2000), (0x0a0, 0x3000)] {
            w32(t, lo, addr);
            w32(t, lo + 4, 0);
        }
        w32(t, 0x044, 1);
        w32(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        r32(t, 0x70)
    }

    #[test]
    fn features_ok_requires_version_1() {
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem(), Arc::new(NoIrq));
        let st = bring_up(&mut t, 0);
        assert_eq!(st & STATUS_FEATURES_OK, 0, "a legacy driver is refused");
        w32(&mut t, 0x70, 0);
        let st = bring_up(&mut t, 1);
        assert_ne!(st & STATUS_DRIVER_OK, 0);
        assert_eq!(st & STATUS_FAILED, 0);
    }

    #[test]
    fn status_only_gains_bits_until_a_reset() {
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem(), Arc::new(NoIrq));
        let live = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(bring_up(&mut t, 1), live);
        // Clearing FEATURES_OK to renegotiate after activation is refused.
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(r32(&mut t, 0x70), live | STATUS_NEEDS_RESET);
        w32(&mut t, 0x24, 0);
        w32(&mut t, 0x20, 0xffff_ffff);
        w32(&mut t, 0x70, live | STATUS_NEEDS_RESET);
        assert_eq!(
            r32(&mut t, 0x70),
            live | STATUS_NEEDS_RESET,
            "only a reset clears it"
        );
        w32(&mut t, 0x70, 0);
        assert_eq!(r32(&mut t, 0x70), 0);
        assert_eq!(bring_up(&mut t, 1), live, "usable again after the reset");
    }

    #[test]
    fn queue_registers_stay_readable_while_live() {
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem(), Arc::new(NoIrq));
        bring_up(&mut t, 1);
        w32(&mut t, 0x30, 0);
        assert_eq!(r32(&mut t, 0x034), 256, "QueueNumMax");
        assert_eq!(r32(&mut t, 0x044), 1, "QueueReady");
        w32(&mut t, 0x30, 1);
        assert_eq!(
            (r32(&mut t, 0x034), r32(&mut t, 0x044)),
            (0, 0),
            "no queue 1"
        );
        let status = t.interrupt_status();
        status.store(1, Ordering::SeqCst);
        assert_eq!(r32(&mut t, INTERRUPT_STATUS), 1);
    }

    #[test]
    fn driver_ok_with_unset_queues_fails_cleanly() {
        let mut t = MmioTransport::new(Box::new(Rng::default()), mem(), Arc::new(NoIrq));
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Offer a feature we don't have: FEATURES_OK must not stick.
        w32(&mut t, 0x24, 0);
        w32(&mut t, 0x20, 1 << 5);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        // Reset, then a proper negotiation with a queue pointing nowhere.
        w32(&mut t, 0x70, 0);
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut t, 0x24, 1);
        w32(&mut t, 0x20, 1);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w32(&mut t, 0x30, 0);
        w32(&mut t, 0x38, 256);
        w32(&mut t, 0x080, 0xffff_f000);
        w32(&mut t, 0x084, 0xffff_ffff);
        w32(&mut t, 0x044, 1);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(
            r32(&mut t, 0x70) & STATUS_FAILED,
            0,
            "invalid queue → FAILED, not a crash"
        );
        // Garbage widths and offsets are ignored.
        t.write(0x50, &[1, 2]);
        let mut b = [0u8; 3];
        t.read(0x44, &mut b);
        w32(&mut t, 0xf0, 5);
        assert!(t
            .counters()
            .iter()
            .any(|(k, v)| *k == "bad_register_accesses" && *v >= 3));
    }
}

//! virtio-rng: fills the guest's buffers from the host's getrandom.

use std::io::Write;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{QueueInterrupt, VirtioDevice};

const VIRTIO_ID_RNG: u32 = 4;
const F_VERSION_1: u64 = 1 << 32;
/// Most bytes given per request, so one guest can't make us spin.
const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Rng {
    active: Option<(GuestMemoryMmap, Queue, QueueInterrupt)>,
    pub bytes: u64,
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: QueueInterrupt,
    ) {
        if let Some(q) = queues.pop() {
            self.active = Some((mem, q, interrupt));
        }
    }
    fn queue_notify(&mut self, _index: u16) {
        let Some((mem, queue, interrupt)) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let mut len = 0;
            if let Ok(mut w) = chain.writer(mem) {
                let n = w.available_bytes().min(MAX_PER_REQUEST);
                let mut buf = vec![0u8; n];
                if getrandom::fill(&mut buf).is_ok() && w.write_all(&buf).is_ok() {
                    len = n as u32;
                }
            }
            self.bytes += len as u64;
            let _ = queue.add_used(&*mem, head, len);
            used = true;
        }
        if used {
            interrupt.signal_used();
        }
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("bytes", self.bytes)]
    }
}

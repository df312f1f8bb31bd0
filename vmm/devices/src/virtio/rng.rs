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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
    use std::sync::Arc;

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::virtio::device::InterruptLine;

    #[derive(Default)]
    struct Line(AtomicUsize);
    impl InterruptLine for Line {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn fills_writable_buffers_and_skips_readonly_ones() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let w = VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, 256, w, 0)),
                RawDescriptor::from(SplitDescriptor::new(0x20_0000, 256, 0, 0)),
            ],
            0,
        )
        .unwrap();
        let line = Arc::new(Line::default());
        let mut rng = Rng::default();
        rng.activate(
            mem.clone(),
            vec![vq.create_queue().unwrap()],
            QueueInterrupt::new(line.clone(), Arc::new(AtomicU32::new(0))),
        );
        rng.queue_notify(0);
        let used = vq.used_addr();
        assert_eq!(
            mem.read_obj::<u16>(used.unchecked_add(2)).unwrap(),
            2,
            "both chains used"
        );
        assert_eq!(mem.read_obj::<u32>(used.unchecked_add(8)).unwrap(), 256);
        assert_eq!(
            mem.read_obj::<u32>(used.unchecked_add(16)).unwrap(),
            0,
            "read-only buffer gets nothing"
        );
        let mut buf = [0u8; 256];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0), "random bytes were written");
        assert_eq!(line.0.load(Ordering::SeqCst), 1);
        assert_eq!(rng.counters(), vec![("bytes", 256)]);
    }
}

//! Arbitrary virtio-mmio register accesses from the guest.
#![no_main]

use std::sync::Arc;

use berth_devices::virtio::device::InterruptLine;
use berth_devices::virtio::mmio::MmioTransport;
use berth_devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct NoIrq;
impl InterruptLine for NoIrq {
    fn trigger(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let mut t = MmioTransport::new(Box::new(Rng::default()), mem, Arc::new(NoIrq));
    // Each access: [kind, offset_lo, offset_hi, size, value:4]
    for op in data.chunks_exact(8) {
        let offset = u16::from_le_bytes([op[1], op[2]]) as u64 % 0x200;
        let size = [1usize, 2, 4, 8][op[3] as usize % 4];
        if op[0] & 1 == 0 {
            let mut buf = vec![0u8; size];
            t.read(offset, &mut buf);
        } else {
            let v = [op[4], op[5], op[6], op[7], 0, 0, 0, 0];
            t.write(offset, &v[..size]);
        }
    }
});

//! Guest-built virtio-net TX chains (headers, lengths, descriptor flags)
//! through the device's queue logic, with a backend that takes some frames
//! and is full for others.
#![no_main]

use berth_devices::virtio::net::{Net, NetBackend, Sent};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

struct Sink {
    taken: usize,
    full_every: usize,
}

impl NetBackend for Sink {
    fn send(&mut self, frame: &[u8]) -> Sent {
        assert!(
            frame.len() >= 14,
            "a frame shorter than an Ethernet header got through"
        );
        self.taken += 1;
        if self.full_every > 0 && self.taken % self.full_every == 0 {
            Sent::Full
        } else {
            Sent::Taken
        }
    }
    fn recv(&mut self) -> Option<Vec<u8>> {
        None
    }
    fn ready(&mut self) -> bool {
        true
    }
    fn fd(&self) -> std::os::fd::RawFd {
        -1
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mem, descs)) = common::load(data) else {
        return;
    };
    let Some((_vq, mut q)) = common::queue(&mem, &descs) else {
        return;
    };
    let full_every = data.last().map_or(0, |b| (*b % 4) as usize);
    let mut net = Net::new(
        Sink {
            taken: 0,
            full_every,
        },
        [2, 0, 0, 0, 0, 1],
        1500,
    );
    net.ack_features(net.features());
    // Twice: once more after a full backend left chains waiting.
    net.process_tx(&mut q, &mem);
    net.process_tx(&mut q, &mem);
});

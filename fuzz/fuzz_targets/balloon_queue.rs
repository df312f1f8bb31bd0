//! Guest-built virtio-balloon requests (reported ranges and inflate/deflate
//! page numbers) through the device's queue handler, releasing real test
//! memory; the queue is picked by the input's last byte.
#![no_main]

use berth_devices::virtio::balloon::{release::HostRelease, serve_queue, Balloon};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let index = u16::from(data.last().copied().unwrap_or(0) % 4);
    let Some((mem, descs)) = common::load(data) else {
        return;
    };
    let Some((_vq, mut q)) = common::queue(&mem, &descs) else {
        return;
    };
    let mut b = Balloon::new(Box::new(HostRelease));
    serve_queue(&mut b, index, &mut q, &mem);
    let s = b.stats;
    assert!(
        s.reported_bytes <= common::MEM_SIZE * 16,
        "more released than offered"
    );
});

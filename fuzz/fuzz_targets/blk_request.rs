//! Guest-built virtio-blk requests against a small disk file.
#![no_main]

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use berth_devices::virtio::blk::Block;
use berth_devices::virtio::device::{InterruptLine, QueueInterrupt, VirtioDevice};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

struct NoIrq;
impl InterruptLine for NoIrq {
    fn trigger(&self) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((mem, descs)) = common::load(data) else {
        return;
    };
    let Some((vq, _)) = common::queue(&mem, &descs) else {
        return;
    };
    let path = std::env::temp_dir().join(format!("berth-fuzz-blk-{}.img", std::process::id()));
    if std::fs::File::create(&path)
        .and_then(|f| f.set_len(64 << 10))
        .is_err()
    {
        return;
    }
    let Ok(mut dev) = Block::open(&path, false) else {
        return;
    };
    let Ok(q) = vq.create_queue() else { return };
    dev.activate(
        mem.clone(),
        vec![q],
        QueueInterrupt::new(Arc::new(NoIrq), Arc::new(AtomicU32::new(0))),
    );
    dev.queue_notify(0);
});

//! Guest-built virtio-blk requests against a small disk file, through the
//! device's queue handler (the engine its worker thread runs).
#![no_main]

use berth_devices::virtio::blk::{Engine, FileStorage};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

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
    let Ok(storage) = FileStorage::open(&path, false) else {
        return;
    };
    let mut engine = Engine::new(Box::new(storage), false, *b"berth-fuzz-blk\0\0\0\0\0\0");
    let Ok(mut q) = vq.create_queue() else { return };
    engine.process(&mut q, &mem);
});

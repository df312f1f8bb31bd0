//! Guest-built vsock TX chains (headers, lengths, ops) through the device.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((mem, descs)) = common::load(data) else {
        return;
    };
    let Some((_vq, mut q)) = common::queue(&mem, &descs) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("berth-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let Ok(mut dev) = berth_devices::virtio::vsock::Vsock::new(3, &dir.join("v.sock"), 64) else {
        return;
    };
    dev.process_tx(&mut q, &mem);
});

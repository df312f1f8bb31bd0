//! FUSE requests from the guest (headers, opcodes, lengths, names, node
//! ids and handles) through the virtio-fs engine and Berth's share layer,
//! over a scratch share with a file, a directory and symlinks pointing out.
//! The input is descriptor chains (see `common.rs`) whose buffers hold the
//! requests; after every run nothing outside the share may have changed.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use berth_devices::virtio::fs::{FsCounters, FsEngine, ShareFs, ShareOptions};
use fuse_backend_rs::api::server::Server;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

struct Scratch {
    root: PathBuf,
    engine: std::sync::Mutex<FsEngine>,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("berth-fuzz-fs-{}", std::process::id()));
        let share = root.join("share");
        std::fs::create_dir_all(share.join("dir")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::write(root.join("outside/secret"), b"secret").unwrap();
        std::fs::write(share.join("file"), b"data").unwrap();
        let _ = std::os::unix::fs::symlink(root.join("outside"), share.join("abs"));
        let _ = std::os::unix::fs::symlink("../outside/secret", share.join("rel"));
        let fs = ShareFs::new(
            &share,
            ShareOptions {
                read_only: false,
                max_inodes: 64,
                max_handles: 64,
            },
        )
        .unwrap();
        let engine = FsEngine::new(
            Arc::new(Server::new(Arc::new(fs))),
            Arc::new(FsCounters::default()),
        );
        Scratch {
            root,
            engine: std::sync::Mutex::new(engine),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    let Some((mem, descs)) = common::load(data) else {
        return;
    };
    let Some((_vq, mut q)) = common::queue(&mem, &descs) else {
        return;
    };
    s.engine.lock().unwrap().process(&mut q, &mem);
    // Nothing outside the share was touched.
    let outside: Vec<_> = std::fs::read_dir(s.root.join("outside")).unwrap().collect();
    assert_eq!(outside.len(), 1, "a file appeared outside the share");
    assert_eq!(
        std::fs::read(s.root.join("outside/secret")).unwrap(),
        b"secret"
    );
});

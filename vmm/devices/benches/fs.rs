//! virtio-fs in process: the FUSE server (fuse-backend-rs passthrough
//! behind Berth's `ShareFs`) driven through a test virtqueue, as a guest's
//! FUSE driver drives it, beside the same operations done with direct
//! syscalls on the same files, in the same run. No VM: this is the cost
//! Berth adds per request, apart from the guest and the transport.
//!
//! `cargo bench -p berth-devices --features test-utils --bench fs`
//! (BERTH_BENCH_DIR picks the directory, default `target/bench-fs`;
//! BERTH_BENCH_SECS the time per case, default 2).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_devices::virtio::fs::testing::{name, Guest, UNLINK};
use berth_devices::virtio::fs::ShareOptions;
use fuse_backend_rs::abi::fuse_abi::{EntryOut, OpenOut};
use vm_memory::ByteValued;

const FILES: usize = 1000;
const BLOCK: usize = 4096;

/// Runs `op` repeatedly for `secs`; operations per second.
fn rate(secs: Duration, mut op: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    let mut n = 0usize;
    while t.elapsed() < secs {
        for _ in 0..64 {
            op(n);
            n += 1;
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn entry(b: &[u8]) -> EntryOut {
    *EntryOut::from_slice(&b[..std::mem::size_of::<EntryOut>()]).unwrap()
}

fn main() {
    let secs = Duration::from_secs_f64(
        std::env::var("BERTH_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0),
    );
    let dir = std::env::var_os("BERTH_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/bench-fs"
            ))
        });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = vec![0x5au8; BLOCK];
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i}")), &data).unwrap();
    }
    let p = |i: usize| -> PathBuf { dir.join(format!("f{}", i % FILES)) };
    let mut g = Guest::new(
        &dir,
        ShareOptions {
            read_only: false,
            max_inodes: 1 << 20,
            max_handles: 1 << 16,
        },
    );
    let f0 = entry(&g.lookup(1, "f0").ok()).nodeid;
    let fh = Guest::fh(g.open(f0, libc::O_RDWR));
    let host = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p(0))
        .unwrap();
    let mut buf = vec![0u8; BLOCK];

    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    rows.push((
        "lookup + forget",
        rate(secs, |i| {
            let e = entry(&g.lookup(1, &format!("f{}", i % FILES)).ok());
            g.forget(e.nodeid, 1);
        }),
        rate(secs, |i| {
            std::fs::symlink_metadata(p(i)).unwrap();
        }),
    ));
    rows.push((
        "getattr",
        rate(secs, |_| {
            g.getattr(f0).ok();
        }),
        rate(secs, |_| {
            host.metadata().unwrap();
        }),
    ));
    rows.push((
        "open + release",
        rate(secs, |_| {
            let h = Guest::fh(g.open(f0, libc::O_RDONLY));
            g.release(f0, h).ok();
        }),
        rate(secs, |i| {
            drop(File::open(p(i)).unwrap());
        }),
    ));
    rows.push((
        "read 4 KiB",
        rate(secs, |_| {
            assert_eq!(g.read(f0, fh, BLOCK as u32).ok().len(), BLOCK);
        }),
        rate(secs, |_| {
            host.read_exact_at(&mut buf, 0).unwrap();
        }),
    ));
    rows.push((
        "write 4 KiB",
        rate(secs, |_| {
            assert_eq!(g.write(f0, fh, &data).errno(), 0);
        }),
        rate(secs, |_| {
            host.write_all_at(&data, 0).unwrap();
        }),
    ));
    let scratch = |i: usize| format!("new{i}");
    rows.push((
        "create + release + unlink",
        rate(secs, |i| {
            let b = g.create(1, &scratch(i), 0o644).ok();
            let e = entry(&b);
            let h = OpenOut::from_slice(&b[std::mem::size_of::<EntryOut>()..][..16])
                .unwrap()
                .fh;
            g.release(e.nodeid, h).ok();
            g.forget(e.nodeid, 1);
            g.call(UNLINK, 1, &name(&scratch(i))).ok();
        }),
        rate(secs, |i| {
            let f = dir.join(scratch(i));
            drop(File::create(&f).unwrap());
            std::fs::remove_file(&f).unwrap();
        }),
    ));
    g.release(f0, fh).ok();

    println!(
        "\nvirtio-fs in process, {FILES} files of {BLOCK} bytes in {}, {:.0} s per case",
        dir.display(),
        secs.as_secs_f64()
    );
    println!(
        "{:<28} {:>14} {:>9} {:>14} {:>9} {:>7}",
        "operation", "Berth ops/s", "µs/op", "syscalls ops/s", "µs/op", "ratio"
    );
    for (what, berth, sys) in rows {
        println!(
            "{what:<28} {berth:>14.0} {:>9.2} {sys:>14.0} {:>9.2} {:>6.2}x",
            1e6 / berth,
            1e6 / sys,
            sys / berth
        );
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}

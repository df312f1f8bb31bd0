//! `cargo bench -p berth-core --bench hygiene` (via `scripts/bench.sh`):
//! what Berth gives back, each figure beside a reference measured in the
//! same run on the same VM.
//!
//! 1. Memory: a container touches 2 GiB and exits; the VM process's
//!    resident memory over the next 30 s, with free page reporting (as
//!    Berth runs) and with it turned off in the guest (its
//!    `page_reporting_order` set to 11 at run time: no free block is that
//!    large, so nothing is reported).
//! 2. Disk: a 1 GiB file written and deleted on the data disk; `data.img`'s
//!    allocated size over the next 10 s, mounted with `discard` (as Berth
//!    mounts it) and remounted without.
//! 3. Clock: the VM paused 20 s through QEMU's monitor; the offset the
//!    clock keeper found (what the guest would keep without it) and the
//!    offset right after.
//!
//! Nothing here talks to anything outside this machine.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MIB: u64 = 1 << 20;

fn status(b: &common::ScratchVm) -> serde_json::Value {
    serde_json::from_str(&b.berth(&["status", "--json"])).unwrap()
}

fn rss(b: &common::ScratchVm) -> u64 {
    status(b)["resources"]["vm_rss_bytes"].as_u64().unwrap_or(0)
}

fn allocated(b: &common::ScratchVm) -> u64 {
    status(b)["resources"]["data_disk_allocated_bytes"]
        .as_u64()
        .unwrap_or(0)
}

/// A container that touches `mib` of memory and keeps it, until
/// [`end_fill`].
fn fill(b: &common::ScratchVm, mib: u32) {
    b.docker(&[
        "run",
        "-d",
        "--name",
        "bench-fill",
        "--tmpfs",
        "/fill:size=2100m",
        "bench/bb:1",
        "sh",
        "-c",
        &format!(
            "dd if=/dev/zero of=/fill/f bs=1M count={mib} 2>/dev/null; echo filled; exec sleep 600"
        ),
    ]);
    let t0 = Instant::now();
    while !b.docker(&["logs", "bench-fill"]).contains("filled") {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "fill took over 300 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn end_fill(b: &common::ScratchVm) {
    b.docker(&["rm", "-f", "bench-fill"]);
}

/// Resident memory every 5 s for 30 s after a container holding 2 GiB
/// exits, in MiB.
fn memory_run(b: &common::ScratchVm) -> (u64, u64, Vec<u64>) {
    fill(b, 16);
    end_fill(b);
    std::thread::sleep(Duration::from_secs(15));
    let idle = rss(b);
    fill(b, 2048);
    let peak = rss(b);
    end_fill(b);
    let mut after = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(5));
        after.push(rss(b) / MIB);
    }
    (idle / MIB, peak / MIB, after)
}

/// `data.img`'s allocated MiB each second for 10 s after deleting 1 GiB.
fn disk_run(b: &common::ScratchVm) -> (u64, u64, Vec<u64>) {
    b.berth(&["shell", "--", "sync"]);
    let before = allocated(b) / MIB;
    b.berth(&[
        "shell",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/var/lib/berth/bench.bin bs=1M count=1024 2>/dev/null && sync",
    ]);
    let full = allocated(b) / MIB;
    b.berth(&[
        "shell",
        "--",
        "sh",
        "-c",
        "rm /var/lib/berth/bench.bin && sync",
    ]);
    let mut after = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        after.push(allocated(b) / MIB);
    }
    (before, full, after)
}

fn monitor(b: &common::ScratchVm, cmd: &str) {
    berth_testkit::qemu_monitor(&b.data_home.join("berth/default/qemu.monitor"), cmd);
}

fn guest_offset_ms(b: &common::ScratchVm) -> (f64, f64) {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
    };
    let t0 = now();
    let out = b.berth(&["shell", "--", "date", "+%s%N"]);
    let t1 = now();
    let g: i128 = out.trim().parse().unwrap();
    ((g - (t0 + t1) / 2) as f64 / 1e6, (t1 - t0) as f64 / 2e6)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let b = common::ScratchVm::new("bench-hygiene");
    let _dead = b.no_outside_dns();
    b.berth(&["config", "set", "memory_mib", "3072"]);
    b.berth(&["start"]);
    let driver = status(&b)["driver"].as_str().unwrap_or("?").to_owned();
    let tar = berth_testkit::busybox_rootfs_tar(&b.work);
    b.docker(&["import", tar.to_str().unwrap(), "bench/bb:1"]);
    println!("driver {driver}, 3 GiB guest");

    let with = memory_run(&b);
    let disk_with = disk_run(&b);
    b.berth(&[
        "shell",
        "--",
        "mount",
        "-o",
        "remount,nodiscard",
        "/var/lib/berth",
    ]);
    let disk_without = disk_run(&b);
    b.berth(&["shell", "--", "fstrim", "/var/lib/berth"]);

    let clock = if driver.starts_with("qemu") {
        let (before, _) = guest_offset_ms(&b);
        monitor(&b, "stop");
        std::thread::sleep(Duration::from_secs(20));
        monitor(&b, "cont");
        let t = Instant::now();
        let (after, err) = guest_offset_ms(&b);
        let took = t.elapsed();
        let found = status(&b)["clock"]["last_correction"]["offset_ms"]
            .as_f64()
            .unwrap_or(f64::NAN);
        Some((before, found, after, err, took))
    } else {
        None
    };

    // Reporting off: no free block is of order 11 (the largest is 10).
    // Written at run time: Linux 6.1 overwrites the boot parameter when
    // the balloon driver registers.
    b.berth(&[
        "shell",
        "--",
        "sh",
        "-c",
        "echo 11 > /sys/module/page_reporting/parameters/page_reporting_order",
    ]);
    let order = b.berth(&[
        "shell",
        "--",
        "cat",
        "/sys/module/page_reporting/parameters/page_reporting_order",
    ]);
    assert_eq!(order.trim(), "11", "page reporting could not be turned off");
    let without = memory_run(&b);

    println!("\nmemory (VM process resident, MiB), a container touching 2 GiB then exiting:");
    for (name, (idle, peak, after)) in [
        ("free page reporting (Berth)", with),
        ("reference: reporting off", without),
    ] {
        println!("  {name:<30} idle {idle:>5}  with 2 GiB {peak:>5}  then every 5 s: {after:?}");
    }
    println!("\ndisk (data.img allocated, MiB), 1 GiB written then deleted:");
    for (name, (before, full, after)) in [
        ("mounted with discard (Berth)", disk_with),
        ("reference: without discard", disk_without),
    ] {
        println!("  {name:<30} before {before:>5}  written {full:>5}  then every 1 s: {after:?}");
    }
    if let Some((before, found, after, err, took)) = clock {
        println!(
            "\nclock, a 20 s pause (QEMU's monitor): before {before:+.1} ms; the keeper found {found:+.1} ms at the resume (the reference: what the guest would keep); {after:+.1} ms (±{err:.1}) read {:.0} ms after `cont`",
            took.as_secs_f64() * 1000.0
        );
    }
}

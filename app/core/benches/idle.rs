//! `cargo bench -p berth-core --bench idle` (via `scripts/bench.sh`): the
//! host CPU an idle Berth takes, per process, beside the same guest booted
//! by plain QEMU with no Berth process, in the same run.
//!
//! 1. Berth: `berth start`, no containers; after a settling period, each
//!    process's CPU time (user + system, from `/proc/<pid>/stat`) over the
//!    measured window: the host agent, the VM process, its helpers
//!    (vhost-user backends) and passt.
//! 2. Reference: the same kernel, root image and a fresh data disk under
//!    `qemu-system-x86_64` with the qemu driver's machine and kernel
//!    options, no vsock, network, balloon, shared folders or host agent;
//!    the guest agent still starts dockerd (it logs `docker-ready` on the
//!    console).
//!
//! Figures are CPU seconds per idle minute. BERTH_BENCH_IDLE_S sets the
//! window (default 60) and BERTH_BENCH_SETTLE_S the settling time before
//! it (default 60). Nothing here talks to anything outside this machine.

mod common;

use berth_core::driver::{accel_args, guest_has_rdrand, kernel_options, Accel};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn env_secs(key: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// User + system CPU of `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some(ticks as f64 / hz)
}

fn name_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// CPU seconds per minute of each process over `window`.
fn measure(pids: &[(String, u32)], window: Duration) -> Vec<(String, u32, f64)> {
    let before: Vec<Option<f64>> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    std::thread::sleep(window);
    pids.iter()
        .zip(before)
        .map(|((n, p), b)| {
            let used = match (b, cpu_seconds(*p)) {
                (Some(b), Some(a)) => a - b,
                _ => f64::NAN,
            };
            (n.clone(), *p, used * 60.0 / window.as_secs_f64())
        })
        .collect()
}

fn print_rows(rows: &[(String, u32, f64)]) {
    for (n, p, s) in rows {
        println!(
            "  {n:<28} pid {p:<8} {s:>7.3} CPU s/min  ({:.2} % of a core)",
            s / 60.0 * 100.0
        );
    }
}

fn image_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("BERTH_IMAGE_DIR").expect("BERTH_IMAGE_DIR (scripts/bench.sh sets it)"),
    )
}

/// The same guest under plain QEMU; returns once dockerd is ready.
fn plain_qemu(work: &Path, kvm: bool, cpus: u8, memory_mib: u64) -> Child {
    let img = berth_core::driver::Image::load(&image_dir()).expect("guest image");
    let disk = work.join("plain-data.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(64 << 30).unwrap();
    let console = work.join("plain-console.log");
    // The accelerator and kernel options the qemu driver uses.
    let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
    let rng = !guest_has_rdrand(accel);
    let extra = kernel_options(accel, rng);
    let mem = format!("{memory_mib}M");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-device",
        "i8042",
        "-global",
        "virtio-mmio.force-legacy=false",
    ])
    .args(accel_args(accel))
    .args(["-smp", &cpus.to_string(), "-m", &mem])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(&img.kernel)
    .arg("-append")
    .arg(format!("{}{extra} berth.data_fresh=1", img.cmdline))
    .arg("-drive")
    .arg(format!(
        "id=d0,file={},format=raw,if=none,readonly=on",
        img.rootfs.display()
    ))
    .args(["-device", "virtio-blk-device,drive=d0"])
    .arg("-drive")
    .arg(format!(
        "id=d1,file={},format=raw,if=none,discard=unmap,cache=writeback",
        disk.display()
    ))
    .args(["-device", "virtio-blk-device,drive=d1"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if rng {
        cmd.args(["-device", "virtio-rng-device"]);
    }
    let child = cmd.spawn().expect("qemu-system-x86_64");
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("docker-ready") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the plain QEMU guest did not get Docker ready:\n{}",
            &text[text.len().saturating_sub(3000)..]
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    child
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let window = env_secs("BERTH_BENCH_IDLE_S", 60);
    let settle = env_secs("BERTH_BENCH_SETTLE_S", 60);
    let b = common::ScratchVm::new("bench-idle");
    let _dead = b.no_outside_dns();
    b.berth(&["start"]);
    assert_eq!(
        b.docker(&["ps", "-aq"]).trim(),
        "",
        "idle means no containers"
    );
    let status: serde_json::Value = serde_json::from_str(&b.berth(&["status", "--json"])).unwrap();
    let driver = status["driver"].as_str().unwrap_or("?").to_owned();
    let cpus = status["cpus"].as_u64().unwrap_or(2) as u8;
    let memory_mib = status["memory_mib"].as_u64().unwrap_or(2048);
    let state = b.data_home.join("berth/default");
    let mut pids: Vec<(String, u32)> = Vec::new();
    if let Some(p) = status["host_agent_pid"].as_u64() {
        pids.push(("host agent".into(), p as u32));
    }
    let vm_pid = status["pid"].as_u64().map(|p| p as u32);
    for p in std::fs::read_to_string(state.join("vm.pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
    {
        let role = if Some(p) == vm_pid {
            format!("VM process ({})", name_of(p))
        } else {
            format!("helper ({})", name_of(p))
        };
        pids.push((role, p));
    }
    if let Some(p) = status["network"]["passt"]["pid"].as_u64() {
        pids.push(("network (passt)".into(), p as u32));
    }
    println!(
        "idle CPU, driver {driver}, {cpus} vCPUs, {memory_mib} MiB; settling {} s, then {} s measured",
        settle.as_secs(),
        window.as_secs()
    );
    std::thread::sleep(settle);
    let berth = measure(&pids, window);
    b.berth(&["stop"]);

    let child = plain_qemu(&b.work, driver == "qemu-kvm", cpus, memory_mib);
    std::thread::sleep(settle);
    let plain = measure(&[("plain QEMU".into(), child.id())], window);
    let mut child = child;
    let _ = child.kill();
    let _ = child.wait();

    println!("\nBerth, idle (no containers):");
    print_rows(&berth);
    let own: f64 = berth
        .iter()
        .filter(|(n, p, _)| Some(*p) != vm_pid && !n.starts_with("VM process"))
        .map(|r| r.2)
        .sum();
    let vm: f64 = berth
        .iter()
        .filter(|(_, p, _)| Some(*p) == vm_pid)
        .map(|r| r.2)
        .sum();
    println!("reference, the same guest under plain QEMU, no Berth process:");
    print_rows(&plain);
    println!(
        "\nBerth's own host processes (all but the VM process): {own:.3} CPU s/min = {:.2} % of one core (goal < 0.5 %)",
        own / 60.0 * 100.0
    );
    println!(
        "VM process under Berth {vm:.2} CPU s/min vs plain QEMU {:.2} CPU s/min",
        plain[0].2
    );
}

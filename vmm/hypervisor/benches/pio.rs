//! PIO exit round trips per second on this host's /dev/kvm: a tiny
//! real-mode guest that does `out 0x10, al` N times, run by our KVM backend
//! (every exit dispatched to an I/O handler in user space), beside QEMU
//! (`-accel kvm`) running the same loop on the same /dev/kvm in the same run
//! (QEMU's time for 1,000 exits is subtracted, which removes its start-up).
//!
//! `cargo bench -p berth-hypervisor --bench pio` (BERTH_BENCH_EXITS, default
//! 1,000,000). Needs /dev/kvm; QEMU is skipped if not installed.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use berth_hypervisor::kvm::Kvm;
use berth_hypervisor::{Hypervisor, IoHandler, Regs, Vcpu, VcpuExit, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `mov ecx, n; l: out 0x10, al; dec ecx; jnz l`, then `tail`.
fn program(n: u32, tail: &[u8]) -> Vec<u8> {
    let mut p = vec![0x66, 0xb9];
    p.extend_from_slice(&n.to_le_bytes());
    p.extend_from_slice(&[0xe6, 0x10, 0x66, 0x49, 0x75, 0xfa]);
    p.extend_from_slice(tail);
    p
}

struct Count(u64);
impl IoHandler for Count {
    fn pio_read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {
        self.0 += 1;
    }
    fn mmio_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {}
}

fn ours(n: u32) -> Option<f64> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("*** SKIPPED: needs /dev/kvm ({e}) ***");
            return None;
        }
    };
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    mem.write_slice(&program(n, &[0xf4]), GuestAddress(0x1000))
        .unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.map_memory(mem).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&Regs {
        rip: 0x1000,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
    let mut io = Count(0);
    let t0 = Instant::now();
    let exit = vcpu.run(&mut io).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(exit, VcpuExit::Halt);
    assert_eq!(io.0, n as u64);
    Some(n as f64 / secs)
}

/// Seconds QEMU takes to run the loop `n` times from its reset vector and
/// leave through isa-debug-exit.
fn qemu_seconds(n: u32) -> Option<f64> {
    let mut img = vec![0x90u8; 65536];
    // At F000:0000: the loop, then `mov al, 0; out 0xf4, al`.
    let p = program(n, &[0xb0, 0x00, 0xe6, 0xf4, 0xf4]);
    img[..p.len()].copy_from_slice(&p);
    // The reset vector (F000:FFF0): jmp F000:0000.
    img[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    let path = std::env::temp_dir().join(format!("berth-pio-{n}-{}.bin", std::process::id()));
    std::fs::write(&path, img).ok()?;
    let t0 = Instant::now();
    let out = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "pc",
            "-accel",
            "kvm",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-m", "16"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-bios"])
        .arg(&path)
        .output()
        .ok();
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    // isa-debug-exit: exit status (0 << 1) | 1.
    match out {
        Some(o) if o.status.code() == Some(1) => Some(secs),
        Some(o) => {
            println!(
                "QEMU -accel kvm did not run the guest here ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        None => {
            println!("QEMU not installed: skipped");
            None
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u32 = std::env::var("BERTH_BENCH_EXITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("PIO exits on /dev/kvm, {n} per run");
    let Some(ours) = ours(n) else { return };
    println!("berth-hypervisor (KVM backend): {ours:>10.0} exits/s");
    if let (Some(big), Some(small)) = (qemu_seconds(n), qemu_seconds(1000)) {
        let per_sec = (n - 1000) as f64 / (big - small);
        println!(
            "QEMU -accel kvm:                {per_sec:>10.0} exits/s ({:.2} s for {n}, {:.2} s for 1000)",
            big, small
        );
        println!("ratio: {:.2}x", ours / per_sec);
    }
}

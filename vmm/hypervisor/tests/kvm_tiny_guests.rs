//! The KVM backend on the real /dev/kvm, with tiny real-mode guest programs.
//! Needs /dev/kvm (any KVM, including kvm_pvm). Without it each test prints
//! a loud SKIPPED line, unless BERTH_KVM_REQUIRED=1 makes that a failure.

#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_hypervisor::kvm::Kvm;
use berth_hypervisor::{Hypervisor, IoHandler, Regs, Vcpu, VcpuExit, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            if std::env::var("BERTH_KVM_REQUIRED").as_deref() == Ok("1") {
                panic!("KVM is required: {e}");
            }
            eprintln!("\n*** SKIPPED (needs /dev/kvm): {e} ***\n");
            None
        }
    }
}

/// Records every access; reads answer from `replies`.
#[derive(Default)]
struct Recorder {
    log: Vec<String>,
    pio_replies: HashMap<u16, u8>,
    mmio_replies: HashMap<u64, u8>,
}

impl IoHandler for Recorder {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(*self.pio_replies.get(&port).unwrap_or(&0xff));
        self.log.push(format!("in {port:#x}"));
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.log.push(format!("out {port:#x} {:#x}", data[0]));
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        data.fill(*self.mmio_replies.get(&addr).unwrap_or(&0xff));
        self.log.push(format!("mmio read {addr:#x}"));
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.log
            .push(format!("mmio write {addr:#x} {:#x}", data[0]));
    }
}

/// A VM with `ranges` of memory, `code` at 0x1000, one real-mode vCPU
/// starting there.
fn real_mode_vm<H: Hypervisor>(
    h: &H,
    ranges: &[(u64, usize)],
    code: &[u8],
) -> (H::Vm, Arc<GuestMemoryMmap>) {
    let regions: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&regions).unwrap());
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let vm = h.create_vm().unwrap();
    vm.map_memory(mem.clone()).unwrap();
    (vm, mem)
}

fn start_real_mode(vcpu: &impl Vcpu, ip: u64) {
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&Regs {
        rip: ip,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
}

#[test]
fn pio_and_mmio_are_dispatched_to_the_handler() {
    let Some(kvm) = kvm() else { return };
    let code = [
        0xb0, 0x42, // mov al, 0x42
        0xe6, 0x10, // out 0x10, al
        0xe4, 0x11, // in al, 0x11
        0x88, 0xc3, // mov bl, al
        0xb8, 0x00, 0x20, // mov ax, 0x2000
        0x8e, 0xd8, // mov ds, ax
        0x88, 0x1e, 0x00, 0x00, // mov [0x0], bl   (MMIO write 0x20000)
        0x8a, 0x0e, 0x10, 0x00, // mov cl, [0x10]  (MMIO read 0x20010)
        0x88, 0xc8, // mov al, cl
        0xe6, 0x12, // out 0x12, al
        0xf4, // hlt
    ];
    // Only 0..64 KiB is RAM: 0x20000 is unmapped, so accesses there are MMIO.
    let (vm, _mem) = real_mode_vm(&kvm, &[(0, 0x10000)], &code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(&vcpu, 0x1000);
    let mut io = Recorder::default();
    io.pio_replies.insert(0x11, 0x99);
    io.mmio_replies.insert(0x20010, 0x77);
    assert_eq!(vcpu.run(&mut io).unwrap(), VcpuExit::Halt);
    assert_eq!(
        io.log,
        [
            "out 0x10 0x42",
            "in 0x11",
            "mmio write 0x20000 0x99",
            "mmio read 0x20010",
            "out 0x12 0x77"
        ]
    );
}

#[test]
fn mmio_notifiers_signal_their_eventfd_instead_of_the_handler() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let Some(kvm) = kvm() else { return };
    if !kvm.capabilities().ioeventfd {
        eprintln!("\n*** SKIPPED: this KVM has no ioeventfd ***\n");
        return;
    }
    let code = [
        0xb8, 0x00, 0x20, // mov ax, 0x2000
        0x8e, 0xd8, // mov ds, ax
        0xc6, 0x06, 0x00, 0x00, 0x11, // mov byte [0x0], 0x11          (any: notified)
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x01, 0x00, 0x00,
        0x00, // mov dword [0x50], 1  (matches)
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x07, 0x00, 0x00,
        0x00, // mov dword [0x50], 7  (no match)
        0x66, 0xc7, 0x06, 0x60, 0x00, 0x02, 0x00, 0x00,
        0x00, // mov dword [0x60], 2  (no notifier)
        0xf4, // hlt
    ];
    let (vm, _mem) = real_mode_vm(&kvm, &[(0, 0x10000)], &code);
    let any = EventFd::new(EFD_NONBLOCK).unwrap();
    let queue1 = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.register_mmio_notifier(0x20000, None, &any).unwrap();
    vm.register_mmio_notifier(0x20050, Some(1), &queue1)
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(&vcpu, 0x1000);
    let mut io = Recorder::default();
    assert_eq!(vcpu.run(&mut io).unwrap(), VcpuExit::Halt);
    assert_eq!(
        io.log,
        ["mmio write 0x20050 0x7", "mmio write 0x20060 0x2"],
        "notified writes never reach the handler"
    );
    assert_eq!(any.read().unwrap(), 1);
    assert_eq!(queue1.read().unwrap(), 1);
}

#[test]
fn several_memory_slots_are_guest_memory() {
    let Some(kvm) = kvm() else { return };
    let code = [
        0xb8, 0x00, 0x10, // mov ax, 0x1000
        0x8e, 0xd8, // mov ds, ax
        0xa0, 0x00, 0x80, // mov al, [0x8000]   (0x18000, second slot)
        0xe6, 0x10, // out 0x10, al
        0xc6, 0x06, 0x01, 0x80, 0xa5, // mov byte [0x8001], 0xa5
        0xf4, // hlt
    ];
    let (vm, mem) = real_mode_vm(&kvm, &[(0, 0x10000), (0x10000, 0x10000)], &code);
    mem.write_obj(0x5au8, GuestAddress(0x18000)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(&vcpu, 0x1000);
    let mut io = Recorder::default();
    assert_eq!(vcpu.run(&mut io).unwrap(), VcpuExit::Halt);
    assert_eq!(io.log, ["out 0x10 0x5a"]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x18001)).unwrap(), 0xa5);
}

#[test]
fn two_vcpus_run_on_two_threads() {
    let Some(kvm) = kvm() else { return };
    let mut code = vec![0u8; 0x200];
    // vCPU 0 at 0x1000, vCPU 1 at 0x1100: each writes its number to 0x20.
    code[..5].copy_from_slice(&[0xb0, 0x00, 0xe6, 0x20, 0xf4]);
    code[0x100..0x105].copy_from_slice(&[0xb0, 0x01, 0xe6, 0x20, 0xf4]);
    let (vm, _mem) = real_mode_vm(&kvm, &[(0, 0x10000)], &code);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..2u8)
        .map(|id| {
            let mut vcpu = vm.create_vcpu(id).unwrap();
            start_real_mode(&vcpu, 0x1000 + 0x100 * id as u64);
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut io = Recorder::default();
                let exit = vcpu.run(&mut io).unwrap();
                seen.lock().unwrap().push((id, io.log, exit));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|s| s.0);
    assert_eq!(
        seen,
        vec![
            (0, vec!["out 0x20 0x0".to_string()], VcpuExit::Halt),
            (1, vec!["out 0x20 0x1".to_string()], VcpuExit::Halt)
        ]
    );
}

#[test]
fn a_spinning_vcpu_is_kicked_out_from_another_thread() {
    let Some(kvm) = kvm() else { return };
    let code = [0xe6, 0x10, 0xeb, 0xfe]; // out 0x10, al; jmp $
    let (vm, _mem) = real_mode_vm(&kvm, &[(0, 0x10000)], &code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(&vcpu, 0x1000);
    let kicker = vcpu.kicker();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut io = Recorder::default();
        let exit = vcpu.run(&mut io).unwrap();
        tx.send(exit).unwrap();
        // A kick that lands between runs makes the next run return at once.
        let k = vcpu.kicker();
        k.kick();
        vcpu.run(&mut io).unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "the guest spins until kicked");
    kicker.kick();
    let exit = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("kick interrupts KVM_RUN");
    assert_eq!(exit, VcpuExit::Interrupted);
    assert_eq!(t.join().unwrap(), VcpuExit::Interrupted);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn vms_and_vcpus_tear_down_cleanly() {
    let Some(kvm) = kvm() else { return };
    let code = [0xf4];
    // Warm up lazily created process state before counting.
    drop(real_mode_vm(&kvm, &[(0, 0x10000)], &code));
    let before = open_fds();
    for _ in 0..20 {
        let (vm, mem) = real_mode_vm(&kvm, &[(0, 0x10000)], &code);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        start_real_mode(&vcpu, 0x1000);
        assert_eq!(vcpu.run(&mut Recorder::default()).unwrap(), VcpuExit::Halt);
        drop(vcpu);
        drop(vm);
        assert_eq!(Arc::strong_count(&mem), 1, "the VM released its memory");
    }
    assert_eq!(open_fds(), before, "no file descriptor leaked");
}

#[test]
fn capabilities_and_probe() {
    let Some(kvm) = kvm() else { return };
    let caps = kvm.capabilities();
    assert_eq!(caps.backend, "kvm");
    assert!(
        caps.max_vcpus >= 1 && caps.max_memory_slots >= 2,
        "{caps:?}"
    );
    eprintln!("capabilities: {caps:?}");
    let probe = kvm.probe();
    eprintln!("probe: {probe:?}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(!probe.can_run_linux);
        assert!(probe.reason.contains("kvm_pvm"), "{}", probe.reason);
    }
    assert!(!kvm.supported_cpuid().unwrap().is_empty());
}

#[test]
fn probe_reads_cpu_flags() {
    use berth_hypervisor::kvm::probe_host;
    assert!(probe_host("flags\t: fpu vme vmx sse", false).can_run_linux);
    assert!(probe_host("flags\t: fpu svm", false).can_run_linux);
    let p = probe_host("flags\t: fpu hypervisor", true);
    assert!(!p.can_run_linux && p.reason.contains("kvm_pvm"));
    assert!(!probe_host("flags\t: fpu", false).can_run_linux);
}

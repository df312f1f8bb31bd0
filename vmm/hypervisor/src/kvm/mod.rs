//! The KVM backend. No type from here is visible above the crate boundary.

mod convert;
mod kick;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{
    Cap, IoEventAddress, Kvm as KvmSys, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd,
};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::{
    Capabilities, CpuidEntry, HypervisorError, IoHandler, Kicker, Probe, Regs, Result, SpecialRegs,
    VcpuExit,
};

fn op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Op {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// KVM, through `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    kvm: KvmSys,
}

impl Kvm {
    pub fn new() -> Result<Kvm> {
        let kvm = KvmSys::new().map_err(|e| HypervisorError::Open {
            path: "/dev/kvm".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(HypervisorError::ApiVersion(v));
        }
        Ok(Kvm { kvm })
    }
}

/// What the host's CPU and kernel say about running Linux under KVM.
pub fn probe_host(cpuinfo: &str, kvm_pvm_loaded: bool) -> Probe {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    if hw {
        return Probe {
            can_run_linux: true,
            reason: "hardware virtualization (VMX/SVM) is available".into(),
        };
    }
    let reason = if kvm_pvm_loaded {
        "/dev/kvm is kvm_pvm, a software virtualization without VMX/SVM: it runs small guest programs, \
         but a stock Linux kernel fails in early boot (its instruction emulator cannot handle int3, clac, \
         popcnt, cmpxchg16b or xrstor, and user space never gets a syscall)"
    } else {
        "the CPU offers no hardware virtualization (no vmx or svm flag)"
    };
    Probe {
        can_run_linux: false,
        reason: reason.into(),
    }
}

impl crate::Hypervisor for Kvm {
    type Vm = KvmVm;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: "kvm",
            irqchip: self.kvm.check_extension(Cap::Irqchip),
            pit: self.kvm.check_extension(Cap::Pit2),
            irqfd: self.kvm.check_extension(Cap::Irqfd),
            // Notifiers without datamatch match writes of any width.
            ioeventfd: self.kvm.check_extension(Cap::Ioeventfd)
                && self.kvm.check_extension(Cap::IoeventfdNoLength),
            max_vcpus: self.kvm.get_nr_vcpus(),
            max_memory_slots: self.kvm.get_nr_memslots(),
        }
    }

    fn probe(&self) -> Probe {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        probe_host(
            &cpuinfo,
            std::path::Path::new("/sys/module/kvm_pvm").exists(),
        )
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(convert::cpuid_from_kvm)
            .collect())
    }

    fn create_vm(&self) -> Result<KvmVm> {
        let fd = self.kvm.create_vm().map_err(op("KVM_CREATE_VM"))?;
        Ok(KvmVm {
            fd,
            max_slots: self.kvm.get_nr_memslots(),
            next_slot: AtomicU32::new(0),
            memory: Mutex::new(Vec::new()),
        })
    }
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    max_slots: usize,
    next_slot: AtomicU32,
    /// Keeps mapped guest memory alive as long as the VM.
    memory: Mutex<Vec<Arc<GuestMemoryMmap>>>,
}

/// Guest-physical addresses KVM needs for its own structures on Intel
/// (TSS and identity-map page), just below the 4 GiB MMIO hole's top.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

impl crate::Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn map_memory(&self, mem: Arc<GuestMemoryMmap>) -> Result<()> {
        for region in mem.iter() {
            let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
            if slot as usize >= self.max_slots {
                return Err(HypervisorError::TooManySlots(self.max_slots));
            }
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: `region` is a live mapping of `memory_size` bytes at
            // `userspace_addr`, owned by `mem`, which this VM keeps (below)
            // until it is dropped, so KVM never sees a dangling mapping.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(op("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mem);
        Ok(())
    }

    fn create_irqchip(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(op("KVM_SET_TSS_ADDR"))?;
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(op("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd.create_irq_chip().map_err(op("KVM_CREATE_IRQCHIP"))
    }

    fn create_pit(&self) -> Result<()> {
        // Speaker port dummy: the guest's beeps are no one's business.
        let cfg = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(cfg).map_err(op("KVM_CREATE_PIT2"))
    }

    fn create_vcpu(&self, id: u8) -> Result<KvmVcpu> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(op("KVM_CREATE_VCPU"))?;
        Ok(KvmVcpu {
            fd,
            kick: kick::KickState::new(),
        })
    }

    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, active)
            .map_err(op("KVM_IRQ_LINE"))
    }

    fn register_irqfd(&self, event: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(event, gsi).map_err(op("KVM_IRQFD"))
    }

    fn register_mmio_notifier(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        event: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<()> {
        let addr = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(v) => self.fd.register_ioevent(event, &addr, v),
            None => self.fd.register_ioevent(event, &addr, NoDatamatch),
        }
        .map_err(op("KVM_IOEVENTFD"))
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    kick: Arc<kick::KickState>,
}

/// LAPIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl crate::Vcpu for KvmVcpu {
    fn regs(&self) -> Result<Regs> {
        Ok(convert::regs_from_kvm(
            &self.fd.get_regs().map_err(op("KVM_GET_REGS"))?,
        ))
    }

    fn set_regs(&self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(op("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        Ok(convert::sregs_from_kvm(
            &self.fd.get_sregs().map_err(op("KVM_GET_SREGS"))?,
        ))
    }

    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()> {
        // Start from the current state so fields we don't model (the
        // pending interrupt bitmap) keep their values.
        let mut k = self.fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
        convert::sregs_into_kvm(sregs, &mut k);
        self.fd.set_sregs(&k).map_err(op("KVM_SET_SREGS"))
    }

    fn set_fpu_default(&self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(op("KVM_SET_FPU"))
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> = msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let k = Msrs::from_entries(&entries)
            .map_err(|_| HypervisorError::Unsupported("that many MSRs"))?;
        let n = self.fd.set_msrs(&k).map_err(op("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(HypervisorError::Op {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!("MSR {:#x} was refused", entries[n].index)),
            });
        }
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut k = Msrs::from_entries(&entries)
            .map_err(|_| HypervisorError::Unsupported("that many MSRs"))?;
        let n = self.fd.get_msrs(&mut k).map_err(op("KVM_GET_MSRS"))?;
        Ok(k.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect())
    }

    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let k: Vec<_> = entries.iter().map(convert::cpuid_to_kvm).collect();
        let cpuid = CpuId::from_entries(&k)
            .map_err(|_| HypervisorError::Unsupported("that many CPUID leaves"))?;
        self.fd.set_cpuid2(&cpuid).map_err(op("KVM_SET_CPUID2"))
    }

    fn setup_lapic(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(op("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let reg = &mut lapic.regs[offset..offset + 4];
            let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
            let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (dst, b) in reg.iter_mut().zip(v.to_le_bytes()) {
                *dst = b as std::os::raw::c_char;
            }
        }
        self.fd.set_lapic(&lapic).map_err(op("KVM_SET_LAPIC"))
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        let t = self.fd.translate_gva(gva).map_err(op("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VcpuExit> {
        let _running = match self.kick.enter(&mut self.fd) {
            Some(guard) => guard,
            None => return Ok(VcpuExit::Interrupted),
        };
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.kick.clear();
                    return Ok(VcpuExit::Interrupted);
                }
                Err(e) => return Err(op("KVM_RUN")(e)),
            };
            match exit {
                KvmExit::IoIn(port, data) => io.pio_read(port, data),
                KvmExit::IoOut(port, data) => io.pio_write(port, data),
                KvmExit::MmioRead(addr, data) => io.mmio_read(addr, data),
                KvmExit::MmioWrite(addr, data) => io.mmio_write(addr, data),
                KvmExit::Hlt => return Ok(VcpuExit::Halt),
                KvmExit::Shutdown => return Ok(VcpuExit::Shutdown),
                KvmExit::Intr => {
                    self.kick.clear();
                    return Ok(VcpuExit::Interrupted);
                }
                KvmExit::SystemEvent(kind, _) => return Ok(VcpuExit::SystemEvent(kind)),
                KvmExit::FailEntry(reason, _) => return Ok(VcpuExit::FailEntry(reason)),
                KvmExit::InternalError => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Ok(VcpuExit::InternalError(format!(
                        "KVM internal error (emulation failure) at rip {rip:#x}"
                    )));
                }
                other => {
                    return Ok(VcpuExit::InternalError(format!(
                        "unhandled KVM exit {other:?}"
                    )))
                }
            }
        }
    }

    fn kicker(&self) -> Kicker {
        let k = self.kick.clone();
        Kicker::new(move || k.kick())
    }
}

//! The hypervisor boundary of berth-vmm.
//!
//! `Hypervisor` → `Vm` (map memory, create vCPUs, interrupt lines, MMIO
//! notifiers) → `Vcpu`
//! (set boot state, `run` with an [`IoHandler`] that serves port and MMIO
//! accesses, returning only control exits). The types here are the VMM's
//! own: no backend type crosses this boundary. One backend is chosen per OS
//! at compile time ([`Platform`]): KVM on Linux (built and tested here);
//! Hypervisor.framework and WHP backends implement the same traits on macOS
//! and Windows. [`mock`] is a backend for tests of code above this line.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

#[cfg(target_os = "linux")]
pub mod kvm;
pub mod mock;
pub mod tsc;
mod x86;

pub use x86::{CpuidEntry, DescriptorTable, Regs, Segment, SpecialRegs};

/// The backend for this OS.
#[cfg(target_os = "linux")]
pub type Platform = kvm::Kvm;

/// What went wrong at the boundary. Messages say what failed; the source
/// says why.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open the hypervisor ({path}): {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("the hypervisor API version is {0}, 12 is required")]
    ApiVersion(i32),
    #[error("{op} failed: {source}")]
    Op {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("too many memory regions for the hypervisor ({0})")]
    TooManySlots(usize),
    #[error("{0} is not supported by this hypervisor")]
    Unsupported(&'static str),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// What a backend can do, instead of methods that fail at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub backend: &'static str,
    /// In-kernel interrupt controllers (PIC, IOAPIC, LAPIC).
    pub irqchip: bool,
    /// In-kernel 8254 timer.
    pub pit: bool,
    /// Interrupts raised by writing an eventfd.
    pub irqfd: bool,
    /// Guest MMIO writes that signal an eventfd without leaving the
    /// hypervisor ([`Vm::register_mmio_notifier`]).
    pub ioeventfd: bool,
    pub max_vcpus: usize,
    pub max_memory_slots: usize,
}

/// Whether this host can run a stock Linux guest, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub can_run_linux: bool,
    pub reason: String,
}

/// Serves the guest's device accesses while a vCPU runs.
pub trait IoHandler {
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    fn pio_write(&mut self, port: u16, data: &[u8]);
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned. Port and MMIO accesses never surface here:
/// the handler serves them and the vCPU continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The vCPU executed HLT with interrupts off, or HLT without an
    /// in-kernel LAPIC to wait in.
    Halt,
    /// Triple fault or an equivalent: the guest reset itself.
    Shutdown,
    /// [`Kicker::kick`] was called.
    Interrupted,
    /// The guest asked for a system reset or power-off through the
    /// hypervisor (e.g. PSCI or a paravirtual event).
    SystemEvent(u32),
    /// The hypervisor could not run the guest any further.
    InternalError(String),
    /// The vCPU could not enter the guest.
    FailEntry(u64),
}

/// A hypervisor backend.
pub trait Hypervisor: Send + Sync {
    type Vm: Vm;
    fn capabilities(&self) -> Capabilities;
    /// Can this host run a stock Linux kernel? (Small guest programs may
    /// still run where it says no.)
    fn probe(&self) -> Probe;
    /// CPUID leaves the hypervisor can expose to guests.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    fn create_vm(&self) -> Result<Self::Vm>;
}

/// One virtual machine.
pub trait Vm: Send + Sync {
    type Vcpu: Vcpu;
    /// Maps every region of `mem` into the guest. The VM keeps `mem`
    /// alive as long as it exists, so the mappings stay valid.
    fn map_memory(&self, mem: Arc<GuestMemoryMmap>) -> Result<()>;
    /// Creates the in-kernel interrupt controllers; before any vCPU.
    fn create_irqchip(&self) -> Result<()>;
    /// Creates the in-kernel 8254 timer; after the irqchip.
    fn create_pit(&self) -> Result<()>;
    fn create_vcpu(&self, id: u8) -> Result<Self::Vcpu>;
    /// Drives interrupt line `irq` of the in-kernel irqchip.
    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()>;
    /// Raises `gsi` whenever `event` is written.
    fn register_irqfd(&self, event: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    /// Makes a guest write at `addr` signal `event` instead of reaching
    /// the vCPU's [`IoHandler`]: any write there, or with `datamatch` only
    /// a 4-byte write of that value (others still reach the handler).
    /// Only where [`Capabilities::ioeventfd`] says so; the notifier lives
    /// as long as the VM.
    fn register_mmio_notifier(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        event: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<()>;
}

/// One virtual CPU. Runs on its own thread.
pub trait Vcpu: Send {
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<SpecialRegs>;
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()>;
    /// x87/SSE state as after FNINIT with MXCSR at its reset value.
    fn set_fpu_default(&self) -> Result<()>;
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()>;
    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>>;
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// LAPIC LINT0 as ExtINT and LINT1 as NMI, as firmware leaves them.
    fn setup_lapic(&self) -> Result<()>;
    /// Guest-physical address of guest-virtual `gva` in the vCPU's current
    /// address space, if mapped.
    fn translate(&self, gva: u64) -> Result<Option<u64>>;
    /// Runs until a control exit, serving device accesses with `io`.
    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VcpuExit>;
    /// A handle that makes a running (or the next) `run` return
    /// [`VcpuExit::Interrupted`], from any thread.
    fn kicker(&self) -> Kicker;
}

/// Interrupts a vCPU's `run` from another thread.
#[derive(Clone)]
pub struct Kicker(Arc<dyn Fn() + Send + Sync>);

impl Kicker {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Kicker {
        Kicker(Arc::new(f))
    }

    pub fn kick(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Kicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kicker")
    }
}

/// Total memory of this host in MiB, from /proc/meminfo; `None` where it
/// can't be read. What a VM may be given is bounded by it.
pub fn host_memory_mib() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
}

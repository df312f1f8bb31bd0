//! A backend that runs nothing: each vCPU replays a scripted list of
//! accesses against the `IoHandler` and then exits as scripted. For testing
//! the code above the hypervisor boundary without a hypervisor.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{
    Capabilities, CpuidEntry, IoHandler, Kicker, Probe, Regs, Result, SpecialRegs, VcpuExit,
};

/// One scripted step of a mock vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    PioWrite(u16, Vec<u8>),
    PioRead(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    Exit(VcpuExit),
}

/// The mock hypervisor; `script` is what every vCPU it creates will do.
#[derive(Debug, Default)]
pub struct MockHypervisor {
    pub script: Vec<Step>,
    pub can_run_linux: bool,
}

impl crate::Hypervisor for MockHypervisor {
    type Vm = MockVm;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: "mock",
            irqchip: false,
            pit: false,
            irqfd: false,
            ioeventfd: true,
            max_vcpus: 8,
            max_memory_slots: 32,
        }
    }

    fn probe(&self) -> Probe {
        Probe {
            can_run_linux: self.can_run_linux,
            reason: "mock hypervisor".into(),
        }
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(Vec::new())
    }

    fn create_vm(&self) -> Result<MockVm> {
        Ok(MockVm {
            script: self.script.clone(),
            memory: Mutex::new(Vec::new()),
            irq_lines: Mutex::new(Vec::new()),
            notifiers: Arc::default(),
        })
    }
}

/// A registered MMIO notifier: what a write must look like to signal it.
#[derive(Debug)]
struct Notifier {
    addr: u64,
    datamatch: Option<u32>,
    event: EventFd,
}

impl Notifier {
    /// The same rule as KVM's ioeventfd: the address, and with a datamatch
    /// a 4-byte write of that value.
    fn matches(&self, addr: u64, data: &[u8]) -> bool {
        addr == self.addr
            && match self.datamatch {
                None => true,
                Some(v) => data == v.to_le_bytes(),
            }
    }
}

type Notifiers = Arc<Mutex<Vec<Notifier>>>;

#[derive(Debug)]
pub struct MockVm {
    script: Vec<Step>,
    memory: Mutex<Vec<Arc<GuestMemoryMmap>>>,
    /// Every `set_irq_line` call, in order.
    pub irq_lines: Mutex<Vec<(u32, bool)>>,
    notifiers: Notifiers,
}

impl crate::Vm for MockVm {
    type Vcpu = MockVcpu;

    fn map_memory(&self, mem: Arc<GuestMemoryMmap>) -> Result<()> {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mem);
        Ok(())
    }

    fn create_irqchip(&self) -> Result<()> {
        Ok(())
    }

    fn create_pit(&self) -> Result<()> {
        Ok(())
    }

    fn create_vcpu(&self, _id: u8) -> Result<MockVcpu> {
        Ok(MockVcpu {
            script: self.script.iter().cloned().collect(),
            regs: Mutex::new(Regs::default()),
            sregs: Mutex::new(SpecialRegs::default()),
            kicked: Arc::new(AtomicBool::new(false)),
            notifiers: self.notifiers.clone(),
            reads: Vec::new(),
        })
    }

    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.irq_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((irq, active));
        Ok(())
    }

    fn register_irqfd(&self, _event: &vmm_sys_util::eventfd::EventFd, _gsi: u32) -> Result<()> {
        Err(crate::HypervisorError::Unsupported("irqfd"))
    }

    fn register_mmio_notifier(
        &self,
        addr: u64,
        datamatch: Option<u32>,
        event: &EventFd,
    ) -> Result<()> {
        let event = event
            .try_clone()
            .map_err(|source| crate::HypervisorError::Op {
                op: "cloning a notifier eventfd",
                source,
            })?;
        self.notifiers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Notifier {
                addr,
                datamatch,
                event,
            });
        Ok(())
    }
}

#[derive(Debug)]
pub struct MockVcpu {
    script: VecDeque<Step>,
    regs: Mutex<Regs>,
    sregs: Mutex<SpecialRegs>,
    kicked: Arc<AtomicBool>,
    notifiers: Notifiers,
    /// Data returned by the handler for each scripted read, in order.
    pub reads: Vec<Vec<u8>>,
}

impl crate::Vcpu for MockVcpu {
    fn regs(&self) -> Result<Regs> {
        Ok(*self.regs.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn set_regs(&self, regs: &Regs) -> Result<()> {
        *self.regs.lock().unwrap_or_else(|e| e.into_inner()) = *regs;
        Ok(())
    }
    fn sregs(&self) -> Result<SpecialRegs> {
        Ok(*self.sregs.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()> {
        *self.sregs.lock().unwrap_or_else(|e| e.into_inner()) = *sregs;
        Ok(())
    }
    fn set_fpu_default(&self) -> Result<()> {
        Ok(())
    }
    fn set_msrs(&self, _msrs: &[(u32, u64)]) -> Result<()> {
        Ok(())
    }
    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        Ok(indices.iter().map(|&i| (i, 0)).collect())
    }
    fn set_cpuid(&self, _entries: &[CpuidEntry]) -> Result<()> {
        Ok(())
    }
    fn setup_lapic(&self) -> Result<()> {
        Ok(())
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        Ok(Some(gva))
    }

    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VcpuExit> {
        loop {
            if self.kicked.swap(false, Ordering::SeqCst) {
                return Ok(VcpuExit::Interrupted);
            }
            match self.script.pop_front() {
                Some(Step::PioWrite(port, data)) => io.pio_write(port, &data),
                Some(Step::MmioWrite(addr, data)) => {
                    let notifiers = self.notifiers.lock().unwrap_or_else(|e| e.into_inner());
                    match notifiers.iter().find(|n| n.matches(addr, &data)) {
                        Some(n) => {
                            let _ = n.event.write(1);
                        }
                        None => {
                            drop(notifiers);
                            io.mmio_write(addr, &data)
                        }
                    }
                }
                Some(Step::PioRead(port, len)) => {
                    let mut data = vec![0u8; len];
                    io.pio_read(port, &mut data);
                    self.reads.push(data);
                }
                Some(Step::MmioRead(addr, len)) => {
                    let mut data = vec![0u8; len];
                    io.mmio_read(addr, &mut data);
                    self.reads.push(data);
                }
                Some(Step::Exit(exit)) => return Ok(exit),
                None => return Ok(VcpuExit::Halt),
            }
        }
    }

    fn kicker(&self) -> Kicker {
        let k = self.kicked.clone();
        Kicker::new(move || k.store(true, Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hypervisor, Vcpu, Vm};

    #[derive(Default)]
    struct Writes(Vec<(u64, Vec<u8>)>);
    impl IoHandler for Writes {
        fn pio_read(&mut self, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, _: u16, _: &[u8]) {}
        fn mmio_read(&mut self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&mut self, addr: u64, data: &[u8]) {
            self.0.push((addr, data.to_vec()));
        }
    }

    #[test]
    fn mmio_notifiers_take_matching_writes() {
        let h = MockHypervisor {
            script: vec![
                Step::MmioWrite(0x1000, vec![9]),
                Step::MmioWrite(0x1050, 1u32.to_le_bytes().to_vec()),
                Step::MmioWrite(0x1050, 7u32.to_le_bytes().to_vec()),
                Step::MmioWrite(0x1050, vec![1]),
            ],
            can_run_linux: true,
        };
        let vm = h.create_vm().unwrap();
        let any = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let q1 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_mmio_notifier(0x1000, None, &any).unwrap();
        vm.register_mmio_notifier(0x1050, Some(1), &q1).unwrap();
        let mut io = Writes::default();
        vm.create_vcpu(0).unwrap().run(&mut io).unwrap();
        assert_eq!(any.read().unwrap(), 1);
        assert_eq!(q1.read().unwrap(), 1);
        assert_eq!(
            io.0,
            [(0x1050, 7u32.to_le_bytes().to_vec()), (0x1050, vec![1])],
            "a different value or width still reaches the handler"
        );
    }
}

//! One thread per vCPU, as an explicit state machine: commands arrive on a
//! channel (each followed by a kick, so a vCPU inside `run` notices at
//! once), exits leave on another.
//!
//! ```text
//!            Pause              Stop / channel closed
//! Running ─────────▶ Paused ──────────────────────────▶ (thread ends)
//!    ▲  ◀───────────   │
//!    │     Resume      │ Stop
//!    │ guest exit      ▼
//!    └──────────▶ Exited ── Stop ──▶ (thread ends)
//! ```

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use berth_hypervisor::{IoHandler, Kicker, Vcpu, VcpuExit};
use vm_memory::GuestMemoryMmap;

use crate::exit::ExitReason;

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    /// The guest ended this vCPU's run (the reason went to the exit channel).
    Exited,
}

/// The VMM's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    commands: mpsc::Sender<Command>,
    kicker: Kicker,
    state: Arc<Mutex<State>>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn send(&self, c: Command) {
        let _ = self.commands.send(c);
        self.kicker.kick();
    }

    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts vCPU `id` on a thread named `vcpu<id>`. `emulator_quirks` (guest
/// memory) turns on the instruction-emulator workarounds for hosts like
/// kvm_pvm.
pub fn spawn<V, I>(
    vcpu: V,
    id: u8,
    io: I,
    exits: mpsc::Sender<ExitReason>,
    emulator_quirks: Option<Arc<GuestMemoryMmap>>,
) -> std::io::Result<VcpuHandle>
where
    V: Vcpu + 'static,
    I: IoHandler + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let kicker = vcpu.kicker();
    let state = Arc::new(Mutex::new(State::Running));
    let st = state.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run(vcpu, id, io, rx, exits, st, emulator_quirks))?;
    Ok(VcpuHandle {
        commands: tx,
        kicker,
        state,
        thread: Some(thread),
    })
}

fn run<V: Vcpu, I: IoHandler>(
    mut vcpu: V,
    id: u8,
    mut io: I,
    commands: mpsc::Receiver<Command>,
    exits: mpsc::Sender<ExitReason>,
    shared: Arc<Mutex<State>>,
    quirks: Option<Arc<GuestMemoryMmap>>,
) {
    let mut state = State::Running;
    loop {
        *shared.lock().unwrap_or_else(|e| e.into_inner()) = state;
        let command = match state {
            State::Running => match commands.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => Some(Command::Stop),
            },
            State::Paused | State::Exited => Some(commands.recv().unwrap_or(Command::Stop)),
        };
        match (state, command) {
            (_, Some(Command::Stop)) => return,
            (State::Running, Some(Command::Pause)) => state = State::Paused,
            (State::Paused, Some(Command::Resume)) => state = State::Running,
            (_, Some(_)) => {}
            (State::Running, None) => {
                if let Some(reason) = run_once(&mut vcpu, id, &mut io, quirks.as_deref()) {
                    let _ = exits.send(reason);
                    state = State::Exited;
                }
            }
            (_, None) => {}
        }
    }
}

/// Runs until a control exit; returns the reason the VM must end, if any.
fn run_once<V: Vcpu, I: IoHandler>(
    vcpu: &mut V,
    id: u8,
    io: &mut I,
    quirks: Option<&GuestMemoryMmap>,
) -> Option<ExitReason> {
    Some(match vcpu.run(io) {
        Ok(VcpuExit::Interrupted) => return None,
        // With the in-kernel LAPIC a HLT only reaches us when the vCPU can
        // never wake again (interrupts off).
        Ok(VcpuExit::Halt) => ExitReason::Error(format!("vCPU {id} halted with interrupts off")),
        Ok(VcpuExit::Shutdown) => ExitReason::TripleFault,
        Ok(VcpuExit::SystemEvent(kind)) => {
            tracing::info!("vCPU {id}: system event {kind}");
            ExitReason::PowerOff
        }
        Ok(VcpuExit::InternalError(_))
            if quirks.is_some_and(|m| step_over_emulator_gap(vcpu, m)) =>
        {
            return None
        }
        Ok(VcpuExit::InternalError(e)) => ExitReason::Error(format!("vCPU {id}: {e}")),
        Ok(VcpuExit::FailEntry(r)) => ExitReason::Error(format!(
            "vCPU {id} could not enter the guest (reason {r:#x})"
        )),
        Err(e) => ExitReason::Error(format!("vCPU {id}: {e}")),
    })
}

/// On a host whose hypervisor emulates every instruction (kvm_pvm), steps
/// over an instruction its emulator rejects but that is a no-op for the
/// kernel: FWAIT (the kernel runs with x87 exceptions masked). Returns
/// whether it did.
fn step_over_emulator_gap<V: Vcpu>(vcpu: &V, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    const FWAIT: u8 = 0x9b;
    let Ok(mut regs) = vcpu.regs() else {
        return false;
    };
    let Ok(Some(pa)) = vcpu.translate(regs.rip) else {
        return false;
    };
    if mem.read_obj::<u8>(GuestAddress(pa)).ok() != Some(FWAIT) {
        return false;
    }
    tracing::debug!("stepping over FWAIT at {:#x}", regs.rip);
    regs.rip += 1;
    vcpu.set_regs(&regs).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_hypervisor::mock::{MockHypervisor, Step};
    use berth_hypervisor::{Hypervisor, Vm};
    use std::time::Duration;

    #[derive(Default, Clone)]
    struct Log(Arc<Mutex<Vec<u16>>>);
    impl IoHandler for Log {
        fn pio_read(&mut self, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, port: u16, _: &[u8]) {
            self.0.lock().unwrap().push(port);
        }
        fn mmio_read(&mut self, _: u64, _: &mut [u8]) {}
        fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    }

    fn vcpu(script: Vec<Step>) -> berth_hypervisor::mock::MockVcpu {
        let h = MockHypervisor {
            script,
            can_run_linux: true,
        };
        h.create_vm().unwrap().create_vcpu(0).unwrap()
    }

    fn wait_state(h: &VcpuHandle, want: State) {
        for _ in 0..500 {
            if h.state() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("vCPU never reached {want:?}, is {:?}", h.state());
    }

    #[test]
    fn runs_serves_io_and_reports_the_exit() {
        let log = Log::default();
        let (tx, rx) = mpsc::channel();
        let h = spawn(
            vcpu(vec![
                Step::PioWrite(0x3f8, vec![b'x']),
                Step::Exit(VcpuExit::Shutdown),
            ]),
            0,
            log.clone(),
            tx,
            None,
        )
        .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            ExitReason::TripleFault
        );
        wait_state(&h, State::Exited);
        assert_eq!(*log.0.lock().unwrap(), vec![0x3f8]);
        h.stop();
    }

    #[test]
    fn pause_resume_stop() {
        let log = Log::default();
        let (tx, rx) = mpsc::channel();
        // Every step writes a port, so a running vCPU visibly makes
        // progress; the script is long enough that a loaded machine cannot
        // finish it before the pause arrives.
        const STEPS: usize = 200_000;
        let script = std::iter::repeat_n(
            [
                Step::PioWrite(0x10, vec![1]),
                Step::Exit(VcpuExit::Interrupted),
            ],
            STEPS,
        )
        .flatten()
        .chain([Step::Exit(VcpuExit::Shutdown)])
        .collect();
        let h = spawn(vcpu(script), 0, log.clone(), tx, None).unwrap();
        let running = || log.0.lock().unwrap().len();
        for _ in 0..5000 {
            if running() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(running() > 0, "the vCPU runs its script");
        h.send(Command::Pause);
        wait_state(&h, State::Paused);
        let seen = running();
        assert!(seen < STEPS, "paused before the script ended");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(running(), seen, "a paused vCPU does not run");
        h.send(Command::Resume);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)).unwrap(),
            ExitReason::TripleFault
        );
        assert_eq!(running(), STEPS, "resumed where it stopped");
        h.stop();
    }
}

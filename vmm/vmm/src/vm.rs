//! Building a VM from a validated [`VmConfig`] (config → resources →
//! builder) and running it: one named thread per vCPU, exits reported to
//! the caller's loop, and one event loop for device queues, the vsock host
//! sockets and the control API.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use berth_devices::legacy::i8042::{I8042Host, I8042};
use berth_devices::legacy::serial::{ConsoleOut, IrqTrigger, SerialConsole};
use berth_devices::virtio::balloon::{release::HostRelease, Balloon};
use berth_devices::virtio::blk::Block;
use berth_devices::virtio::device::{InterruptLine, VirtioDevice};
use berth_devices::virtio::fs::watch::HostWatcher;
use berth_devices::virtio::fs::{Fs, ShareFs};
use berth_devices::virtio::mmio::{MmioTransport, INTERRUPT_STATUS};
use berth_devices::virtio::net::{NetDevice, StreamBackend};
use berth_devices::virtio::rng::Rng;
use berth_devices::virtio::vsock::VsockDevice;
use berth_hypervisor::{Hypervisor, IoHandler, Vcpu, Vm};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::event_loop::EventLoop;
use crate::vcpu::{self, Command, VcpuHandle};
use crate::x86_64::{boot, cpuid, layout, mptable, regs};

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    #[error(transparent)]
    Hypervisor(#[from] berth_hypervisor::HypervisorError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::WriteError),
    #[error(transparent)]
    Disk(#[from] berth_devices::virtio::blk::BlockError),
    #[error("cannot open the console log {0}: {1}")]
    Console(String, std::io::Error),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot set up the event loop: {0}")]
    EventLoop(std::io::Error),
    #[error(transparent)]
    Vsock(#[from] berth_devices::virtio::vsock::VsockError),
    #[error("cannot listen for the network peer on {0}: {1}")]
    Net(String, std::io::Error),
    #[error("cannot share {0}: {1}")]
    Share(String, std::io::Error),
    #[error("this host can't run a stock Linux guest: {0}")]
    Probe(String),
}

pub use crate::exit::ExitReason;

/// Raises one GSI through an irqfd.
struct IrqLine(EventFd);

impl InterruptLine for IrqLine {
    fn trigger(&self) {
        let _ = self.0.write(1);
    }
}

struct KbdHost {
    reset: mpsc::Sender<ExitReason>,
    irq: Arc<IrqLine>,
}

impl I8042Host for KbdHost {
    fn reset(&mut self) {
        let _ = self.reset.send(ExitReason::PowerOff);
    }
    fn keyboard_interrupt(&mut self) {
        self.irq.trigger();
    }
}

/// The devices every vCPU dispatches to.
pub struct Devices {
    serial: Mutex<SerialConsole>,
    i8042: Mutex<I8042<KbdHost>>,
    mmio: Vec<Mutex<MmioTransport>>,
    /// Each transport's InterruptStatus, read without its lock.
    irq_status: Vec<Arc<AtomicU32>>,
}

/// The guest's MAC address (locally administered).
const NET_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xb5, 0x12, 0x70];
const SERIAL_PORT: u16 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;
const KEYBOARD_IRQ: u32 = 1;

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("virtio", &self.mmio.len())
            .finish()
    }
}

impl Devices {
    fn mmio_slot(&self, addr: u64) -> Option<(usize, u64)> {
        let off = addr.checked_sub(layout::VIRTIO_MMIO_START)?;
        let slot = (off / layout::VIRTIO_MMIO_SIZE) as usize;
        (slot < self.mmio.len()).then_some((slot, off % layout::VIRTIO_MMIO_SIZE))
    }

    /// The driver notified queue `queue` of virtio device `slot`.
    fn notify_queue(&self, slot: usize, queue: u16) {
        if let Some(t) = self.mmio.get(slot) {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify_queue(queue);
        }
    }

    /// Sends ctrl-alt-del to the guest.
    pub fn ctrl_alt_del(&self) {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrl_alt_del();
    }

    /// Per-device counters, for the control API.
    pub fn metrics(&self) -> serde_json::Value {
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes_out();
        let virtio: Vec<_> = self
            .mmio
            .iter()
            .enumerate()
            .map(|(slot, t)| {
                let t = t.lock().unwrap_or_else(|e| e.into_inner());
                let mut o = serde_json::Map::new();
                o.insert("slot".into(), slot.into());
                o.insert("device_type".into(), t.device_type().into());
                for (k, v) in t.counters() {
                    o.insert(k.into(), v.into());
                }
                serde_json::Value::Object(o)
            })
            .collect();
        serde_json::json!({ "serial": { "bytes_out": serial }, "virtio": virtio })
    }

    pub fn guest_panicked(&self) -> bool {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .guest_panicked()
    }
}

/// A vCPU's view of the devices.
struct Dispatch(Arc<Devices>);

impl IoHandler for Dispatch {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            SERIAL_PORT..=0x3ff if data.len() == 1 => {
                data[0] = self
                    .0
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read((port - SERIAL_PORT) as u8)
            }
            I8042_DATA | I8042_STATUS if data.len() == 1 => {
                data[0] = self
                    .0
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read((port - I8042_DATA) as u8)
            }
            _ => {}
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        match port {
            SERIAL_PORT..=0x3ff if data.len() == 1 => self
                .0
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write((port - SERIAL_PORT) as u8, data[0]),
            I8042_DATA | I8042_STATUS if data.len() == 1 => self
                .0
                .i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write((port - I8042_DATA) as u8, data[0]),
            _ => {}
        }
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.0.mmio_slot(addr) {
            // The driver's interrupt handler reads this on every interrupt:
            // it never waits for the device's lock.
            Some((slot, INTERRUPT_STATUS)) if data.len() == 4 => {
                let v = self.0.irq_status[slot].load(Ordering::SeqCst);
                data.copy_from_slice(&v.to_le_bytes());
            }
            Some((slot, off)) => self.0.mmio[slot]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(off, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if let Some((slot, off)) = self.0.mmio_slot(addr) {
            self.0.mmio[slot]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(off, data);
        }
    }
}

/// A built, running VM.
pub struct RunningVm<H: Hypervisor> {
    _vm: Arc<H::Vm>,
    pub devices: Arc<Devices>,
    vcpus: Vec<VcpuHandle>,
    events: EventLoop,
    pub exits: mpsc::Receiver<ExitReason>,
}

impl<H: Hypervisor> std::fmt::Debug for RunningVm<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

impl<H: Hypervisor> RunningVm<H> {
    /// Stops every vCPU, then the event loop, and waits for their threads.
    pub fn stop(mut self) {
        for v in self.vcpus.drain(..) {
            v.stop();
        }
        self.events.stop();
    }

    /// The event loop, to serve more on it (the control API).
    pub fn events(&self) -> &EventLoop {
        &self.events
    }

    /// Pauses or resumes every vCPU.
    pub fn command(&self, c: Command) {
        for v in &self.vcpus {
            v.send(c);
        }
    }
}

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn start<H: Hypervisor>(hv: &H, cfg: &VmConfig) -> Result<RunningVm<H>, BuildError>
where
    <H::Vm as Vm>::Vcpu: 'static,
{
    let probe = hv.probe();
    if !probe.can_run_linux && !cfg.ignore_probe {
        return Err(BuildError::Probe(probe.reason));
    }
    let size = cfg.memory_mib << 20;
    let mem = GuestMemoryMmap::from_ranges(&layout::ram_regions(size))
        .map_err(|e| BuildError::Memory(cfg.memory_mib, e.to_string()))?;
    let mem = Arc::new(mem);
    let vm = Arc::new(hv.create_vm()?);
    vm.map_memory(mem.clone())?;
    vm.create_irqchip()?;
    vm.create_pit()?;

    let irq = |gsi: u32| -> Result<Arc<IrqLine>, BuildError> {
        let e = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&e, gsi)?;
        Ok(Arc::new(IrqLine(e)))
    };
    let (exit_tx, exits) = mpsc::channel();

    // Legacy devices.
    let console_file = match &cfg.console_log {
        Some(p) => Some(
            berth_limits::RotatingLog::open(p, cfg.console_log_max)
                .map_err(|e| BuildError::Console(p.display().to_string(), e))?,
        ),
        None => None,
    };
    let serial_irq = irq(SERIAL_IRQ)?;
    let serial = SerialConsole::new(
        IrqTrigger(Box::new(move || serial_irq.trigger())),
        ConsoleOut::new(console_file, cfg.console_stdout),
    );
    let i8042 = I8042::new(KbdHost {
        reset: exit_tx.clone(),
        irq: irq(KEYBOARD_IRQ)?,
    });

    // virtio-mmio devices, in the order the guest names them (vda, vdb…).
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(r) = &cfg.rootfs {
        virtio.push(Box::new(Block::open(r, true)?));
    }
    if let Some(d) = &cfg.data_disk {
        virtio.push(Box::new(Block::open(d, false)?));
    }
    virtio.push(Box::new(Rng::default()));
    // Free page reporting: memory the guest frees goes back to the host.
    virtio.push(Box::new(Balloon::new(Box::new(HostRelease))));
    let vsock = match &cfg.vsock_uds {
        Some(uds) => Some(VsockDevice::new(cfg.guest_cid, uds, cfg.vsock_max_conns)?),
        None => None,
    };
    if let Some(v) = &vsock {
        virtio.push(Box::new(v.clone()));
    }
    let net = match &cfg.net_socket {
        Some(p) => {
            let backend = StreamBackend::listen(p)
                .map_err(|e| BuildError::Net(p.display().to_string(), e))?;
            Some(NetDevice::new(
                backend,
                NET_MAC,
                berth_devices::virtio::net::MAX_MTU,
            ))
        }
        None => None,
    };
    if let Some(n) = &net {
        virtio.push(Box::new(n.clone()));
    }
    for share in &cfg.shares {
        let mut fs = ShareFs::new(&share.dir, share.opts.clone())
            .map_err(|e| BuildError::Share(share.dir.display().to_string(), e))?;
        if let Some(uds) = &cfg.vsock_uds {
            match HostWatcher::start(uds) {
                Ok(w) => fs = fs.with_watch(w),
                Err(e) => tracing::warn!("no file events for {}: {e}", share.dir.display()),
            }
        }
        let dev = Fs::new(&share.tag, fs)
            .map_err(|e| BuildError::Share(share.tag.clone(), std::io::Error::other(e)))?;
        virtio.push(Box::new(dev));
    }
    let mut cmdline = cfg.cmdline.trim().to_owned();
    let mut mmio = Vec::new();
    for (n, dev) in virtio.into_iter().enumerate() {
        let (addr, gsi) = layout::virtio_slot(n);
        mmio.push(Mutex::new(MmioTransport::new(
            dev,
            (*mem).clone(),
            irq(gsi)?,
        )));
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{gsi}"));
    }
    let irq_status = mmio
        .iter()
        .map(|t| {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .interrupt_status()
        })
        .collect();
    let devices = Arc::new(Devices {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        mmio,
        irq_status,
    });
    let events = start_event_loop(&*vm, hv.capabilities().ioeventfd, &devices, vsock, net)?;

    // Kernel and what it reads at entry.
    let entry = boot::load_kernel(&*mem, &cfg.kernel)?;
    boot::write_cmdline(&*mem, &cmdline)?;
    match entry.mode {
        regs::EntryMode::Pvh => boot::write_pvh_info(&*mem, size)?,
        regs::EntryMode::Linux64 => {
            boot::write_boot_params(&*mem, entry.setup_header, cmdline.len(), size)?
        }
    }
    mptable::write(&*mem, cfg.cpus)?;
    tracing::info!(
        "kernel {} entry {:#x} ({:?}); cmdline: {cmdline}",
        cfg.kernel.display(),
        entry.entry,
        entry.mode
    );

    // vCPUs.
    let supported = hv.supported_cpuid()?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm.create_vcpu(id)?;
        let mut leaves = cpuid::for_vcpu(&supported, id, cfg.cpus);
        if !probe.can_run_linux {
            cpuid::hide_for_instruction_emulator(&mut leaves);
        }
        vcpu.set_cpuid(&leaves)?;
        vcpu.set_msrs(&regs::boot_msrs())?;
        vcpu.set_fpu_default()?;
        vcpu.setup_lapic()?;
        if id == 0 {
            let sregs = regs::setup_sregs(&*mem, entry.mode, vcpu.sregs()?)?;
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&regs::boot_regs(entry.mode, entry.entry))?;
        }
        let quirks = (!probe.can_run_linux).then(|| mem.clone());
        let handle = vcpu::spawn(vcpu, id, Dispatch(devices.clone()), exit_tx.clone(), quirks)
            .map_err(|e| {
                BuildError::Hypervisor(berth_hypervisor::HypervisorError::Op {
                    op: "spawning a vCPU thread",
                    source: e,
                })
            })?;
        vcpus.push(handle);
    }
    Ok(RunningVm {
        _vm: vm,
        devices,
        vcpus,
        events,
        exits,
    })
}

/// Starts the event loop with every device source: a notifier per virtio
/// queue where the hypervisor has them (elsewhere QueueNotify writes are
/// served on the vCPU that made them), and the vsock host sockets.
fn start_event_loop<V: Vm>(
    vm: &V,
    ioeventfd: bool,
    devices: &Arc<Devices>,
    vsock: Option<VsockDevice>,
    net: Option<NetDevice<StreamBackend>>,
) -> Result<EventLoop, BuildError> {
    let events = EventLoop::start().map_err(BuildError::EventLoop)?;
    if ioeventfd {
        for (slot, transport) in devices.mmio.iter().enumerate() {
            let (base, _) = layout::virtio_slot(slot);
            let notifiers = transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_notifiers();
            for (offset, queue) in notifiers {
                let event = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventLoop)?;
                vm.register_mmio_notifier(base + offset, Some(queue.into()), &event)?;
                let devices = devices.clone();
                events
                    .watch("virtio queue notifier", event, move |e| {
                        e.read()?;
                        devices.notify_queue(slot, queue);
                        Ok(())
                    })
                    .map_err(BuildError::EventLoop)?;
            }
        }
    }
    if let Some(v) = vsock {
        events
            .watch("vsock host sockets", v, |v| {
                v.host_ready();
                Ok(())
            })
            .map_err(BuildError::EventLoop)?;
    }
    if let Some(n) = net {
        events
            .watch("network peer", n, |n| {
                n.backend_ready();
                Ok(())
            })
            .map_err(BuildError::EventLoop)?;
    }
    Ok(events)
}

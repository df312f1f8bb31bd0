//! berth-vmm: Berth's virtual machine monitor, and its device backends for
//! external VMMs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_hypervisor::Hypervisor;
use std::sync::{Arc, Mutex};

use berth_vmm::api;
use berth_vmm::config::VmConfig;
use berth_vmm::vhost_user;
use berth_vmm::vm::{self, ExitReason};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "berth-vmm", version, about = "Berth's virtual machine monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM.
    Run(Box<RunArgs>),
    /// Say whether this host's hypervisor can run a stock Linux guest.
    Probe,
    /// Serve a Berth device to an external VMM (QEMU) over vhost-user.
    #[command(name = "vhost-user", subcommand)]
    VhostUser(VhostUserDevice),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Kernel: an ELF vmlinux with a PVH note (preferred) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Read-only root disk image (the guest's /dev/vda).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Read-write data disk image (the guest's /dev/vdb).
    #[arg(long)]
    data_disk: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u64,
    /// Write the guest console here.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Also copy the guest console to stdout.
    #[arg(long)]
    console_stdout: bool,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// More kernel command line words.
    #[arg(long, default_value = "")]
    extra_cmdline: String,
    /// Host side of a virtio-vsock device: `CONNECT <port>` here reaches
    /// the guest; guest connections to port P reach `<path>_P`.
    #[arg(long)]
    vsock: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
    /// A virtio-net device whose frames go to the peer (passt, gvproxy)
    /// that connects to this unix socket, in their stream framing; a new
    /// peer replaces the old one.
    #[arg(long)]
    net_socket: Option<PathBuf>,
    /// Share a host folder: `TAG=PATH` (read-write) or `TAG=PATH:ro`; the
    /// guest mounts it with `mount -t virtiofs TAG …`. Repeatable.
    #[arg(long = "share", value_name = "TAG=PATH[:ro]")]
    shares: Vec<String>,
    /// Serve the control API (HTTP + JSON) on this unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Seconds a graceful shutdown (SIGTERM, `PUT /shutdown`) may take
    /// before the VM is stopped by force (exit code 5). The default is the
    /// budget every Berth component shares, longer than the guest agent's
    /// worst case.
    #[arg(long, default_value_t = berth_proto::shutdown::BUDGET.as_secs())]
    shutdown_timeout: u64,
    /// Rotate the console log to `<console-log>.1` when it reaches this
    /// many bytes.
    #[arg(long, default_value_t = 8 << 20)]
    console_log_max: u64,
    /// Boot even where the probe says a stock Linux can't run (for kernels
    /// made for this host, like the kvm_pvm test kernel).
    #[arg(long)]
    ignore_probe: bool,
}

#[derive(Debug, Subcommand)]
enum VhostUserDevice {
    /// virtio-vsock, host side on unix sockets (Firecracker's convention).
    Vsock {
        /// The vhost-user socket the VMM connects to.
        #[arg(long)]
        socket: PathBuf,
        /// Host side of the device: connect here and send `CONNECT <port>`;
        /// guest connections to port P reach `<uds>_P`.
        #[arg(long)]
        uds: PathBuf,
        /// The guest's CID.
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
    },
    /// virtio-fs: one shared host folder (QEMU's vhost-user-fs-device
    /// holds the tag).
    Fs {
        /// The vhost-user socket the VMM connects to.
        #[arg(long)]
        socket: PathBuf,
        /// The host folder to share.
        #[arg(long)]
        dir: PathBuf,
        /// Refuse every change (EROFS).
        #[arg(long)]
        read_only: bool,
        /// The VMM's vsock socket (Firecracker's convention): host file
        /// events are sent to the guest agent through it.
        #[arg(long)]
        events_vsock: Option<PathBuf>,
    },
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let fd_limit = raise_fd_limit();
    match cli.command {
        Command::VhostUser(VhostUserDevice::Vsock { socket, uds, guest_cid }) => {
            let max_conns = vsock_cap(fd_limit);
            tracing::info!("vhost-user vsock: at most {max_conns} connections (open-file limit {fd_limit})");
            match vhost_user::vsock::serve(&socket, &uds, guest_cid, max_conns) {
                Ok(m) => {
                    tracing::info!("vhost-user vsock: VMM disconnected; {m:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::VhostUser(VhostUserDevice::Fs {
            socket,
            dir,
            read_only,
            events_vsock,
        }) => {
            let opts = share_options(read_only, fd_limit);
            tracing::info!(
                "vhost-user fs: at most {} inodes held and {} files open by the guest (open-file limit {fd_limit})",
                opts.max_inodes,
                opts.max_handles
            );
            match vhost_user::fs::serve(&socket, &dir, opts, events_vsock.as_deref()) {
                Ok(c) => {
                    tracing::info!("vhost-user fs: VMM disconnected; {c:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::Probe => match berth_hypervisor::Platform::new() {
            Ok(h) => {
                let p = h.probe();
                println!("{}: {}", if p.can_run_linux { "yes" } else { "no" }, p.reason);
                if p.can_run_linux { ExitCode::SUCCESS } else { ExitCode::from(1) }
            }
            Err(e) => fail(&format!("{e}. Check that /dev/kvm exists and that you may open it (e.g. add yourself to the kvm group).")),
        },
        Command::Run(args) => run(*args, fd_limit),
    }
}

/// Raises the open-file limit as far as allowed; returns the limit in force.
fn raise_fd_limit() -> u64 {
    match berth_limits::fds::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            let n = berth_limits::fds::current_nofile_limit();
            tracing::warn!("cannot raise the open-file limit ({e}); it stays at {n}");
            n
        }
    }
}

/// vsock connections this process can hold: one descriptor each.
fn vsock_cap(fd_limit: u64) -> usize {
    berth_limits::fds::connection_cap(fd_limit, 1, berth_devices::virtio::vsock::MAX_CONNS)
}

/// How a share is served: the inodes the guest may hold and the files it
/// may have open are bounded by the descriptors this process has (one
/// each), keeping some for the rest.
fn share_options(read_only: bool, fd_limit: u64) -> berth_devices::virtio::fs::ShareOptions {
    let spare = fd_limit.saturating_sub(256).max(64);
    berth_devices::virtio::fs::ShareOptions::within_fds(
        read_only,
        usize::try_from(spare).unwrap_or(usize::MAX),
    )
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("berth-vmm: {msg}");
    ExitCode::FAILURE
}

fn run(a: RunArgs, fd_limit: u64) -> ExitCode {
    let cfg = VmConfig {
        kernel: a.kernel,
        rootfs: a.rootfs,
        data_disk: a.data_disk,
        cpus: a.cpus,
        memory_mib: a.memory,
        console_log: a.console_log,
        console_stdout: a.console_stdout,
        cmdline: format!("{} {}", a.cmdline, a.extra_cmdline),
        api_socket: a.api_socket.clone(),
        vsock_uds: a.vsock.clone(),
        guest_cid: a.guest_cid,
        vsock_max_conns: vsock_cap(fd_limit),
        net_socket: a.net_socket.clone(),
        shares: Vec::new(),
        console_log_max: a.console_log_max,
        ignore_probe: a.ignore_probe,
    };
    let mut cfg = cfg;
    for arg in &a.shares {
        match berth_vmm::config::parse_share(arg, |ro| share_options(ro, fd_limit)) {
            Ok(s) => cfg.shares.push(s),
            Err(e) => return fail(&e.to_string()),
        }
    }
    if let Err(e) = cfg.validate() {
        return fail(&e.to_string());
    }
    let hv = match berth_hypervisor::Platform::new() {
        Ok(h) => h,
        Err(e) => return fail(&format!("{e}. Check that /dev/kvm exists and that you may open it (e.g. add yourself to the kvm group).")),
    };
    for sig in [libc::SIGTERM, libc::SIGINT] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_terminate) {
            tracing::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let mut running = match vm::start(&hv, &cfg) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    let shutdown_requested = Arc::new(Mutex::new(None::<Instant>));
    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<api::Wake>();
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let resumes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let resumed = Arc::new(tokio::sync::Notify::new());
    if let Some(path) = &cfg.api_socket {
        let state = api::ApiState {
            devices: running.devices.clone(),
            started: Instant::now(),
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            shutdown_requested: shutdown_requested.clone(),
            wake: wake_tx.clone(),
            paused: paused.clone(),
            resumes: resumes.clone(),
            resumed: resumed.clone(),
        };
        if let Err(e) = api::serve(running.events(), path, state) {
            running.stop();
            return fail(&format!(
                "cannot serve the control API on {}: {e}",
                path.display()
            ));
        }
    }
    // Everything that can end or change the run wakes the loop through
    // `wake_rx`: vCPU exits (forwarded by a thread), API requests and
    // signals (a task on the event loop); nothing is polled.
    let exits = std::mem::replace(&mut running.exits, std::sync::mpsc::channel().1);
    let tx = wake_tx.clone();
    let forwarded = std::thread::Builder::new()
        .name("vcpu-exits".into())
        .spawn(move || {
            for r in exits.iter() {
                if tx.send(api::Wake::Exit(r)).is_err() {
                    return;
                }
            }
            let _ = tx.send(api::Wake::VcpusEnded);
        });
    if let Err(e) = forwarded {
        running.stop();
        return fail(&format!("cannot start a thread: {e}"));
    }
    // Registered here, before the flag is read, so no signal falls
    // between the two.
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = running.events().runtime().enter();
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    match signals {
        (Ok(mut term), Ok(mut int)) => {
            let tx = wake_tx.clone();
            running.events().runtime().spawn(async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    if tx.send(api::Wake::Terminate).is_err() {
                        return;
                    }
                }
            });
        }
        _ => tracing::warn!("cannot follow SIGTERM/SIGINT: send a shutdown through the API"),
    }
    // A signal that came while the VM was being built.
    if TERMINATE.swap(false, Ordering::SeqCst) {
        let _ = wake_tx.send(api::Wake::Terminate);
    }
    let grace = Duration::from_secs(a.shutdown_timeout);
    let reason = loop {
        let deadline = shutdown_requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t + grace);
        let woke = match deadline {
            Some(d) => match wake_rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(w) => w,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break ExitReason::ForcedStop,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break ExitReason::Error("all vCPUs ended".into())
                }
            },
            None => match wake_rx.recv() {
                Ok(w) => w,
                Err(_) => break ExitReason::Error("all vCPUs ended".into()),
            },
        };
        match woke {
            api::Wake::Exit(r) => break r,
            api::Wake::VcpusEnded => break ExitReason::Error("all vCPUs ended".into()),
            api::Wake::Pause => {
                if !paused.swap(true, Ordering::SeqCst) {
                    tracing::info!("vCPUs paused through the API");
                    running.command(berth_vmm::vcpu::Command::Pause);
                }
            }
            api::Wake::Resume => {
                if paused.swap(false, Ordering::SeqCst) {
                    tracing::info!("vCPUs resumed through the API");
                    running.command(berth_vmm::vcpu::Command::Resume);
                    resumes.fetch_add(1, Ordering::SeqCst);
                    resumed.notify_waiters();
                }
            }
            // The deadline is read again above.
            api::Wake::Shutdown => {}
            api::Wake::Terminate => {
                let mut requested = shutdown_requested.lock().unwrap_or_else(|e| e.into_inner());
                if requested.is_none() {
                    tracing::info!("shutting down: ctrl-alt-del sent to the guest");
                    running.devices.ctrl_alt_del();
                    *requested = Some(Instant::now());
                }
            }
        }
    };
    let reason = if reason == ExitReason::PowerOff && running.devices.guest_panicked() {
        ExitReason::GuestPanic
    } else {
        reason
    };
    running.stop();
    match &reason {
        ExitReason::PowerOff => tracing::info!("guest powered off"),
        ExitReason::ForcedStop => eprintln!(
            "berth-vmm: the guest did not power off within {} s of the shutdown request; stopped it by force (its disks may need a check)",
            a.shutdown_timeout
        ),
        ExitReason::GuestPanic => {
            eprintln!("berth-vmm: the guest kernel panicked (see the console log)")
        }
        ExitReason::TripleFault => eprintln!("berth-vmm: the guest triple-faulted"),
        ExitReason::Error(e) => eprintln!("berth-vmm: {e}"),
    }
    ExitCode::from(reason.code() as u8)
}

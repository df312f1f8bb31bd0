//! The host agent: one detached process per VM that owns its life.
//!
//! It takes the state directory's lock, starts the driver, waits for the
//! guest agent and dockerd, forwards `docker.sock`, serves `agent.sock`
//! ([`api`]), and on `stop` (or SIGTERM) asks the guest for an orderly
//! shutdown ([`stop`]). When the VM process ends, for whatever reason, it
//! records how (`last-stop.json`), removes the sockets, releases the lock
//! and exits.

mod api;
pub mod clock;
mod events;
pub mod forward;
pub mod logs;
mod qmp;
mod stop;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_proto::Phase;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::config::Config;
use crate::driver::{self, Driver, Image, Machine, MachineSpec};
use crate::guest::GuestClient;
use crate::paths::StateDir;
use crate::status::{Status, StopHow, StopReport, VmState};

/// How long a boot may take before it is declared failed. TCG boots take
/// ~25 s here; a loaded machine can take several times that.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long `berth start` waits for the host agent to report the VM running.
pub const BOOT_LIMIT: Duration = Duration::from_secs(630);

/// How long the guest gets for its orderly shutdown after `stop` before the
/// VM process is killed: the budget every component shares.
pub const STOP_TIMEOUT: Duration = berth_proto::shutdown::BUDGET;

/// Requests from the API and signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Stop,
    Kill,
}

/// State shared between the lifecycle task and the API.
#[derive(Debug)]
pub struct Shared {
    status: Mutex<Status>,
    /// The passt that carries the guest's traffic, while the VM runs.
    passt: Mutex<Option<Arc<crate::net::passt::PasstStats>>>,
    /// Published ports, once Docker is ready.
    forwards: Mutex<Option<Arc<crate::net::ports::Forwards>>>,
    started: Mutex<Option<Instant>>,
    command: Mutex<Option<Command>>,
    notify: Notify,
    state: StateDir,
    /// berth-vmm's balloon count, read from its metrics.
    balloon_reported: Mutex<Option<u64>>,
}

impl Shared {
    fn snapshot(&self) -> Status {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.uptime_s = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_secs());
        if let Some(n) = s.network.as_mut() {
            n.passt = self
                .passt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|p| p.snapshot());
        }
        if let Some(f) = self
            .forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.forwards = f.status();
        }
        let balloon = *self
            .balloon_reported
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.resources = Some(crate::status::Resources::measure(
            &self.state,
            s.pid.filter(|_| s.state != VmState::Stopped),
            balloon,
        ));
        s
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn phase(&self, state: VmState, phase: &str) {
        tracing::info!("{phase}");
        self.update(|s| {
            s.state = state;
            s.phase = phase.to_owned();
        });
    }

    fn request(&self, c: Command) {
        let mut cur = self.command.lock().unwrap_or_else(|e| e.into_inner());
        // Kill wins over stop; nothing downgrades it.
        if *cur != Some(Command::Kill) {
            *cur = Some(c);
        }
        self.notify.notify_one();
    }

    fn take(&self) -> Option<Command> {
        self.command
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Waits for the next command and consumes it.
    async fn next_command(&self) -> Command {
        loop {
            let notified = self.notify.notified();
            if let Some(c) = self.take() {
                return c;
            }
            notified.await;
        }
    }

    /// Waits until a kill is asked for (further stops change nothing).
    async fn kill_requested(&self) {
        while self.next_command().await != Command::Kill {}
    }
}

/// Takes the state directory's lock without waiting. The lock is an
/// advisory `flock` on `lock`, released by the kernel when the holder
/// exits, however it exits.
pub fn try_lock(state: &StateDir) -> anyhow::Result<Option<Flock<File>>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(state.lock())
        .with_context(|| format!("opening {}", state.lock().display()))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => bail!("locking {}: {e}", state.lock().display()),
    }
}

/// Creates the sparse data disk, or grows it to `gib`. A disk the host
/// creates is marked fresh (`fresh`): only then may the guest format it.
/// Returns whether the disk is (still) fresh.
fn prepare_data_disk(path: &Path, fresh: &Path, gib: u64) -> anyhow::Result<bool> {
    let want = gib << 30;
    let created = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(m) => m.len() == 0,
    };
    if created {
        // The marker first: a crash between the two leaves a fresh marker
        // and no disk, which is right.
        std::fs::write(fresh, b"created by the host; not formatted yet\n")
            .with_context(|| format!("writing {}", fresh.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the data disk {}", path.display()))?;
    let have = f.metadata()?.len();
    if have < want {
        f.set_len(want)
            .with_context(|| format!("sizing the data disk {}", path.display()))?;
        f.sync_all()?;
    }
    Ok(fresh.exists())
}

/// Runs the host agent for the VM in `state` until the VM ends.
/// Takes the state directory's lock for a host agent, or says who holds it.
pub fn lock_for_host_agent(state: &StateDir) -> anyhow::Result<Flock<File>> {
    state.create()?;
    match try_lock(state)? {
        Some(lock) => Ok(lock),
        None => bail!(
            "another Berth host agent holds {} (the VM is running or starting)",
            state.lock().display()
        ),
    }
}

/// Runs the host agent for the VM in `state`, whose lock it holds
/// ([`lock_for_host_agent`]), until the VM ends.
pub async fn run(state: StateDir, image_dir: PathBuf, mut lock: Flock<File>) -> anyhow::Result<()> {
    let _ = lock.set_len(0);
    let _ = writeln!(&mut *lock, "{}", std::process::id());

    let cfg = Config::load(&state.config())?;
    let sel = driver::select(cfg.driver)?;
    let image = Image::load(&image_dir)?;
    tracing::info!(driver = %sel.driver, reason = %sel.reason, "driver selected");

    let shared = Arc::new(Shared {
        status: Mutex::new(Status {
            state: VmState::Starting,
            phase: "preparing".into(),
            driver: Some(sel.driver.to_string()),
            driver_reason: Some(sel.reason.clone()),
            host_agent_pid: Some(std::process::id()),
            ..Status::stopped(&state, &cfg)
        }),
        started: Mutex::new(None),
        passt: Mutex::new(None),
        forwards: Mutex::new(None),
        command: Mutex::new(None),
        notify: Notify::new(),
        state: state.clone(),
        balloon_reported: Mutex::new(None),
    });

    end_orphans(&state);
    for s in state.sockets() {
        let _ = std::fs::remove_file(s);
    }
    let api_listener = UnixListener::bind(state.agent_sock())
        .with_context(|| format!("listening on {}", state.agent_sock().display()))?;
    let api_task = tokio::spawn(api::serve(api_listener, shared.clone()));
    let signals = tokio::spawn(forward_signals(shared.clone()));

    let result = lifecycle(&state, &cfg, sel.driver, image, &shared).await;
    match &result {
        Ok(report) => {
            if let Err(e) = report.save(&state) {
                tracing::warn!("cannot record how the VM stopped: {e}");
            }
            if report.how == StopHow::Crashed {
                shared.update(|s| s.error = Some(report.message.clone()));
            }
            shared.update(|s| s.last_stop = Some(report.clone()));
        }
        Err(e) => shared.update(|s| s.error = Some(format!("{e:#}"))),
    }
    shared.phase(VmState::Stopped, "stopped");
    api_task.abort();
    signals.abort();
    for s in state.sockets() {
        let _ = std::fs::remove_file(s);
    }
    let _ = std::fs::remove_file(state.vm_pids());
    let _ = lock.set_len(0);
    drop(lock);
    result.map(|_| ())
}

/// A task that ends with the scope that started it, however it is left.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the VM's process ids, for [`end_orphans`].
fn record_pids(state: &StateDir, pids: &[u32]) {
    let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
    if let Err(e) = std::fs::write(state.vm_pids(), text) {
        tracing::warn!("cannot record the VM's pids: {e}");
    }
}

/// A host agent that was killed (not stopped) leaves its VM running, still
/// holding the data disk. With the lock now ours, nobody else owns those
/// processes: end each one that is still this VM's (its command line names
/// this state directory), so the new VM can start.
fn end_orphans(state: &StateDir) {
    let Ok(text) = std::fs::read_to_string(state.vm_pids()) else {
        return;
    };
    let ours = state.root.to_string_lossy().into_owned();
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid > 1 && String::from_utf8_lossy(&cmdline).contains(&ours) {
            tracing::warn!("ending process {pid}, left running by a host agent that died");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Wait until it is gone (it is not our child: poll).
            for _ in 0..100 {
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let _ = std::fs::remove_file(state.vm_pids());
}

async fn forward_signals(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => shared.request(Command::Stop),
            _ = int.recv() => shared.request(Command::Stop),
            // A closed terminal is no reason to stop the VM.
            _ = hup.recv() => {}
        }
    }
}

async fn lifecycle(
    state: &StateDir,
    cfg: &Config,
    driver: Driver,
    image: Image,
    shared: &Arc<Shared>,
) -> anyhow::Result<StopReport> {
    let fresh_disk = prepare_data_disk(&state.data_disk(), &state.data_disk_fresh(), cfg.disk_gib)?;
    let log_max = cfg.log_max_mib << 20;
    // Keep the previous boot's console for post-mortems.
    let _ = std::fs::rename(state.console_log(), state.root.join("console.log.1"));
    if matches!(driver, Driver::Qemu(_)) {
        logs::serve_console(&state.console_sock(), &state.console_log(), log_max)
            .with_context(|| format!("listening on {}", state.console_sock().display()))?;
    }
    // The network: passt must be there, and the guest's resolver is
    // answered from the start of the boot.
    let passt_bin = crate::net::passt::find()?;
    let net = crate::net::plan();
    let dns_listener = UnixListener::bind(state.dns_sock())
        .with_context(|| format!("listening on {}", state.dns_sock().display()))?;
    let resolver = Arc::new(crate::net::dns::Resolver::new(&net, cfg.dns_server_addrs()));
    let _dns_task = AbortOnDrop(tokio::spawn(crate::net::dns::serve(dns_listener, resolver)));
    shared.update(|s| {
        s.network = Some(crate::status::NetworkStatus {
            guest_ip: net.ipv4.to_string(),
            host_ip: net.gateway4.to_string(),
            ipv6: net.ipv6.is_some(),
            passt: None,
        })
    });
    let hostloop_listener = UnixListener::bind(state.hostloop_sock())
        .with_context(|| format!("listening on {}", state.hostloop_sock().display()))?;
    let _hostloop_task = AbortOnDrop(tokio::spawn(crate::net::hostloop::serve(hostloop_listener)));
    let milestones = Arc::new(events::Milestones::default());
    let events_listener = UnixListener::bind(state.events_sock())
        .with_context(|| format!("listening on {}", state.events_sock().display()))?;
    let _events_task = AbortOnDrop(tokio::spawn(events::serve(
        events_listener,
        milestones.clone(),
    )));
    let (shares, missing) = cfg.share_specs();
    for m in &missing {
        tracing::warn!("shared folder {m} does not exist on this host: not shared");
    }
    shared.update(|s| {
        s.shares = shares
            .iter()
            .map(|sh| crate::status::ShareStatus {
                path: sh.path.clone(),
                read_only: sh.read_only,
                error: None,
            })
            .chain(missing.iter().map(|m| crate::status::ShareStatus {
                path: m.clone(),
                read_only: false,
                error: Some("the folder does not exist on this host".into()),
            }))
            .collect()
    });
    let spec = MachineSpec {
        image,
        state: state.clone(),
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        cmdline_extra: cfg.cmdline_extra.clone(),
        fresh_disk,
        console_log_max: log_max,
        net: Some(net.clone()),
        shares,
    };
    shared.phase(VmState::Starting, &format!("starting the VM ({driver})"));
    let t0 = Instant::now();
    let mut machine = Machine::launch(driver, &spec).await?;
    shared.update(|s| s.pid = machine.pid());
    record_pids(state, &machine.pids());
    *shared.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(t0);
    let passt_stats = Arc::new(crate::net::passt::PasstStats::default());
    *shared.passt.lock().unwrap_or_else(|e| e.into_inner()) = Some(passt_stats.clone());
    let (passt_tx, passt_rx) = tokio::sync::oneshot::channel();
    let _passt = AbortOnDrop(tokio::spawn(crate::net::passt::supervise(
        passt_bin,
        state.net_sock(),
        state.root.join("passt.log"),
        net,
        passt_stats,
        passt_tx,
    )));
    tokio::select! {
        r = passt_rx => {
            if let Err(e) = r.unwrap_or_else(|_| Err("passt's supervisor ended".into())) {
                machine.kill().await;
                bail!("starting the VM's network (passt) failed: {e}");
            }
        }
        st = machine.wait() => {
            machine.stop_helpers().await;
            bail!("the VM process exited during boot ({})", describe(st?));
        }
    }
    // A full host disk makes the guest's writes wait (see qmp.rs): say so.
    // QEMU's RESUME events also tell the clock keeper the VM was paused.
    let guest_clock = Arc::new(clock::Clock::default());
    let _disk_watch = AbortOnDrop(match driver {
        Driver::Qemu(_) => tokio::spawn(qmp::watch(
            state.qmp_sock(),
            state.data_disk(),
            shared.clone(),
            guest_clock.clone(),
        )),
        Driver::Vmm => tokio::spawn(qmp::watch_vmm(
            state.vmm_sock(),
            state.data_disk(),
            shared.clone(),
            guest_clock.clone(),
        )),
    });

    let outcome = tokio::select! {
        r = boot(state, shared, t0) => r.map(|_| None),
        st = machine.wait() => Ok(Some(st)),
        c = shared.next_command() => Err(anyhow::anyhow!("start cancelled ({c:?})")),
    };
    let mut _clock_keeper = None;
    let forwarder = match outcome {
        Ok(None) => {
            _clock_keeper = Some(AbortOnDrop(tokio::spawn(clock::keep(
                state.vsock_sock(),
                shared.clone(),
                guest_clock.clone(),
            ))));
            if fresh_disk {
                // Formatted now: from here on a blank disk is a damaged one.
                let _ = std::fs::remove_file(state.data_disk_fresh());
            }
            let listener = bind_private(&state.docker_sock())?;
            let stats = Arc::new(forward::ForwardStats::default());
            let task = tokio::spawn(forward::serve(
                listener,
                state.vsock_sock(),
                berth_proto::DOCKER_PORT,
                stats,
                forward::cap_for_this_process(),
            ));
            shared.update(|s| s.boot_ms = Some(t0.elapsed().as_millis() as u64));
            let forwards = crate::net::ports::Forwards::new(state.vsock_sock());
            *shared.forwards.lock().unwrap_or_else(|e| e.into_inner()) = Some(forwards.clone());
            let ports = tokio::spawn(crate::net::ports::follow(state.vsock_sock(), forwards));
            shared.phase(VmState::Running, "running");
            Some((task, ports))
        }
        Ok(Some(st)) => {
            machine.stop_helpers().await;
            bail!("the VM process exited during boot ({})", describe(st?));
        }
        Err(e) => {
            machine.kill().await;
            return Err(e);
        }
    };

    let report = tokio::select! {
        st = machine.wait() => {
            let st = st?;
            let last = milestones.newest().unwrap_or_else(|| "none".into());
            if st.success() && last == "power-off" {
                let r = StopReport::new(
                    StopHow::Clean,
                    stop::clean_summary(&milestones, Duration::ZERO),
                    0.0,
                );
                tracing::info!("the guest powered off by itself: {}", r.message);
                r
            } else {
                let r = StopReport::new(
                    StopHow::Crashed,
                    format!(
                        "the VM process ended unexpectedly ({}; last guest step: {last})",
                        describe(st)
                    ),
                    0.0,
                );
                tracing::error!("{}", r.message);
                r
            }
        }
        c = shared.next_command() => {
            stop::stop(state, shared, &milestones, &mut machine, c).await
        }
    };
    if let Some((f, ports)) = forwarder {
        f.abort();
        ports.abort();
    }
    if let Some(f) = shared
        .forwards
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        f.clear();
    }
    shared
        .passt
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    shared.update(|s| {
        s.network = None;
        s.shares.clear();
        s.clock = None;
    });
    machine.stop_helpers().await;
    Ok(report)
}

/// Polls the guest agent until dockerd is ready.
async fn boot(state: &StateDir, shared: &Arc<Shared>, t0: Instant) -> anyhow::Result<()> {
    let deadline = t0 + BOOT_TIMEOUT;
    shared.phase(VmState::Starting, "booting the guest");
    let mut client = loop {
        match GuestClient::connect(&state.vsock_sock(), "berth-host-agent").await {
            Ok(c) => break c,
            Err(e) => {
                if Instant::now() > deadline {
                    bail!("the guest agent did not answer within {BOOT_TIMEOUT:?}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    if let Err(e) = client.set_clock_now().await {
        tracing::warn!("setting the guest clock failed: {e}");
    }
    let mut last = None;
    loop {
        let st = client.state().await?;
        if last != Some(st.phase) {
            last = Some(st.phase);
            match st.phase {
                Phase::Booting => shared.phase(VmState::Starting, "preparing the data disk"),
                Phase::StartingDocker => shared.phase(VmState::Starting, "starting Docker"),
                Phase::Ready => break,
                Phase::Failed if st.data_disk == berth_proto::DataDiskState::Refused => bail!(
                    "the guest refused the data disk {}: {}",
                    state.data_disk().display(),
                    st.error.unwrap_or_else(|| "no reason given".into())
                ),
                Phase::Failed => bail!(
                    "the guest could not start Docker: {}",
                    st.error.unwrap_or_else(|| "no reason given".into())
                ),
                Phase::ShuttingDown => bail!("the guest is shutting down"),
            }
        }
        if Instant::now() > deadline {
            bail!("Docker did not become ready within {BOOT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ready per the agent; ask dockerd itself through the same path users take.
    let stream = crate::vsock::connect(&state.vsock_sock(), berth_proto::DOCKER_PORT).await?;
    let (code, body) =
        crate::http::request_on(stream, hyper::Method::GET, "/version", None).await?;
    if !code.is_success() {
        bail!("dockerd answered /version with {code}");
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    shared.update(|s| s.docker_version = v["Version"].as_str().map(str::to_owned));
    Ok(())
}

/// Binds a unix socket only its owner may use (0600; the directory is 0700).
fn bind_private(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub(crate) fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let d = std::env::temp_dir().join(format!("berth-lock-{}", std::process::id()));
        let st = StateDir::at(&d);
        st.create().unwrap();
        let a = try_lock(&st).unwrap().expect("first lock");
        assert!(try_lock(&st).unwrap().is_none(), "second lock must fail");
        drop(a);
        assert!(try_lock(&st).unwrap().is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn data_disk_is_sparse_only_grows_and_is_fresh_only_when_the_host_made_it() {
        let d = std::env::temp_dir().join(format!("berth-disk-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("data.img");
        let fresh = d.join("data.img.fresh");
        assert!(prepare_data_disk(&p, &fresh, 8).unwrap(), "created: fresh");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 8 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(m.blocks() * 512 < 1 << 20, "not sparse");
        assert!(
            prepare_data_disk(&p, &fresh, 4).unwrap(),
            "still fresh until formatted"
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 << 30);
        // Once the guest formatted it the marker goes, and an existing disk
        // never becomes fresh again, even if it reads as blank.
        std::fs::remove_file(&fresh).unwrap();
        assert!(!prepare_data_disk(&p, &fresh, 8).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

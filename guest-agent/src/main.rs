//! berth-agent: PID 1 of Berth's guest. It mounts the filesystems, prepares
//! the data disk, runs containerd and dockerd, serves the host over vsock and
//! powers the guest off in order. See this crate's README.md.
//!
//! Run as an ordinary program (not PID 1) it only offers tools for the
//! host, e.g. `berth-agent bench-ping <N>` through `exec`.

mod bench;
mod bindcheck;
mod clock;
mod cmdline;
mod console;
mod control;
mod daemons;
mod datadisk;
mod dns;
mod docker_api;
mod events;
mod exec;
mod fatal;
mod fsevents;
mod hostloop;
mod httpgate;
mod init;
mod net;
mod ports;
mod process;
mod reaper;
mod selftest;
mod shares;
mod shutdown;
mod state;
mod vsock;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_proto::{DataDiskState, Phase};
use tokio::signal::unix::{signal, SignalKind};

use crate::daemons::Supervised;
use crate::reaper::Reaper;
use crate::state::{Shared, ShutdownCause};

fn main() {
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    // PID 1 gets the kernel command line's leftover words as arguments, so
    // only an ordinary process looks at them.
    if !pid1 {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().map(String::as_str) == Some("bench-ping") {
            std::process::exit(bench::main(&args[1..]));
        }
    }
    console::milestone("agent-start", &[("version", env!("CARGO_PKG_VERSION"))]);
    if !pid1 {
        eprintln!("berth-agent: must run as PID 1 of the Berth guest (it mounts filesystems and powers the machine off); as a program it only knows `bench-ping <N>`");
        std::process::exit(2);
    }
    tracing_subscriber::fmt()
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_writer(std::io::stdout)
        .init();
    fatal::install_panic_hook();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    match rt {
        Ok(rt) => rt.block_on(agent()),
        Err(e) => {
            console::write_line(&format!("berth-agent: fatal cannot start the runtime: {e}"));
            fatal::emergency_stop("no runtime");
        }
    }
    power_off();
}

/// Everything from mounts to shutdown. Returns when the guest may power off.
async fn agent() {
    let shared = Shared::new();
    if let Err(e) = boot(shared.clone()).await {
        console::write_line(&format!("berth-agent: error {e:#}"));
        shared.update(|s| {
            s.phase = Phase::Failed;
            s.error = Some(format!("{e:#}"));
        });
        console::milestone("failed", &[]);
        // A self-test boot has nobody to ask for the shutdown.
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if cmdline::parse(&cmdline).selftest.is_some() {
            shared.request_shutdown(ShutdownCause::SelfTest);
        }
    }
    let cause = shared.shutdown_requested().await;
    tracing::info!("shutting down ({cause:?})");
    shutdown::run(&shared).await;
    // The host learns how the shutdown went from these milestones.
    events::flush(Duration::from_secs(2)).await;
}

async fn boot(shared: Arc<Shared>) -> anyhow::Result<()> {
    init::mount_early().context("mounting kernel filesystems")?;
    init::tune_page_reporting();
    // Ctrl-alt-del becomes SIGINT to PID 1 instead of an instant reboot.
    nix::sys::reboot::set_cad_enabled(false).context("disabling ctrl-alt-del reboot")?;
    let reaper = Reaper::start().context("starting the child reaper")?;
    watch_signals(shared.clone())?;
    let settings = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let kernel = init::kernel_release();
    events::start();
    // Container creates from the host are checked for bind mounts of
    // paths in no share (only when there are shares to name).
    let bind_check = (!settings.shares.is_empty()).then(|| {
        Arc::new(bindcheck::BindCheck {
            shares: settings.shares.clone(),
        })
    });
    vsock::start(
        shared.clone(),
        reaper.clone(),
        kernel.clone(),
        settings.echo,
        bind_check,
    );
    ports::serve(shared.ports.clone());
    init::set_hostname(&settings.hostname)?;
    let network = tokio::spawn({
        let reaper = reaper.clone();
        let net = settings.net.clone();
        async move { net::setup(&reaper, net.as_ref()).await }
    });
    init::setup_cgroups().context("setting up cgroup v2")?;
    daemons::write_configs(settings.net.as_ref()).context("writing daemon configuration")?;

    let disk = match datadisk::prepare(&reaper, &settings.data_disk, settings.data_fresh).await {
        Ok(state) => state,
        Err(e) => {
            shared.update(|s| s.data_disk = DataDiskState::Refused);
            console::milestone("data-disk", &[("state", "refused")]);
            return Err(e).context("data disk unusable; dockerd will not start on it");
        }
    };
    shared.update(|s| s.data_disk = disk);
    console::milestone("data-disk", &[("state", disk_word(disk))]);

    // Host folders are in place before dockerd, so containers that start
    // with it (restart policies) find their bind mounts.
    if !settings.shares.is_empty() {
        let shares = settings.shares.clone();
        let mounted = tokio::task::spawn_blocking(move || shares::mount_all(&shares))
            .await
            .unwrap_or(0);
        fsevents::start(settings.shares.clone());
        console::milestone(
            "shares",
            &[
                ("mounted", &mounted.to_string()),
                ("of", &settings.shares.len().to_string()),
            ],
        );
    }

    // dockerd starts with the network in place (its bridge avoids eth0's
    // subnet; containers copy its resolver).
    match network.await {
        Ok(Ok(())) => {
            if let Some(n) = &settings.net {
                console::milestone("network", &[("ip", &n.ipv4.to_string())]);
                if let Err(e) = dns::start(n.ipv4.into()).await {
                    tracing::warn!("the DNS relay cannot listen: {e}");
                }
                let (reaper, gw) = (reaper.clone(), n.gateway4);
                tokio::spawn(async move {
                    if let Err(e) = hostloop::start(&reaper, gw).await {
                        tracing::warn!("TCP to the host's loopback stays on passt: {e:#}");
                    }
                });
            }
        }
        Ok(Err(e)) => tracing::warn!("bringing up the network failed: {e:#}"),
        Err(e) => tracing::warn!("bringing up the network failed: {e}"),
    }

    shared.update(|s| s.phase = Phase::StartingDocker);
    let agent_start = console::uptime_ms();
    // dockerd waits for containerd's socket by itself, so both start now.
    shared.add_daemon(Supervised::start(
        reaper.clone(),
        daemons::containerd_spec(),
    ));
    shared.add_daemon(Supervised::start(reaper.clone(), daemons::dockerd_spec()));
    wait_docker_ready(&shared).await;
    let now = console::uptime_ms();
    shared.update(|s| {
        s.phase = Phase::Ready;
        s.docker_ready_uptime_ms = Some(now);
    });
    console::milestone(
        "docker-ready",
        &[("since_daemons_ms", &(now - agent_start).to_string())],
    );
    if shared.snapshot().data_disk == DataDiskState::Mounted {
        let reaper = reaper.clone();
        tokio::spawn(async move { datadisk::trim_once(&reaper).await });
    }
    let table = shared.ports.clone();
    fatal::spawn_essential("ports", move || ports::follow(table.clone()));

    if let Some(path) = settings.test_panic {
        test_panic(path);
    }
    if let Some(t) = settings.selftest {
        tokio::spawn(async move {
            if let Err(e) = selftest::run(&t).await {
                console::write_line(&format!("berth-agent: selftest-failed {e}"));
            }
            shared.request_shutdown(ShutdownCause::SelfTest);
        });
    }
    Ok(())
}

/// Polls `/_ping` until dockerd answers or a shutdown begins.
async fn wait_docker_ready(shared: &Shared) {
    loop {
        if shared.phase() == Phase::ShuttingDown {
            return;
        }
        if std::path::Path::new(daemons::DOCKER_SOCKET).exists()
            && docker_api::ping(daemons::DOCKER_SOCKET).await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM and SIGINT (ctrl-alt-del) ask for an orderly shutdown.
fn watch_signals(shared: Arc<Shared>) -> anyhow::Result<()> {
    // Registered once here, so a failure is a boot error; the supervised
    // task re-registers (which cannot fail once it has worked).
    drop(signal(SignalKind::terminate()).context("watching SIGTERM")?);
    drop(signal(SignalKind::interrupt()).context("watching SIGINT")?);
    fatal::spawn_essential("signals", move || {
        let shared = shared.clone();
        async move {
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            loop {
                let which = tokio::select! {
                    Some(_) = term.recv() => "SIGTERM",
                    Some(_) = int.recv() => "SIGINT (ctrl-alt-del)",
                    else => return,
                };
                tracing::info!("{which}: starting an orderly shutdown");
                shared.request_shutdown(ShutdownCause::Signal);
            }
        }
    });
    Ok(())
}

/// The test mode's deliberate panic (`berth.test.panic=`).
fn test_panic(path: cmdline::PanicPath) {
    console::milestone("test-panic", &[("path", &format!("{path:?}"))]);
    match path {
        cmdline::PanicPath::Main => panic!("test panic on the main path (berth.test.panic=main)"),
        cmdline::PanicPath::Task => {
            tokio::spawn(async {
                panic!("test panic in a task (berth.test.panic=task)");
            });
        }
    }
}

fn disk_word(d: DataDiskState) -> &'static str {
    match d {
        DataDiskState::Pending => "pending",
        DataDiskState::Formatted => "formatted",
        DataDiskState::Mounted => "mounted",
        DataDiskState::Missing => "missing",
        DataDiskState::Refused => "refused",
    }
}

/// Ends the VM. Without ACPI a power-off would only halt the CPU, so the
/// agent resets instead: with `reboot=k` that goes through the i8042, which
/// both berth-vmm and QEMU (`-no-reboot`) treat as the end of the VM.
fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

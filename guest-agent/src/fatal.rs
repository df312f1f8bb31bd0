//! PID 1's safety net. If PID 1 exits the kernel panics with the disks
//! neither synced nor unmounted, so:
//!
//! * a panic anywhere in the agent (main path or any task) is fatal by
//!   policy: the hook prints it, syncs, remounts the data disk read-only
//!   (its journal is then clean), and resets the machine, which ends the
//!   VM; the host reports the crash with the console's last lines;
//! * the agent's own essential tasks (child reaper, signal watcher, vsock
//!   listeners) are supervised: one that ends is logged and restarted
//!   ([`spawn_essential`]).

use std::future::Future;
use std::time::Duration;

use nix::mount::{mount, MsFlags};

use crate::console;
use crate::datadisk;

/// Installs the panic hook. Idempotent enough for PID 1 (called once).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        console::write_line(&format!("berth-agent: fatal panic {info}"));
        emergency_stop("panic");
    }));
}

/// Flushes what can be flushed and ends the VM. Never returns.
pub fn emergency_stop(why: &str) -> ! {
    nix::unistd::sync();
    // Every other process goes first, so nothing holds the data disk open
    // for writing and it can be made read-only (a clean journal).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while crate::shutdown::others_alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ro = mount(
        None::<&str>,
        datadisk::MOUNT_POINT,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    console::write_line(&format!(
        "berth-agent: emergency-stop uptime_ms={} why={why} data_disk={}",
        console::uptime_ms(),
        if ro.is_ok() { "readonly" } else { "synced" }
    ));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs the task made by `make` for as long as the agent lives: if it
/// ever ends, that is logged and a new one is started after a pause
/// (doubling from 100 ms to 10 s, reset by a run of a minute).
pub fn spawn_essential<F, Fut>(name: &'static str, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            let run = tokio::spawn(make());
            let how = match run.await {
                Ok(()) => "returned".to_owned(),
                Err(e) => format!("failed: {e}"),
            };
            if started.elapsed() > Duration::from_secs(60) {
                pause = Duration::from_millis(100);
            }
            tracing::error!(
                "essential task {name} {how}; restarting it in {} ms",
                pause.as_millis()
            );
            console::milestone("task-restarted", &[("task", name)]);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    });
}

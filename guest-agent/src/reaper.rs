//! Child reaping for PID 1.
//!
//! Every process whose parent dies is re-parented to the agent, so the agent
//! must reap with `waitpid(-1)`. That would steal exit statuses from any
//! other waiter, so all children the agent starts go through [`Reaper::spawn`]
//! and learn their exit from it; exits of orphans are simply collected.
//!
//! Unit tests are not PID 1 and share their process with code that waits
//! for its own children, so they use a reaper that only waits for the
//! children it spawned ([`Reaper::start_own_children`]).

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Collects exit statuses and hands them to whoever spawned the child.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
    /// Wait only for the registered children instead of `waitpid(-1)`.
    own_children_only: bool,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must run before any child is spawned.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        Self::start_with(Reaper::default())
    }

    /// A reaper that leaves other children alone, for tests.
    #[cfg(test)]
    pub fn start_own_children() -> std::io::Result<Arc<Reaper>> {
        Self::start_with(Reaper {
            own_children_only: true,
            ..Reaper::default()
        })
    }

    fn start_with(reaper: Reaper) -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(reaper);
        // Fails here, at boot, if SIGCHLD cannot be watched at all.
        drop(signal(SignalKind::child())?);
        let r = reaper.clone();
        // Supervised: if this loop ever ended, every waiter on a child's
        // exit would wait forever.
        crate::fatal::spawn_essential("reaper", move || {
            let r = r.clone();
            async move {
                let Ok(mut sigchld) = signal(SignalKind::child()) else {
                    return;
                };
                loop {
                    r.reap_all();
                    if sigchld.recv().await.is_none() {
                        return;
                    }
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and returns it with a receiver for its exit. The lock is
    /// held across spawn and registration, so the child cannot be reaped
    /// before its waiter is known.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if self.own_children_only {
            let pids: Vec<i32> = waiting.keys().copied().collect();
            for pid in pids {
                if let Some((_, exit)) = reap(Pid::from_raw(pid)) {
                    if let Some(tx) = waiting.remove(&pid) {
                        let _ = tx.send(exit);
                    }
                }
            }
            return;
        }
        loop {
            let Some((pid, exit)) = reap(Pid::from_raw(-1)) else {
                return;
            };
            if let Some(tx) = waiting.remove(&pid.as_raw()) {
                let _ = tx.send(exit);
            }
        }
    }
}

/// One non-blocking `waitpid`; `None` when nothing (more) has ended.
fn reap(which: Pid) -> Option<(Pid, Exit)> {
    loop {
        return match waitpid(which, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => Some((pid, Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => Some((pid, Exit::Signal(sig as i32))),
            Ok(WaitStatus::StillAlive) | Err(_) => None,
            // Stops and continues are not ends; look again.
            Ok(_) => continue,
        };
    }
}

//! containerd and dockerd: configuration, supervision, ordered stop.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};

use crate::console;
use crate::process::{self, PATH};
use crate::reaper::{Exit, Reaper};

pub const CONTAINERD_CONFIG: &str = "/run/berth/containerd.toml";
pub const DOCKERD_CONFIG: &str = "/run/berth/daemon.json";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// containerd's configuration. The CRI plugin (Kubernetes) is disabled:
/// dockerd doesn't use it and loading it is a large part of containerd's
/// start time.
pub fn containerd_config() -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[debug]
  level = "warn"
"#
    )
}

/// dockerd's daemon.json.
pub fn dockerd_config(net: Option<&berth_proto::NetConfig>) -> serde_json::Value {
    let mut c = serde_json::json!({
        "hosts": [format!("unix://{DOCKER_SOCKET}")],
        "containerd": CONTAINERD_SOCKET,
        "data-root": "/var/lib/docker",
        "exec-root": "/run/docker",
        "storage-driver": "overlay2",
        "log-level": "info",
        // The guest has one user-facing IPv4 stack; IPv6 NAT rules would
        // only add start-up work.
        "ip6tables": false,
        "features": { "buildkit": true },
        "builder": { "gc": { "enabled": true, "defaultKeepStorage": "20GB" } },
    });
    // `--add-host x:host-gateway` names the router, which passt maps to
    // the host's loopback, as host.docker.internal does.
    if let Some(n) = net {
        c["host-gateway-ip"] = n.gateway4.to_string().into();
        // A registry on the host's loopback, reached as
        // host.docker.internal:PORT, is trusted over plain HTTP, as dockerd
        // trusts one on its own 127.0.0.0/8 (Docker Desktop users run
        // `registry:2` on localhost the same way).
        c["insecure-registries"] = serde_json::json!([format!("{}/32", n.gateway4)]);
    }
    c
}

/// Writes both daemons' configuration files.
pub fn write_configs(net: Option<&berth_proto::NetConfig>) -> std::io::Result<()> {
    std::fs::write(CONTAINERD_CONFIG, containerd_config())?;
    let json = serde_json::to_vec_pretty(&dockerd_config(net)).map_err(std::io::Error::other)?;
    std::fs::write(DOCKERD_CONFIG, json)
}

/// A program the agent keeps running.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    pub program: &'static str,
    pub args: Vec<String>,
}

pub fn containerd_spec() -> Spec {
    Spec {
        name: "containerd",
        program: "/usr/bin/containerd",
        args: vec!["--config".into(), CONTAINERD_CONFIG.into()],
    }
}

pub fn dockerd_spec() -> Spec {
    Spec {
        name: "dockerd",
        program: "/usr/sbin/dockerd",
        args: vec!["--config-file".into(), DOCKERD_CONFIG.into()],
    }
}

/// Delay before the n-th consecutive restart: 0.5 s doubling to 30 s.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << consecutive_failures.min(6));
    Duration::from_millis(ms.min(30_000))
}

/// A run this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// How long a SIGKILLed daemon's exit may take to be reported.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Whether `pid` is still a live process (not gone, not a zombie).
fn process_exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Handle to one supervised daemon.
#[derive(Debug, Clone)]
pub struct Supervised {
    pub name: &'static str,
    stop_tx: mpsc::Sender<(Duration, oneshot::Sender<()>)>,
    restarts: Arc<AtomicU32>,
}

impl Supervised {
    /// Starts `spec` and keeps it running until [`Supervised::stop`].
    pub fn start(reaper: Arc<Reaper>, spec: Spec) -> Supervised {
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let restarts = Arc::new(AtomicU32::new(0));
        tokio::spawn(supervise(reaper, spec.clone(), stop_rx, restarts.clone()));
        Supervised {
            name: spec.name,
            stop_tx,
            restarts,
        }
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once it has exited,
    /// or (bounded) once it is certainly gone.
    pub async fn stop(&self, grace: Duration) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.stop_tx.send((grace, done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(grace + KILL_WAIT * 2, done_rx).await;
        }
    }
}

async fn supervise(
    reaper: Arc<Reaper>,
    spec: Spec,
    mut stop_rx: mpsc::Receiver<(Duration, oneshot::Sender<()>)>,
    restarts: Arc<AtomicU32>,
) {
    let mut failures = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        let (pid, exited) = match spawn_logged(&reaper, &spec) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("cannot start {}: {e}", spec.name);
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => continue,
                    Some((_, done)) = stop_rx.recv() => { let _ = done.send(()); return; }
                }
            }
        };
        console::milestone(
            &format!("{}-started", spec.name),
            &[("pid", &pid.to_string())],
        );
        tokio::pin!(exited);
        tokio::select! {
            exit = &mut exited => {
                let exit = exit.unwrap_or(Exit::Signal(0));
                if started.elapsed() >= HEALTHY_RUN { failures = 0; }
                failures += 1;
                restarts.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(failures);
                tracing::warn!("{} exited ({exit}); restarting in {} ms", spec.name, delay.as_millis());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    Some((_, done)) = stop_rx.recv() => { let _ = done.send(()); return; }
                }
            }
            Some((grace, done)) = stop_rx.recv() => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let exit = match tokio::time::timeout(grace, &mut exited).await {
                    Ok(exit) => exit.ok(),
                    Err(_) => {
                        tracing::warn!("{} did not stop within {} s; killing it", spec.name, grace.as_secs());
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        // Bounded: the exit comes from the reaper, and a
                        // process the kernel has ended is gone either way.
                        match tokio::time::timeout(KILL_WAIT, &mut exited).await {
                            Ok(exit) => exit.ok(),
                            Err(_) if !process_exists(pid) => Some(Exit::Signal(9)),
                            Err(_) => {
                                tracing::error!("{} did not end after SIGKILL within {} s", spec.name, KILL_WAIT.as_secs());
                                None
                            }
                        }
                    }
                };
                let how = exit.map(|e| e.to_string()).unwrap_or_else(|| "unknown".into());
                console::milestone(&format!("{}-stopped", spec.name), &[("how", &how.replace(' ', "_"))]);
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Starts the daemon with stdout and stderr prefixed onto the console.
fn spawn_logged(reaper: &Reaper, spec: &Spec) -> std::io::Result<(i32, oneshot::Receiver<Exit>)> {
    let mut cmd = Command::new(spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exited) = reaper.spawn(&mut cmd)?;
    let pid = child.id() as i32;
    for pipe in [
        child.stdout.take().map(std::os::fd::OwnedFd::from),
        child.stderr.take().map(std::os::fd::OwnedFd::from),
    ]
    .into_iter()
    .flatten()
    {
        let prefix = format!("[{}] ", spec.name);
        match process::async_pipe(pipe) {
            Ok(reader) => {
                tokio::spawn(process::for_each_line(reader, move |line| {
                    console::write_line(&format!("{prefix}{line}"))
                }));
            }
            Err(e) => tracing::warn!("cannot read {}'s output: {e}", spec.name),
        }
    }
    Ok((pid, exited))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(1), Duration::from_millis(1000));
        assert_eq!(backoff(3), Duration::from_millis(4000));
        assert_eq!(backoff(6), Duration::from_millis(30_000));
        assert_eq!(backoff(u32::MAX), Duration::from_millis(30_000));
    }

    #[test]
    fn configs_are_well_formed() {
        let c = containerd_config();
        assert!(c.contains("io.containerd.grpc.v1.cri"));
        assert!(c.contains(CONTAINERD_SOCKET));
        let d = dockerd_config(None);
        assert_eq!(d["containerd"], CONTAINERD_SOCKET);
        assert_eq!(d["hosts"][0], "unix:///var/run/docker.sock");
        assert!(d.get("host-gateway-ip").is_none());
        let n = berth_proto::NetConfig::berth_default(false);
        assert_eq!(dockerd_config(Some(&n))["host-gateway-ip"], "192.168.127.1");
        assert_eq!(
            dockerd_config(Some(&n))["insecure-registries"][0],
            "192.168.127.1/32"
        );
    }
}

//! Starting, stopping and asking about a VM from the CLI or the app: all
//! through the host agent (spawned detached by [`start`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyper::Method;

use crate::config::{Config, ConfigError};
use crate::http::request_json;
use crate::paths::{image_dir, PathError, StateDir};
use crate::status::{Status, StopReport, VmState};

/// Errors of lifecycle operations, each with something the user can do.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Driver(#[from] crate::driver::DriverError),
    #[error(transparent)]
    Network(#[from] crate::net::passt::PasstError),
    #[error("cannot prepare {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("starting the host agent failed: {0}")]
    Spawn(std::io::Error),
    #[error("the VM failed to start: {reason}")]
    StartFailed {
        reason: String,
        console_tail: String,
    },
    #[error("the VM did not become ready within {0:?}; see `berth logs`")]
    StartTimeout(Duration),
    #[error("Berth's state directory {0} is locked by another process that does not answer; if no berth process runs, remove its lock file")]
    Locked(String),
    #[error("the host agent did not answer: {0}")]
    Api(String),
    #[error("the VM did not stop within {0:?}; run `berth stop --force`")]
    StopTimeout(Duration),
}

/// Asks the host agent for its status; `None` when no agent answers (the
/// VM is stopped).
pub async fn agent_status(state: &StateDir) -> Option<Status> {
    let (code, v) = request_json(&state.agent_sock(), Method::GET, "/status", None)
        .await
        .ok()?;
    if !code.is_success() {
        return None;
    }
    serde_json::from_value(v).ok()
}

/// The status, whether or not the VM runs.
pub async fn status(state: &StateDir) -> Result<Status, LifecycleError> {
    if let Some(s) = agent_status(state).await {
        return Ok(s);
    }
    let cfg = Config::load(&state.config())?;
    let base = Status::stopped(state, &cfg);
    // A crash is an error to show until the next start.
    let crashed = base
        .last_stop
        .as_ref()
        .filter(|r| r.how == crate::status::StopHow::Crashed)
        .map(|r| r.message.clone());
    Ok(Status {
        driver_reason: crate::driver::select(cfg.driver)
            .ok()
            .map(|s| format!("would use {}: {}", s.driver, s.reason)),
        error: last_error(state).or(crashed),
        ..base
    })
}

/// The last error line the host agent logged, if its last run failed.
fn last_error(state: &StateDir) -> Option<String> {
    let log = std::fs::read_to_string(state.host_agent_log()).ok()?;
    let last_run = log.rsplit("berth host agent starting").next()?;
    last_run.lines().rev().find_map(|l| {
        l.split_once("berth host agent: error: ")
            .map(|(_, e)| e.to_owned())
    })
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How [`start`] ended.
#[derive(Debug)]
pub enum Started {
    Now(Status),
    AlreadyRunning(Status),
}

/// Starts the VM detached and waits until Docker answers; `progress` gets
/// each phase as it begins.
pub async fn start(
    state: &StateDir,
    image_override: Option<&Path>,
    mut progress: impl FnMut(&str),
) -> Result<Started, LifecycleError> {
    state.create().map_err(|source| LifecycleError::StateDir {
        path: state.root.display().to_string(),
        source,
    })?;
    let cfg = Config::load(&state.config())?;
    if !state.config().exists() {
        cfg.save(&state.config())?;
    }
    if let Some(s) = agent_status(state).await {
        if s.state == VmState::Running {
            return Ok(Started::AlreadyRunning(s));
        }
        progress("another start is under way; waiting for it");
    } else {
        match crate::hostagent::try_lock(state) {
            Ok(Some(lock)) => drop(lock),
            Ok(None) => {
                // An agent that holds the lock but has no socket yet is
                // just starting; give it a moment.
                tokio::time::sleep(Duration::from_secs(2)).await;
                if agent_status(state).await.is_none() {
                    return Err(LifecycleError::Locked(state.lock().display().to_string()));
                }
            }
            Err(e) => return Err(LifecycleError::Api(format!("{e:#}"))),
        }
    }
    // Refuse what cannot work before anything starts.
    crate::driver::select(cfg.driver)?;
    crate::net::passt::find()?;
    let image = image_dir(image_override)?;
    crate::driver::Image::load(&image)?;
    let mut child = spawn_host_agent(state, &image)?;

    let limit = crate::hostagent::BOOT_LIMIT;
    let t0 = Instant::now();
    let mut last_phase = String::new();
    loop {
        if let Some(s) = agent_status(state).await {
            if s.phase != last_phase {
                last_phase = s.phase.clone();
                progress(&s.phase);
            }
            if s.state == VmState::Running {
                return Ok(Started::Now(s));
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Err(LifecycleError::StartFailed {
                reason: last_error(state)
                    .unwrap_or_else(|| "the host agent exited; see host-agent.log".into()),
                console_tail: tail(&state.console_log(), 25),
            });
        }
        if t0.elapsed() > limit {
            return Err(LifecycleError::StartTimeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn spawn_host_agent(state: &StateDir, image: &Path) -> Result<std::process::Child, LifecycleError> {
    let exe = agent_exe()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.host_agent_log())
        .map_err(LifecycleError::Spawn)?;
    let log2 = log.try_clone().map_err(LifecycleError::Spawn)?;
    std::process::Command::new(exe)
        .arg("host-agent")
        .arg("--state-dir")
        .arg(&state.root)
        .arg("--image-dir")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(LifecycleError::Spawn)
}

/// The `berth` binary that runs the host agent: this one, or (for the
/// desktop app) the `berth` installed beside it, so that the agent never
/// depends on the app staying open.
fn agent_exe() -> Result<PathBuf, LifecycleError> {
    let me = std::env::current_exe().map_err(LifecycleError::Spawn)?;
    let name = format!("berth{}", std::env::consts::EXE_SUFFIX);
    if me.file_name().is_some_and(|n| n == name.as_str()) {
        return Ok(me);
    }
    let beside = me.with_file_name(&name);
    if beside.is_file() {
        return Ok(beside);
    }
    Err(LifecycleError::Spawn(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!(
            "the berth command is missing from {}; reinstall Berth",
            me.parent()
                .map_or_else(String::new, |p| p.display().to_string())
        ),
    )))
}

/// How [`stop`] ended.
#[derive(Debug)]
pub enum Stopped {
    NotRunning,
    /// Stopped now; how, as the host agent recorded it.
    Now(Option<StopReport>),
}

/// Stops the VM: orderly shutdown; with `force`, killed if it takes longer
/// than `force_after`.
pub async fn stop(
    state: &StateDir,
    force: bool,
    force_after: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Stopped, LifecycleError> {
    let Some(s) = agent_status(state).await else {
        return Ok(Stopped::NotRunning);
    };
    let pid = s.host_agent_pid;
    let before = StopReport::load(state).map(|r| r.at_unix);
    post(state, "/stop").await?;
    progress("stopping: containers, then power off");
    let graceful_limit = crate::hostagent::STOP_TIMEOUT + Duration::from_secs(15);
    let t0 = Instant::now();
    let mut killed = false;
    loop {
        let alive = pid.is_some_and(process_alive) || agent_status(state).await.is_some();
        if !alive {
            // The report this stop wrote (not an older one).
            let report = StopReport::load(state).filter(|r| Some(r.at_unix) != before);
            return Ok(Stopped::Now(report));
        }
        if force && !killed && t0.elapsed() > force_after {
            progress("the guest did not stop in time; killing the VM");
            let _ = post(state, "/kill").await;
            killed = true;
        }
        if t0.elapsed() > graceful_limit {
            return Err(LifecycleError::StopTimeout(graceful_limit));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn post(state: &StateDir, path: &str) -> Result<(), LifecycleError> {
    match request_json(&state.agent_sock(), Method::POST, path, None).await {
        Ok((code, _)) if code.is_success() => Ok(()),
        Ok((code, v)) => Err(LifecycleError::Api(format!("{path}: {code} {v}"))),
        Err(e) => Err(LifecycleError::Api(e.to_string())),
    }
}

fn process_alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie still counts until reaped, so
    // also look at its state.
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The image directory a running or next VM uses (for messages).
pub fn resolve_image(image_override: Option<&Path>) -> Result<PathBuf, LifecycleError> {
    Ok(image_dir(image_override)?)
}

/// What a settings change did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, ts_rs::TS)]
pub struct ConfigChange {
    pub key: String,
    pub value: String,
    /// The VM runs and the change takes effect only after a restart.
    pub restart_needed: bool,
    /// For people: what was set and when it takes effect.
    pub message: String,
}

/// Validates and saves one setting (the rules of `berth config set`), and
/// says whether a restart is needed for it.
pub async fn set_config(
    state: &StateDir,
    key: &str,
    value: &str,
) -> Result<ConfigChange, LifecycleError> {
    let mut cfg = Config::load(&state.config())?;
    let disk = std::fs::metadata(state.data_disk())
        .ok()
        .map(|m| m.len() >> 30);
    let applies = cfg.set(key, value, disk)?;
    state.create().map_err(|source| LifecycleError::StateDir {
        path: state.root.display().to_string(),
        source,
    })?;
    cfg.save(&state.config())?;
    let running = agent_status(state).await.is_some();
    let restart_needed = applies == crate::config::Applies::NextStart && running;
    let message = if restart_needed {
        format!("{key} = {value}; Berth is running: this takes effect after `berth restart`.")
    } else {
        format!("{key} = {value}")
    };
    Ok(ConfigChange {
        key: key.to_owned(),
        value: value.to_owned(),
        restart_needed,
        message,
    })
}

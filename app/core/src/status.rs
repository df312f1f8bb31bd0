//! What the host agent reports about its VM (`GET /status` on `agent.sock`,
//! and `berth status --json`).

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::paths::StateDir;

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Stopping,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
        })
    }
}

/// A status snapshot. Fields that only make sense while the VM runs are
/// `null` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: VmState,
    /// What is happening now, for people ("booting the guest", …).
    pub phase: String,
    /// `vmm`, `qemu-kvm` or `qemu-tcg`.
    pub driver: Option<String>,
    /// Why that driver was picked.
    pub driver_reason: Option<String>,
    /// The VM process (QEMU or berth-vmm).
    pub pid: Option<u32>,
    pub host_agent_pid: Option<u32>,
    pub uptime_s: Option<u64>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub docker_socket: String,
    pub docker_version: Option<String>,
    /// Driver start to Docker answering `/_ping`, host wall clock.
    pub boot_ms: Option<u64>,
    /// The docker CLI's current context (filled in by the CLI).
    #[serde(default)]
    pub docker_context: Option<String>,
    pub state_dir: String,
    /// Why the VM failed or stopped unexpectedly.
    pub error: Option<String>,
}

impl Status {
    /// A stopped VM with these settings: the base every status starts from.
    pub fn stopped(state: &StateDir, cfg: &Config) -> Status {
        Status {
            state: VmState::Stopped,
            phase: "stopped".into(),
            driver: None,
            driver_reason: None,
            pid: None,
            host_agent_pid: None,
            uptime_s: None,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            disk_gib: cfg.disk_gib,
            docker_socket: state.docker_sock().display().to_string(),
            docker_version: None,
            boot_ms: None,
            docker_context: None,
            state_dir: state.root.display().to_string(),
            error: None,
        }
    }
}

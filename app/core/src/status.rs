//! What the host agent reports about its VM (`GET /status` on `agent.sock`,
//! and `berth status --json`).

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::paths::StateDir;

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ts_rs::TS)]
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
    /// Something the user should know while the VM runs (e.g. the host
    /// disk is full and the VM waits for space).
    #[serde(default)]
    pub warning: Option<String>,
    /// How the VM last stopped (from `last-stop.json`).
    #[serde(default)]
    pub last_stop: Option<StopReport>,
    /// The guest's network while the VM runs.
    #[serde(default)]
    pub network: Option<NetworkStatus>,
    /// Ports the containers publish, forwarded from the host.
    #[serde(default)]
    pub forwards: Vec<crate::net::ports::ForwardStatus>,
    /// Host folders shared into the running VM (virtio-fs).
    #[serde(default)]
    pub shares: Vec<ShareStatus>,
    /// The guest clock's last check and correction, while the VM runs.
    #[serde(default)]
    pub clock: Option<crate::hostagent::clock::ClockStatus>,
    /// What the VM takes from the host: memory, disk.
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// What the VM takes from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
pub struct Resources {
    /// Resident memory of the VM process on the host (QEMU or berth-vmm),
    /// while it runs.
    pub vm_rss_bytes: Option<u64>,
    /// Memory the guest reported free and the VM gave back, since it
    /// started: counted by berth-vmm's balloon. QEMU keeps no such count
    /// (`null`); its effect shows in `vm_rss_bytes`.
    pub balloon_reported_bytes: Option<u64>,
    /// The data disk file: bytes the host has allocated for it (what `du`
    /// shows) and its apparent size (what `ls` shows).
    pub data_disk_allocated_bytes: Option<u64>,
    pub data_disk_apparent_bytes: Option<u64>,
}

/// One shared folder as `berth status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
pub struct ShareStatus {
    pub path: String,
    pub read_only: bool,
    /// Why it is not shared (the folder is missing), if it is not.
    pub error: Option<String>,
}

/// The guest's network as `berth status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct NetworkStatus {
    /// The guest's address.
    pub guest_ip: String,
    /// What `host.docker.internal` names: the host's loopback, from the guest.
    pub host_ip: String,
    pub ipv6: bool,
    /// The passt process that carries the guest's traffic.
    pub passt: Option<crate::net::passt::PasstStatus>,
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "snake_case")]
pub enum StopHow {
    /// The guest shut down in order and powered off.
    Clean,
    /// The VM process was killed: on request, or because the guest did
    /// not power off within the shutdown budget or could not be reached.
    Forced,
    /// The VM process ended without being asked to.
    Crashed,
}

/// What the host agent records when the VM stops (`last-stop.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct StopReport {
    pub how: StopHow,
    /// A sentence for people: what happened, and what it means.
    pub message: String,
    /// Seconds from the stop request (or the crash) to the VM's end.
    pub seconds: f64,
    /// Unix time of the stop.
    pub at_unix: u64,
}

impl StopReport {
    pub fn new(how: StopHow, message: String, seconds: f64) -> StopReport {
        let at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        StopReport {
            how,
            message,
            seconds,
            at_unix,
        }
    }

    /// Reads `last-stop.json`, if any.
    pub fn load(state: &StateDir) -> Option<StopReport> {
        let text = std::fs::read_to_string(state.last_stop()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes `last-stop.json` (atomically).
    pub fn save(&self, state: &StateDir) -> std::io::Result<()> {
        let tmp = state.root.join("last-stop.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
        std::fs::rename(tmp, state.last_stop())
    }
}

impl Resources {
    /// Reads the figures now: the VM process `vm_pid`'s resident memory,
    /// the data disk's sizes, and the balloon's count if there is one.
    pub fn measure(state: &StateDir, vm_pid: Option<u32>, balloon: Option<u64>) -> Resources {
        use std::os::unix::fs::MetadataExt;
        let disk = std::fs::metadata(state.data_disk()).ok();
        Resources {
            vm_rss_bytes: vm_pid.and_then(rss_bytes),
            balloon_reported_bytes: balloon,
            data_disk_allocated_bytes: disk.as_ref().map(|m| m.blocks() * 512),
            data_disk_apparent_bytes: disk.as_ref().map(|m| m.len()),
        }
    }
}

/// Resident memory of process `pid`, where the platform says.
#[cfg(target_os = "linux")]
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// macOS (`proc_pid_rusage`'s footprint) and Windows (the working set)
/// are not read yet.
#[cfg(not(target_os = "linux"))]
pub fn rss_bytes(_pid: u32) -> Option<u64> {
    None
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
            warning: None,
            last_stop: StopReport::load(state),
            network: None,
            forwards: Vec::new(),
            shares: Vec::new(),
            clock: None,
            resources: Some(Resources::measure(state, None, None)),
        }
    }
}

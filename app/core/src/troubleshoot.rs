//! What the Troubleshoot view (and a bug report) needs: the guest
//! console's log, the VM's memory and disk use, a diagnostics bundle, and
//! a reset to defaults.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use ts_rs::TS;

use crate::config::Config;
use crate::lifecycle::{self, LifecycleError};
use crate::paths::StateDir;

/// At most this much of a log's end is read for the UI and the bundle.
pub const LOG_TAIL_BYTES: u64 = 512 << 10;
/// Usage from the guest takes at most this long.
const USAGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TroubleError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the engine is not running: start it first")]
    NotRunning,
    #[error("the guest did not answer: {0}")]
    Guest(String),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl TroubleError {
    pub fn code(&self) -> &'static str {
        match self {
            TroubleError::Io { .. } => "io",
            TroubleError::NotRunning => "engine_stopped",
            TroubleError::Guest(_) => "guest",
            TroubleError::Lifecycle(_) => "lifecycle",
            TroubleError::Config(_) => "config",
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TroubleError {
    let what = what.into();
    move |source| TroubleError::Io { what, source }
}

/// The last `max` bytes of a file, from a line start, as text ("" when the
/// file does not exist).
pub fn tail_bytes(path: &Path, max: u64) -> Result<String, TroubleError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let len = f.metadata().map_err(io("stat"))?.len();
    let from = len.saturating_sub(max);
    f.seek(SeekFrom::Start(from)).map_err(io("seek"))?;
    let mut buf = Vec::with_capacity((len - from) as usize);
    f.take(max).read_to_end(&mut buf).map_err(io("read"))?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if from > 0 {
        if let Some(i) = text.find('\n') {
            text.drain(..=i);
        }
    }
    Ok(text)
}

/// The guest console's log (the current or last run), its end.
pub fn console_log(state: &StateDir) -> Result<String, TroubleError> {
    tail_bytes(&state.console_log(), LOG_TAIL_BYTES)
}

/// Memory and disk use inside the VM.
#[derive(Debug, Clone, PartialEq, Default, Serialize, TS)]
pub struct EngineUsage {
    pub mem_total: f64,
    /// What the guest could give programs now (MemAvailable).
    pub mem_available: f64,
    /// The data disk's filesystem (Docker's images, containers, volumes).
    pub disk_total: f64,
    pub disk_used: f64,
    /// Docker's own account, when it answered.
    pub docker: Option<crate::docker::images::DiskUse>,
}

/// Reads `/proc/meminfo` and `df -P -B1` output.
pub fn parse_usage(text: &str) -> EngineUsage {
    let mut u = EngineUsage::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("MemTotal:") => {
                u.mem_total = f.next().and_then(|v| v.parse().ok()).unwrap_or(0.0) * 1024.0
            }
            Some("MemAvailable:") => {
                u.mem_available = f.next().and_then(|v| v.parse().ok()).unwrap_or(0.0) * 1024.0
            }
            Some(dev) if dev.starts_with('/') => {
                let n: Vec<f64> = f.take(3).filter_map(|v| v.parse().ok()).collect();
                if let [total, used, _avail] = n[..] {
                    u.disk_total = total;
                    u.disk_used = used;
                }
            }
            _ => {}
        }
    }
    u
}

/// Asks the guest for its memory and the data disk's use.
pub async fn engine_usage(state: &StateDir) -> Result<EngineUsage, TroubleError> {
    if lifecycle::agent_status(state).await.is_none() {
        return Err(TroubleError::NotRunning);
    }
    let argv = ["sh", "-c", "cat /proc/meminfo; df -P -B1 /var/lib/docker"]
        .map(String::from)
        .to_vec();
    let out = tokio::time::timeout(
        USAGE_TIMEOUT,
        crate::shell::capture(&state.vsock_sock(), argv, 64 << 10),
    )
    .await
    .map_err(|_| TroubleError::Guest("no answer within 10 s".into()))?
    .map_err(|e| TroubleError::Guest(e.to_string()))?;
    let mut u = parse_usage(&String::from_utf8_lossy(&out.stdout));
    u.docker = crate::docker::images::disk_use(&state.docker_sock())
        .await
        .ok();
    Ok(u)
}

/// What a diagnostics bundle holds.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct Bundle {
    pub path: String,
    pub files: Vec<String>,
    pub bytes: f64,
}

/// Writes a `.tar.gz` for a bug report: versions, the configuration,
/// `berth status --json`, the ends of the console's and host agent's logs
/// and the last stop's report. No secrets: Berth keeps none; container
/// environments and registry credentials are not read.
pub async fn write_bundle(state: &StateDir, out: &Path) -> Result<Bundle, TroubleError> {
    let status = lifecycle::status(state).await?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let uname = nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {} {}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            )
        })
        .unwrap_or_default();
    files.push((
        "versions.txt".into(),
        format!(
            "berth {}\nhost {uname}\ndocker engine {}\ndriver {}\n",
            env!("CARGO_PKG_VERSION"),
            status.docker_version.as_deref().unwrap_or("(not running)"),
            status.driver.as_deref().unwrap_or("-"),
        )
        .into_bytes(),
    ));
    files.push((
        "status.json".into(),
        serde_json::to_vec_pretty(&status).unwrap_or_default(),
    ));
    let cfg = Config::load(&state.config())?;
    files.push((
        "config.toml".into(),
        toml::to_string_pretty(&cfg)
            .unwrap_or_default()
            .into_bytes(),
    ));
    for (name, path) in [
        ("console.log", state.console_log()),
        ("host-agent.log", state.host_agent_log()),
        ("last-stop.json", state.last_stop()),
    ] {
        let text = tail_bytes(&path, LOG_TAIL_BYTES)?;
        if !text.is_empty() {
            files.push((name.into(), text.into_bytes()));
        }
    }
    let out_owned: PathBuf = out.to_owned();
    let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    tokio::task::spawn_blocking(move || -> Result<(), TroubleError> {
        let tmp = out_owned.with_extension("partial");
        let f = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (name, data) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(now);
            h.set_cksum();
            tar.append_data(&mut h, format!("berth-diagnostics/{name}"), data.as_slice())
                .map_err(io("writing the bundle"))?;
        }
        let mut f = tar
            .into_inner()
            .and_then(|gz| gz.finish())
            .map_err(io("writing the bundle"))?;
        f.flush().map_err(io("writing the bundle"))?;
        f.sync_all().map_err(io("writing the bundle"))?;
        std::fs::rename(&tmp, &out_owned).map_err(io(format!("saving {}", out_owned.display())))
    })
    .await
    .map_err(|e| TroubleError::Guest(e.to_string()))??;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0) as f64;
    Ok(Bundle {
        path: out.display().to_string(),
        files: names,
        bytes,
    })
}

/// What a reset would destroy, for the confirmation to name.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct ResetPreview {
    pub data_disk: String,
    /// Bytes the data disk takes on the host (allocated, not apparent).
    pub data_disk_bytes: f64,
    /// Counts, when the engine runs and answered.
    pub containers: Option<u32>,
    pub images: Option<u32>,
    pub volumes: Option<u32>,
}

pub async fn reset_preview(state: &StateDir) -> ResetPreview {
    use std::os::unix::fs::MetadataExt;
    let disk = state.data_disk();
    let data_disk_bytes = std::fs::metadata(&disk).map_or(0, |m| m.blocks() * 512) as f64;
    let mut p = ResetPreview {
        data_disk: disk.display().to_string(),
        data_disk_bytes,
        containers: None,
        images: None,
        volumes: None,
    };
    if lifecycle::agent_status(state).await.is_some() {
        if let Ok(d) = crate::docker::connect(state).await {
            use bollard::query_parameters::{ListContainersOptionsBuilder, ListImagesOptions};
            let all = ListContainersOptionsBuilder::default().all(true).build();
            p.containers = d
                .list_containers(Some(all))
                .await
                .ok()
                .map(|v| v.len() as u32);
            p.images = d
                .list_images(None::<ListImagesOptions>)
                .await
                .ok()
                .map(|v| v.len() as u32);
            p.volumes = d
                .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
                .await
                .ok()
                .map(|v| v.volumes.map_or(0, |v| v.len() as u32));
        }
    }
    p
}

/// Stops the engine, puts the settings back to their defaults and, when
/// `wipe_data`, deletes the data disk (every image, container and volume).
/// The next start makes a fresh disk.
pub async fn reset(
    state: &StateDir,
    wipe_data: bool,
    progress: impl FnMut(&str),
) -> Result<Vec<String>, TroubleError> {
    let mut done = Vec::new();
    lifecycle::stop(state, true, Duration::from_secs(30), progress).await?;
    done.push("engine stopped".to_owned());
    Config::default().save(&state.config())?;
    done.push("settings back to their defaults".to_owned());
    if wipe_data {
        for p in [state.data_disk(), state.data_disk_fresh()] {
            match std::fs::remove_file(&p) {
                Ok(()) => done.push(format!("deleted {}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("deleting {}", p.display()))(e)),
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_meminfo_and_df() {
        let text = "MemTotal:        4018292 kB\nMemFree:  1 kB\nMemAvailable:    3500000 kB\n\
                    Filesystem 1-blocks Used Available Capacity Mounted on\n\
                    /dev/vdb 63278391296 1234567 60000000000 1% /var/lib/docker\n";
        let u = parse_usage(text);
        assert_eq!(u.mem_total, 4018292.0 * 1024.0);
        assert_eq!(u.mem_available, 3500000.0 * 1024.0);
        assert_eq!((u.disk_total, u.disk_used), (63278391296.0, 1234567.0));
    }

    #[test]
    fn tails_start_at_a_line_and_are_bounded() {
        let dir = std::env::temp_dir().join(format!("berth-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        let t = tail_bytes(&p, 100).unwrap();
        assert!(t.len() <= 100);
        assert!(t.starts_with("line "), "{t:?}");
        assert!(t.ends_with("line 999\n"));
        assert_eq!(tail_bytes(&p, 1 << 20).unwrap(), text);
        assert_eq!(tail_bytes(&dir.join("none"), 10).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

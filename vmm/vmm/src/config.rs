//! `berth-vmm run` settings, validated before anything starts.

use std::path::PathBuf;

use crate::x86_64::mptable;

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// Read-only root disk (`/dev/vda`).
    pub rootfs: Option<PathBuf>,
    /// Read-write data disk (`/dev/vdb`).
    pub data_disk: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub console_log: Option<PathBuf>,
    /// The console log is rotated when it reaches this many bytes.
    pub console_log_max: u64,
    pub console_stdout: bool,
    /// The kernel command line (berth-vmm adds its virtio_mmio.device words).
    pub cmdline: String,
    pub api_socket: Option<PathBuf>,
    /// Host side of the vsock device (Firecracker's convention), if any.
    pub vsock_uds: Option<PathBuf>,
    pub guest_cid: u64,
    /// Most host connections the vsock device holds at once (sized from
    /// the process's open-file limit).
    pub vsock_max_conns: usize,
    /// A virtio-net device, its frames to the peer on this socket.
    pub net_socket: Option<PathBuf>,
    /// virtio-fs devices, one per shared folder.
    pub shares: Vec<ShareConfig>,
    /// Run even if the hypervisor probe says a stock Linux can't (tests on
    /// kvm_pvm with a kernel made for it).
    pub ignore_probe: bool,
}

/// One shared folder for a virtio-fs device.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub tag: String,
    pub dir: PathBuf,
    pub opts: berth_devices::virtio::fs::ShareOptions,
}

/// Parses `--share TAG=PATH[:ro]`.
pub fn parse_share(
    arg: &str,
    opts: impl Fn(bool) -> berth_devices::virtio::fs::ShareOptions,
) -> Result<ShareConfig, ConfigError> {
    let bad = |why: &str| ConfigError::Share {
        arg: arg.to_owned(),
        why: why.to_owned(),
    };
    let (tag, rest) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected TAG=PATH"))?;
    berth_devices::virtio::fs::check_tag(tag).map_err(|e| bad(&e.to_string()))?;
    let (path, read_only) = match rest.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (rest, false),
    };
    let dir = PathBuf::from(path);
    if !dir.is_dir() {
        return Err(bad("the folder does not exist"));
    }
    Ok(ShareConfig {
        tag: tag.to_owned(),
        dir,
        opts: opts(read_only),
    })
}

/// A setting that can't work, said so that a user can fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: String },
    #[error("{what} {path} is not readable: {why}")]
    Unreadable {
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("--share {arg}: {why}")]
    Share { arg: String, why: String },
    #[error("--cpus must be between 1 and {max}, not {got}")]
    Cpus { got: u8, max: u8 },
    #[error("--memory must be between 128 MiB and {max} MiB (the host's memory), not {got} MiB")]
    Memory { got: u64, max: u64 },
}

fn check_file(what: &'static str, path: &PathBuf, write: bool) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(ConfigError::Missing { what, path: shown });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map(|_| ())
        .map_err(|e| ConfigError::Unreadable {
            what,
            path: shown,
            why: e.to_string(),
        })
}

/// The host's memory in MiB (unbounded where /proc/meminfo is unreadable).
pub fn host_memory_mib() -> u64 {
    berth_hypervisor::host_memory_mib().unwrap_or(u64::MAX)
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("kernel", &self.kernel, false)?;
        if let Some(r) = &self.rootfs {
            check_file("root disk", r, false)?;
        }
        if let Some(d) = &self.data_disk {
            check_file("data disk", d, true)?;
        }
        let max = mptable::max_cpus().min(32);
        if self.cpus == 0 || self.cpus > max {
            return Err(ConfigError::Cpus {
                got: self.cpus,
                max,
            });
        }
        let host = host_memory_mib();
        if self.memory_mib < 128 || self.memory_mib > host {
            return Err(ConfigError::Memory {
                got: self.memory_mib,
                max: host,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "/proc/self/exe".into(),
            rootfs: None,
            data_disk: None,
            cpus: 1,
            memory_mib: 256,
            console_log: None,
            console_log_max: 1 << 20,
            console_stdout: false,
            cmdline: String::new(),
            api_socket: None,
            vsock_uds: None,
            guest_cid: 3,
            vsock_max_conns: 16,
            net_socket: None,
            shares: Vec::new(),
            ignore_probe: false,
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(cfg().validate(), Ok(()));
        let mut c = cfg();
        c.kernel = "/nonexistent/vmlinux".into();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Missing { what: "kernel", .. })
        ));
        let mut c = cfg();
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus { .. })));
        let mut c = cfg();
        c.memory_mib = 1 << 40;
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("host's memory"), "{e}");
    }
}

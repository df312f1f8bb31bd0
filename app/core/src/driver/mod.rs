//! Machine drivers: the process that runs the guest, behind one interface.
//!
//! * `vmm` — our `berth-vmm` on the host's hypervisor;
//! * `qemu` — `qemu-system-x86_64 -M microvm` with our vsock backend over
//!   vhost-user (`berth-vmm vhost-user vsock`), KVM when usable, else TCG.
//!
//! Both expose the guest's vsock as `vsock.sock` in the state directory and
//! write the console to `console.log`, so everything above them is the same.

mod qemu;
pub mod vmm;

pub use qemu::{accel_args, guest_has_rdrand, kernel_options};

use std::fmt;

use berth_hypervisor::Hypervisor;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::paths::{helper_binary, PathError, StateDir};

/// What the user asked for (`driver` in config.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ts_rs::TS)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    #[default]
    Auto,
    Vmm,
    Qemu,
}

impl fmt::Display for DriverChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverChoice::Auto => "auto",
            DriverChoice::Vmm => "vmm",
            DriverChoice::Qemu => "qemu",
        })
    }
}

impl FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DriverChoice::Auto),
            "vmm" => Ok(DriverChoice::Vmm),
            "qemu" => Ok(DriverChoice::Qemu),
            other => Err(format!("{other:?} is not one of auto, vmm, qemu")),
        }
    }
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The driver that will run the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "accel")]
pub enum Driver {
    Vmm,
    Qemu(Accel),
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Vmm => "vmm",
            Driver::Qemu(Accel::Kvm) => "qemu-kvm",
            Driver::Qemu(Accel::Tcg) => "qemu-tcg",
        })
    }
}

/// A driver and why it was picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub driver: Driver,
    pub reason: String,
}

/// Errors choosing or starting a driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("driver vmm cannot run here: {0}. Use `berth config set driver auto` to run the VM under QEMU instead")]
    VmmUnusable(String),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("qemu-system-x86_64 was not found; install it (Debian: apt-get install qemu-system-x86) or use driver vmm")]
    NoQemu,
    #[error("starting {what} failed: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Startup(String),
    #[error("the guest image is unreadable: {0}")]
    Image(String),
}

/// What the hypervisor probe said.
fn probe() -> (bool, String) {
    match berth_hypervisor::Platform::new() {
        Ok(h) => {
            let p = h.probe();
            (p.can_run_linux, p.reason)
        }
        Err(e) => (
            false,
            format!("{e} (check that /dev/kvm exists and that you may open it: add yourself to the kvm group)"),
        ),
    }
}

/// Picks the driver for `choice` on this host.
pub fn select(choice: DriverChoice) -> Result<Selection, DriverError> {
    let (can_run, why) = probe();
    let have_vmm = helper_binary("berth-vmm", "BERTH_VMM").is_ok();
    match choice {
        DriverChoice::Vmm if can_run => Ok(Selection {
            driver: Driver::Vmm,
            reason: format!("asked for in config; probe: {why}"),
        }),
        DriverChoice::Vmm => Err(DriverError::VmmUnusable(why)),
        DriverChoice::Auto if can_run && have_vmm => Ok(Selection {
            driver: Driver::Vmm,
            reason: format!("the hypervisor can run Linux: {why}"),
        }),
        DriverChoice::Auto | DriverChoice::Qemu => {
            let accel = if can_run { Accel::Kvm } else { Accel::Tcg };
            let asked = if choice == DriverChoice::Qemu {
                "asked for in config"
            } else {
                "berth-vmm can't run here"
            };
            let reason = match accel {
                Accel::Kvm => format!("{asked}; KVM is usable"),
                Accel::Tcg => format!(
                    "{asked}; no hypervisor that can run Linux ({why}), so QEMU emulates the CPU (TCG, slow)"
                ),
            };
            Ok(Selection {
                driver: Driver::Qemu(accel),
                reason,
            })
        }
    }
}

/// The guest image's files and default command line (`manifest.json`).
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub cmdline: String,
    pub dockerd_version: String,
}

impl Image {
    pub fn load(dir: &Path) -> Result<Image, DriverError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| DriverError::Image(format!("{}: {e}", path.display())))?;
        let m: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DriverError::Image(format!("{}: {e}", path.display())))?;
        let field = |v: Option<&str>, what: &str| {
            v.map(str::to_owned)
                .ok_or_else(|| DriverError::Image(format!("{} has no {what}", path.display())))
        };
        let rootfs = dir.join(field(m["rootfs"]["file"].as_str(), "rootfs.file")?);
        let img = Image {
            kernel: dir.join("vmlinux"),
            rootfs,
            cmdline: field(m["cmdline"].as_str(), "cmdline")?,
            dockerd_version: m["versions"]["dockerd"].as_str().unwrap_or("").to_owned(),
        };
        for f in [&img.kernel, &img.rootfs] {
            if !f.is_file() {
                return Err(DriverError::Image(format!("{} is missing", f.display())));
            }
        }
        Ok(img)
    }
}

/// Everything a driver needs to boot the VM.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub image: Image,
    pub state: StateDir,
    pub cpus: u8,
    pub memory_mib: u64,
    pub cmdline_extra: String,
    /// The host created the data disk and it was not formatted yet: the
    /// guest may format it if blank (and only then).
    pub fresh_disk: bool,
    /// Size at which the console log is rotated.
    pub console_log_max: u64,
    /// The guest's network; its device listens on the state directory's
    /// `net.sock` for passt. `None`: no network device.
    pub net: Option<berth_proto::NetConfig>,
    /// Host folders shared into the guest (virtio-fs), each mounted at the
    /// same path; tags are `share0`, `share1`, … in this order.
    pub shares: Vec<berth_proto::share::ShareSpec>,
}

impl MachineSpec {
    pub fn cmdline(&self) -> String {
        let fresh = if self.fresh_disk {
            " berth.data_fresh=1"
        } else {
            ""
        };
        let net = self
            .net
            .as_ref()
            .map(|n| format!(" {}", n.cmdline_words()))
            .unwrap_or_default();
        let shares: String = self
            .shares
            .iter()
            .map(|s| format!(" {}", s.cmdline_word()))
            .collect();
        format!(
            "{}{fresh}{net}{shares} {}",
            self.image.cmdline, self.cmdline_extra
        )
        .trim()
        .to_owned()
    }
}

/// A running VM: its main process and helper processes.
#[derive(Debug)]
pub struct Machine {
    pub driver: Driver,
    main: tokio::process::Child,
    helpers: Vec<tokio::process::Child>,
}

impl Machine {
    /// Starts the VM with `driver`. Helper processes are started first; if
    /// anything fails, whatever was started is killed.
    pub async fn launch(driver: Driver, spec: &MachineSpec) -> Result<Machine, DriverError> {
        match driver {
            Driver::Vmm => vmm::launch(spec).await,
            Driver::Qemu(accel) => qemu::launch(spec, accel).await,
        }
    }

    /// The process that runs the guest (QEMU or berth-vmm).
    pub fn pid(&self) -> Option<u32> {
        self.main.id()
    }

    /// Every process of this VM: the VM process first, then the helpers.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.main)
            .chain(&self.helpers)
            .filter_map(|c| c.id())
            .collect()
    }

    /// Waits until the VM process exits.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.main.wait().await
    }

    /// Kills the VM process (the guest gets no say) and the helpers.
    pub async fn kill(&mut self) {
        let _ = self.main.kill().await;
        self.stop_helpers().await;
    }

    /// Ends helper processes once the VM process is gone.
    pub async fn stop_helpers(&mut self) {
        for h in &mut self.helpers {
            if let Some(pid) = h.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(3), h.wait())
                .await
                .is_err()
            {
                let _ = h.kill().await;
            }
        }
    }
}

/// A child's stdout or stderr: the host agent's own, which go to
/// `host-agent.log` through its capped, rotated log pipe.
fn log_stdio() -> std::process::Stdio {
    std::process::Stdio::inherit()
}

/// Waits for a helper to create its socket, or fails with its exit.
async fn wait_for_socket(
    child: &mut tokio::process::Child,
    path: &Path,
    what: &str,
) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(DriverError::Startup(format!(
                "{what} exited ({st}) before creating {}",
                path.display()
            )));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(DriverError::Startup(format!(
                "{what} did not create {} within 10 s",
                path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for c in [DriverChoice::Auto, DriverChoice::Vmm, DriverChoice::Qemu] {
            assert_eq!(c.to_string().parse::<DriverChoice>().unwrap(), c);
        }
        assert!("xen".parse::<DriverChoice>().is_err());
    }

    /// On this project's machines (/dev/kvm is kvm_pvm) auto must pick
    /// QEMU with TCG and say why; elsewhere it must pick something runnable.
    #[test]
    fn auto_follows_the_probe() {
        let (can_run, _) = probe();
        let s = select(DriverChoice::Auto).unwrap();
        if can_run {
            assert_ne!(s.driver, Driver::Qemu(Accel::Tcg));
        } else {
            assert_eq!(s.driver, Driver::Qemu(Accel::Tcg), "{s:?}");
            assert!(s.reason.contains("TCG"), "{}", s.reason);
            assert!(matches!(
                select(DriverChoice::Vmm),
                Err(DriverError::VmmUnusable(_))
            ));
        }
    }
}

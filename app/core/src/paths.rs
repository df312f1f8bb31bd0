//! Where Berth keeps things: the per-VM state directory, the guest image,
//! and the helper binaries.
//!
//! State directory (mode 0700), one per VM — see `docs/state-dir.md`:
//!
//! | file | what |
//! |---|---|
//! | `config.toml` | the VM's settings ([`crate::config::Config`]) |
//! | `data.img` | sparse raw disk, ext4 inside, Docker's state and volumes |
//! | `console.log` | the guest console of the current (or last) boot |
//! | `host-agent.log` | the host agent's own log |
//! | `lock` | held (flock) by the host agent while the VM lives |
//! | `vm.pids` | the driver's processes, so a host agent can end what a killed one left |
//! | `agent.sock` | the host agent's control API |
//! | `docker.sock` | the forwarded Docker API (mode 0600) |
//! | `vsock.sock` | host side of the guest's vsock device |
//! | `vmm.sock` | berth-vmm's own API (driver `vmm`) |
//! | `vhost-vsock.sock` | vhost-user socket between QEMU and our vsock backend (driver `qemu`) |
//! | `vhost-fs<N>.sock` | vhost-user socket between QEMU and shared folder N's backend (driver `qemu`) |
//! | `qemu.monitor`, `qmp.sock` | QEMU's monitor and its QMP socket (driver `qemu`) |
//! | `console.sock` | QEMU writes the guest console here; the host agent writes `console.log` (driver `qemu`) |
//! | `vsock.sock_1025` | the guest agent's milestones, pushed to the host agent |
//! | `passt.log` | passt's own log (capped by passt at 1 MiB) |
//! | `net.sock` | the VM's network device listens here; passt is started on a connection to it |
//! | `vsock.sock_1027` | the guest's TCP connections to the host's loopback, made by the host agent |
//! | `vsock.sock_1026` | the guest's DNS queries, answered by the host agent |
//! | `data.img.fresh` | the host made `data.img` and the guest has not formatted it yet |
//! | `last-stop.json` | how the VM last stopped, for `berth stop` and `berth status` |

use std::path::{Path, PathBuf};

/// Errors locating Berth's files.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("cannot tell where to keep Berth's state: set XDG_DATA_HOME or HOME")]
    NoDataDir,
    #[error("the guest image was not found (looked in {0}); build it with guest-image/build.sh or set BERTH_IMAGE_DIR")]
    NoImage(String),
    #[error("{0} was not found next to this program nor on PATH; set {1}")]
    NoBinary(&'static str, &'static str),
}

/// The platform's per-user data directory for Berth.
pub fn data_root() -> Result<PathBuf, PathError> {
    if let Some(d) = std::env::var_os("BERTH_HOME") {
        return Ok(PathBuf::from(d));
    }
    #[cfg(target_os = "macos")]
    {
        let home = std::env::var_os("HOME").ok_or(PathError::NoDataDir)?;
        Ok(PathBuf::from(home).join("Library/Application Support/Berth"))
    }
    #[cfg(target_os = "windows")]
    {
        let base = std::env::var_os("LOCALAPPDATA").ok_or(PathError::NoDataDir)?;
        Ok(PathBuf::from(base).join("Berth"))
    }
    #[cfg(not(any(target_os = "macos", target_os = "windows")))]
    {
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return Ok(PathBuf::from(x).join("berth"));
        }
        let home = std::env::var_os("HOME").ok_or(PathError::NoDataDir)?;
        Ok(PathBuf::from(home).join(".local/share/berth"))
    }
}

/// One VM's state directory and the names inside it.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn for_vm(name: &str) -> Result<StateDir, PathError> {
        Ok(StateDir {
            root: data_root()?.join(name),
        })
    }

    pub fn at(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// Creates the directory (mode 0700) if needed.
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    pub fn config(&self) -> PathBuf {
        self.file("config.toml")
    }
    pub fn data_disk(&self) -> PathBuf {
        self.file("data.img")
    }
    pub fn console_log(&self) -> PathBuf {
        self.file("console.log")
    }
    pub fn host_agent_log(&self) -> PathBuf {
        self.file("host-agent.log")
    }
    pub fn lock(&self) -> PathBuf {
        self.file("lock")
    }
    pub fn vm_pids(&self) -> PathBuf {
        self.file("vm.pids")
    }
    pub fn agent_sock(&self) -> PathBuf {
        self.file("agent.sock")
    }
    pub fn docker_sock(&self) -> PathBuf {
        self.file("docker.sock")
    }
    pub fn vsock_sock(&self) -> PathBuf {
        self.file("vsock.sock")
    }
    pub fn vmm_sock(&self) -> PathBuf {
        self.file("vmm.sock")
    }
    pub fn vhost_vsock_sock(&self) -> PathBuf {
        self.file("vhost-vsock.sock")
    }
    /// The vhost-user socket of shared folder `i`'s backend.
    pub fn vhost_fs_sock(&self, i: usize) -> PathBuf {
        self.file(&format!("vhost-fs{i}.sock"))
    }
    pub fn qemu_monitor(&self) -> PathBuf {
        self.file("qemu.monitor")
    }
    pub fn qmp_sock(&self) -> PathBuf {
        self.file("qmp.sock")
    }
    pub fn console_sock(&self) -> PathBuf {
        self.file("console.sock")
    }
    /// Where the guest agent's milestones arrive (guest port
    /// [`berth_proto::EVENTS_PORT`] on the host side).
    pub fn events_sock(&self) -> PathBuf {
        self.file(&format!("vsock.sock_{}", berth_proto::EVENTS_PORT))
    }
    /// The VM's network device listens here (QEMU `-netdev stream`,
    /// berth-vmm `--net-socket`); passt runs on a connection to it.
    pub fn net_sock(&self) -> PathBuf {
        self.file("net.sock")
    }
    /// Where the guest's DNS queries arrive (guest port
    /// [`berth_proto::DNS_PORT`] on the host side).
    pub fn dns_sock(&self) -> PathBuf {
        self.file(&format!("vsock.sock_{}", berth_proto::DNS_PORT))
    }
    /// Where the guest's connections to the host's loopback arrive (guest
    /// port [`berth_proto::net::HOST_CONNECT_PORT`] on the host side).
    pub fn hostloop_sock(&self) -> PathBuf {
        self.file(&format!(
            "vsock.sock_{}",
            berth_proto::net::HOST_CONNECT_PORT
        ))
    }
    /// Present while `data.img` was created by the host and not formatted
    /// yet: only then may the guest format a blank disk.
    pub fn data_disk_fresh(&self) -> PathBuf {
        self.file("data.img.fresh")
    }
    pub fn last_stop(&self) -> PathBuf {
        self.file("last-stop.json")
    }
    /// Sockets removed when the VM stops (stale ones would mislead clients).
    pub fn sockets(&self) -> [PathBuf; 12] {
        [
            self.hostloop_sock(),
            self.net_sock(),
            self.dns_sock(),
            self.agent_sock(),
            self.docker_sock(),
            self.vsock_sock(),
            self.vmm_sock(),
            self.vhost_vsock_sock(),
            self.qmp_sock(),
            self.console_sock(),
            self.events_sock(),
            self.qemu_monitor(),
        ]
    }
}

/// The directory of the running program, to find sibling binaries and a
/// checkout's build output.
fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .canonicalize()
        .ok()?
        .parent()
        .map(Path::to_owned)
}

/// Finds the guest image: `override_dir`, `$BERTH_IMAGE_DIR`, an install
/// (`<prefix>/share/berth/guest-image` next to `<prefix>/bin`), or a
/// checkout's build output (`target/guest-image` above `target/<profile>`).
pub fn image_dir(override_dir: Option<&Path>) -> Result<PathBuf, PathError> {
    let mut candidates = Vec::new();
    if let Some(d) = override_dir {
        candidates.push(d.to_owned());
    } else if let Some(d) = std::env::var_os("BERTH_IMAGE_DIR") {
        candidates.push(PathBuf::from(d));
    } else if let Some(exe) = exe_dir() {
        candidates.push(exe.join("../share/berth/guest-image"));
        // target/debug/berth and target/debug/deps/… in a checkout
        for up in exe.ancestors().take(3) {
            candidates.push(up.join("guest-image"));
        }
    }
    candidates
        .iter()
        .find(|d| d.join("manifest.json").is_file())
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .ok_or_else(|| {
            PathError::NoImage(
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

/// Finds a helper binary: `$<env>`, next to this program, then on PATH.
pub fn helper_binary(name: &'static str, env: &'static str) -> Result<PathBuf, PathError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    if let Some(dir) = exe_dir() {
        for d in dir.ancestors().take(2) {
            let p = d.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    find_on_path(name).ok_or(PathError::NoBinary(name, env))
}

/// The first `name` in `$PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_names_are_short_and_inside() {
        let s = StateDir::at("/x/berth/default");
        for p in s.sockets() {
            assert!(p.starts_with("/x/berth/default"));
            // macOS limits socket paths to 104 bytes; our names add little.
            assert!(p.file_name().unwrap().len() <= 16);
        }
        assert_eq!(s.config(), Path::new("/x/berth/default/config.toml"));
    }

    #[test]
    fn image_override_must_hold_a_manifest() {
        let d = std::env::temp_dir().join(format!("berth-img-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(matches!(image_dir(Some(&d)), Err(PathError::NoImage(_))));
        std::fs::write(d.join("manifest.json"), "{}").unwrap();
        assert_eq!(image_dir(Some(&d)).unwrap(), d.canonicalize().unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

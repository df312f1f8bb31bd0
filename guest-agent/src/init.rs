//! The first things PID 1 does: kernel filesystems, cgroups, hostname.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// One early mount. `data` is the filesystem's option string.
struct Mnt {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The kernel and tmpfs mounts a read-only root needs, in order.
const EARLY_MOUNTS: &[Mnt] = &[
    Mnt {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Mnt {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Mnt {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    Mnt {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    Mnt {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "mode=1777",
    },
    Mnt {
        source: "mqueue",
        target: "/dev/mqueue",
        fstype: "mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Mnt {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
    Mnt {
        source: "tmp",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    Mnt {
        source: "varlog",
        target: "/var/log",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "mode=0755",
    },
    Mnt {
        source: "roothome",
        target: "/root",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0700",
    },
    Mnt {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
];

/// Mounts the kernel filesystems and tmpfs scratch space.
pub fn mount_early() -> Result<()> {
    for m in EARLY_MOUNTS {
        let _ = fs::create_dir(m.target);
        let data = (!m.data.is_empty()).then_some(m.data);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, data) {
            Ok(()) => {}
            // The kernel mounts devtmpfs itself with DEVTMPFS_MOUNT.
            Err(Errno::EBUSY) if m.target == "/dev" => {}
            Err(e) => {
                return Err(e).with_context(|| format!("mounting {} on {}", m.fstype, m.target))
            }
        }
    }
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/core", "/proc/kcore"),
    ] {
        let _ = fs::remove_file(link);
        symlink(target, link).with_context(|| format!("linking {link}"))?;
    }
    for dir in ["/run/berth", "/run/lock"] {
        fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    }
    // Every mount shared, as systemd makes them on a Linux host: bind
    // mounts with `rshared`/`rslave` propagation need their source on a
    // shared mount, and dockerd judges a path by the first mount at its
    // mount point (the tmpfs under a share mounted on /tmp, say).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SHARED,
        None::<&str>,
    )
    .context("making / a shared mount")?;
    // /etc/resolv.conf in the image points here; the network setup fills it.
    fs::write("/run/berth/resolv.conf", "").context("writing resolv.conf")?;
    Ok(())
}

/// The smallest free block the kernel reports to the host (order 5:
/// 128 KiB). The balloon driver sets the kernel's default, a pageblock
/// (order 9, 2 MiB), when it registers, overriding the boot parameter;
/// after a large allocation is freed, 2 MiB blocks that still hold one
/// page in use then keep everything else in them on the host (36 MiB
/// after a 2 GiB fill, measured under QEMU; none at order 5). Whole free
/// blocks are still reported at their own order, so this adds reports
/// only for the fragments.
pub const REPORTING_ORDER: u32 = 5;

/// Lowers the free page reporting order to [`REPORTING_ORDER`]; a kernel
/// without page reporting (no balloon) is left as it is.
pub fn tune_page_reporting() {
    let p = "/sys/module/page_reporting/parameters/page_reporting_order";
    if Path::new(p).exists() {
        if let Err(e) = fs::write(p, REPORTING_ORDER.to_string()) {
            tracing::warn!("setting the page reporting order: {e}");
        }
    }
}

/// Moves PID 1 out of the root cgroup and delegates every controller to
/// children, so dockerd can set memory, cpu, io and pids limits.
pub fn setup_cgroups() -> Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    let init = root.join("init.scope");
    let _ = fs::create_dir(&init);
    fs::write(init.join("cgroup.procs"), "1").context("moving the agent into init.scope")?;
    let available = fs::read_to_string(root.join("cgroup.controllers"))
        .context("reading cgroup.controllers")?;
    let enable = subtree_control_line(&available);
    if !enable.is_empty() {
        fs::write(root.join("cgroup.subtree_control"), &enable)
            .with_context(|| format!("enabling cgroup controllers `{enable}`"))?;
    }
    Ok(())
}

/// `cpu io memory` → `+cpu +io +memory`.
fn subtree_control_line(controllers: &str) -> String {
    controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sets the hostname and writes a matching /etc/hosts entry under /run.
pub fn set_hostname(name: &str) -> Result<()> {
    nix::unistd::sethostname(name).context("setting the hostname")?;
    fs::write(
        "/run/berth/hosts",
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )
    .context("writing hosts")?;
    Ok(())
}

/// Kernel release, for the hello message and the console.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_control() {
        assert_eq!(
            subtree_control_line("cpuset cpu io memory hugetlb pids\n"),
            "+cpuset +cpu +io +memory +hugetlb +pids"
        );
        assert_eq!(subtree_control_line(""), "");
    }
}

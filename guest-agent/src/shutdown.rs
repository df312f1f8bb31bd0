//! Orderly shutdown: containers, daemons, processes, disks, power.

use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::console;
use crate::datadisk;
use crate::state::Shared;

/// dockerd gives each container its stop timeout (10 s by default) and
/// has its own 15 s shutdown timeout; allow both before killing it.
const DOCKERD_GRACE: Duration = Duration::from_secs(35);
const CONTAINERD_GRACE: Duration = Duration::from_secs(10);
const STRAGGLER_GRACE: Duration = Duration::from_secs(3);

/// Stops everything in order and flushes the disks. The caller powers off.
pub async fn run(shared: &Shared) {
    console::milestone("shutdown-start", &[]);
    shared.update(|s| s.phase = berth_proto::Phase::ShuttingDown);
    let daemons = shared.daemons();
    // dockerd first: it stops the containers (SIGTERM, then SIGKILL after
    // their stop timeout), then containerd.
    for (name, grace) in [("dockerd", DOCKERD_GRACE), ("containerd", CONTAINERD_GRACE)] {
        if let Some(d) = daemons.iter().find(|d| d.name == name) {
            d.stop(grace).await;
        }
    }
    // Anything left (shims, docker-proxy, orphans): SIGTERM, then SIGKILL.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + STRAGGLER_GRACE;
    while tokio::time::Instant::now() < deadline && others_alive() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    unmount_data();
    nix::unistd::sync();
    console::milestone("power-off", &[]);
}

/// Whether any process other than PID 1 (and kernel threads) remains.
fn others_alive() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        // Kernel threads have an empty cmdline.
        pid != 1 && std::fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty())
    })
}

/// Unmounts everything on the data disk, deepest first; if something stays
/// busy, remounts the disk read-only, which also flushes its journal.
fn unmount_data() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets = mounts_under(&mounts, &data_roots());
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let mut all_ok = true;
    for t in &targets {
        if let Err(e) = umount2(t.as_str(), MntFlags::empty()) {
            tracing::warn!("unmounting {t} failed: {e}");
            all_ok = false;
        }
    }
    if !all_ok {
        let r = mount(
            None::<&str>,
            datadisk::MOUNT_POINT,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        );
        match r {
            Ok(()) => console::milestone("data-disk-readonly", &[]),
            Err(e) => tracing::error!("data disk still busy and not remountable read-only: {e}"),
        }
    } else {
        console::milestone("data-disk-unmounted", &[]);
    }
}

fn data_roots() -> Vec<&'static str> {
    let mut roots = vec![datadisk::MOUNT_POINT];
    roots.extend(datadisk::BINDS.iter().map(|(_, t)| *t));
    roots.push("/run/docker");
    roots.push("/run/containerd");
    roots
}

/// Mount points (second field of /proc/self/mounts, with octal escapes
/// decoded) at or below any of `roots`.
pub fn mounts_under(mounts: &str, roots: &[&str]) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(unescape)
        .filter(|m| {
            roots
                .iter()
                .any(|r| m == r || (m.starts_with(r) && m.as_bytes().get(r.len()) == Some(&b'/')))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_below_roots() {
        let m = "proc /proc proc rw 0 0\n\
                 /dev/vdb /var/lib/berth ext4 rw 0 0\n\
                 /dev/vdb /var/lib/docker ext4 rw 0 0\n\
                 overlay /var/lib/docker/overlay2/x/merged overlay rw 0 0\n\
                 /dev/vdb /var/lib/dockerfoo ext4 rw 0 0\n\
                 shm /var/lib/docker/containers/a\\040b/mounts/shm tmpfs rw 0 0\n";
        let got = mounts_under(m, &["/var/lib/berth", "/var/lib/docker"]);
        assert_eq!(
            got,
            vec![
                "/var/lib/berth",
                "/var/lib/docker",
                "/var/lib/docker/overlay2/x/merged",
                "/var/lib/docker/containers/a b/mounts/shm"
            ]
        );
        assert_eq!(unescape("a\\0"), "a\\0");
    }
}

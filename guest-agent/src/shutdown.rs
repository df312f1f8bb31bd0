//! Orderly shutdown: containers, daemons, processes, disks, power.

use std::time::Duration;

use berth_proto::shutdown::{CONTAINERD_GRACE, DOCKERD_GRACE, REAP_GRACE, STRAGGLER_GRACE};
use hyper::Method;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::console;
use crate::daemons::DOCKER_SOCKET;
use crate::datadisk;
use crate::docker_api;
use crate::state::Shared;

/// Of dockerd's grace, what stopping the containers may take; the rest is
/// dockerd's own exit.
const CONTAINERS_GRACE: Duration = Duration::from_secs(DOCKERD_GRACE.as_secs() - 5);
/// Names listed in the `containers-stopped` milestone, at most.
const MAX_NAMES: usize = 10;

/// Stops everything in order and flushes the disks. The caller powers off.
/// Each step is bounded (`berth_proto::shutdown`): the whole fits in the
/// budget the host waits before forcing the stop.
pub async fn run(shared: &Shared) {
    console::milestone("shutdown-start", &[]);
    let docker_ready = shared.phase() == berth_proto::Phase::Ready;
    shared.update(|s| s.phase = berth_proto::Phase::ShuttingDown);
    let daemons = shared.daemons();
    // The containers first, through the Docker API as `docker stop` does
    // (SIGTERM, SIGKILL after each one's stop timeout), so the host can be
    // told which ones had to be killed; then dockerd, then containerd.
    let t0 = tokio::time::Instant::now();
    if docker_ready {
        stop_containers().await;
    }
    let dockerd_left = DOCKERD_GRACE
        .saturating_sub(t0.elapsed())
        .max(Duration::from_secs(5));
    for (name, grace) in [("dockerd", dockerd_left), ("containerd", CONTAINERD_GRACE)] {
        if let Some(d) = daemons.iter().find(|d| d.name == name) {
            d.stop(grace).await;
        }
    }
    // Anything left (shims, docker-proxy, orphans): SIGTERM, then SIGKILL.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    wait_others_gone(STRAGGLER_GRACE).await;
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    // A killed process holds its files until it has exited: unmounting
    // before that fails with EBUSY.
    if !wait_others_gone(REAP_GRACE).await {
        tracing::warn!(
            "processes still alive {} s after SIGKILL",
            REAP_GRACE.as_secs()
        );
    }
    nix::unistd::sync();
    unmount_data();
    nix::unistd::sync();
    console::milestone("power-off", &[]);
}

/// Waits until no process but PID 1 is left, at most `limit`; whether
/// they are all gone.
async fn wait_others_gone(limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !others_alive() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops every running container in parallel and reports, as the
/// `containers-stopped` milestone, how many there were and which had to
/// be killed after ignoring SIGTERM for their stop timeout.
async fn stop_containers() {
    let list = docker_api::call_ok(
        DOCKER_SOCKET,
        Method::GET,
        "/containers/json",
        None,
        Duration::from_secs(5),
    )
    .await;
    let running: Vec<(String, String)> = match list
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|c| {
                let id = c["Id"].as_str()?.to_owned();
                let name = c["Names"][0].as_str().unwrap_or("").trim_start_matches('/');
                Some((id, name.to_owned()))
            })
            .collect(),
        _ => {
            tracing::warn!("cannot list the containers; dockerd stops them itself");
            return;
        }
    };
    let stops: Vec<_> = running
        .iter()
        .map(|(id, _)| {
            let path = format!("/containers/{id}/stop");
            tokio::spawn(async move {
                docker_api::call_ok(DOCKER_SOCKET, Method::POST, &path, None, CONTAINERS_GRACE)
                    .await
            })
        })
        .collect();
    for s in stops {
        if let Ok(Err(e)) = s.await {
            tracing::warn!("stopping a container: {e}");
        }
    }
    let mut killed = Vec::new();
    for (id, name) in &running {
        let state = docker_api::call_ok(
            DOCKER_SOCKET,
            Method::GET,
            &format!("/containers/{id}/json"),
            None,
            Duration::from_secs(5),
        )
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let Some(st) = state else { continue };
        let st = &st["State"];
        // 128 + SIGKILL, and not the kernel's OOM killer.
        if st["ExitCode"].as_i64() == Some(137) && st["OOMKilled"].as_bool() != Some(true) {
            killed.push(name.clone());
        }
    }
    let mut names: Vec<String> = killed.iter().take(MAX_NAMES).cloned().collect();
    if killed.len() > MAX_NAMES {
        names.push("…".into());
    }
    console::milestone(
        "containers-stopped",
        &[
            ("total", &running.len().to_string()),
            ("killed", &killed.len().to_string()),
            ("killed_names", &names.join(",")),
        ],
    );
}

/// Whether any process other than PID 1 (and kernel threads) remains.
pub(crate) fn others_alive() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        pid != 1
            && std::fs::read_to_string(e.path().join("stat"))
                .is_ok_and(|stat| holds_resources(&stat))
    })
}

/// Whether a process, by its `/proc/<pid>/stat` line, may still hold
/// files: not a kernel thread, not a zombie. A dying process's cmdline
/// reads empty as soon as its memory is detached, while it still holds
/// its files until its memory is torn down: only a zombie has let go.
fn holds_resources(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state (field 3), …, flags (field 9).
    let state = fields.first().copied().unwrap_or("X");
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    flags & PF_KTHREAD == 0 && state != "Z" && state != "X"
}

/// Unmounts everything on the data disk, deepest first and its own mount
/// point last; if something stays busy, remounts the filesystem read-only
/// through a mount that is still there, which also flushes its journal.
fn unmount_data() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets = mounts_under(&mounts, &data_roots());
    targets.sort_by_key(|t| (t == datadisk::MOUNT_POINT, std::cmp::Reverse(t.len())));
    let mut busy = Vec::new();
    for t in &targets {
        if let Err(e) = umount2(t.as_str(), MntFlags::empty()) {
            tracing::warn!("unmounting {t} failed: {e}");
            busy.push(t.clone());
        }
    }
    if busy.is_empty() {
        console::milestone("data-disk-unmounted", &[]);
        return;
    }
    let mut last = None;
    for t in &busy {
        match mount(
            None::<&str>,
            t.as_str(),
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            Ok(()) => {
                console::milestone("data-disk-readonly", &[]);
                return;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        tracing::error!("data disk still busy and not remountable read-only: {e}");
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
    fn dying_processes_count_until_they_are_zombies() {
        // pid (comm) state ppid pgrp session tty tpgid flags …
        let running = "42 (perl) S 1 42 42 0 -1 4194560 0 0";
        let dying = "42 (perl) R 1 42 42 0 -1 4194564 0 0";
        let zombie = "42 (perl) Z 1 42 42 0 -1 4227332 0 0";
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0";
        let odd_name = "43 (a) b (c) S 1 43 43 0 -1 4194560 0 0";
        assert!(holds_resources(running));
        assert!(holds_resources(dying));
        assert!(!holds_resources(zombie));
        assert!(!holds_resources(kthread));
        assert!(holds_resources(odd_name));
        assert!(!holds_resources("garbage"));
    }

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

//! Nothing lost: across `berth restart`, and across `kill -9` of the VM
//! process. These run last: they stop and start the VM.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{eventually, Case, Ctx, BB};

pub const CASES: &[Case] = &[
    ("persist_across_berth_restart", across_restart),
    ("persist_synced_records_across_kill_9", across_kill),
    ("persist_host_agent_killed_recovers", host_agent_killed),
    ("persist_disk_clean_after_stop", disk_clean_after_stop),
];

fn across_restart(ctx: &Ctx) {
    ctx.docker_ok(&["volume", "create", "e2e-restart"]);
    ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-restart:/data",
        BB,
        "sh",
        "-c",
        "echo before-restart > /data/f",
    ]);
    ctx.docker_ok(&["create", "--name", "e2e-kept", BB, "true"]);
    let pid_before = ctx.status()["pid"].clone();
    // A bigger disk takes effect at the restart: the file grows, ext4 follows.
    let kib_before = data_fs_kib(ctx);
    let out = ctx.berth_ok(&["config", "set", "disk_gib", "65"]);
    assert!(out.contains("berth restart"), "{out}");
    let out = ctx.berth_ok(&["restart"]);
    assert!(
        out.contains("Berth stopped") && out.contains("Berth is running"),
        "{out}"
    );
    let s = ctx.status();
    assert_eq!(s["state"], "running");
    assert_ne!(s["pid"], pid_before, "a new VM process");
    let console = ctx.console();
    assert!(
        disk_mounted(&console),
        "the disk was reformatted?\n{console}"
    );
    let kib_after = data_fs_kib(ctx);
    assert!(
        kib_after > kib_before + 900 * 1024,
        "data filesystem did not grow: {kib_before} → {kib_after} KiB"
    );
    let f = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-restart:/data",
        BB,
        "cat",
        "/data/f",
    ]);
    assert_eq!(f, "before-restart\n");
    assert!(ctx
        .docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
        .contains("e2e-kept"));
    assert!(ctx
        .docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .contains(BB));
    ctx.docker_ok(&["rm", "e2e-kept"]);
}

fn across_kill(ctx: &Ctx) {
    ctx.docker_ok(&["volume", "create", "e2e-durable"]);
    ctx.docker_ok(&[
        "run",
        "-d",
        "--name",
        "e2e-writer",
        "-v",
        "e2e-durable:/data",
        BB,
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo rec-$i >> /data/log; sync; echo synced $i; done",
    ]);
    let mut logs = ctx
        .docker_cmd(&["logs", "-f", "e2e-writer"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(logs.stdout.take().unwrap()).lines();
    // `synced N` is printed after sync(2) returned: rec-1..rec-N are on
    // the disk as far as the guest knows.
    let mut synced = 0u64;
    let t0 = Instant::now();
    for l in lines {
        let l = l.unwrap();
        if let Some(n) = l.strip_prefix("synced ") {
            synced = n.parse().unwrap();
        }
        if synced >= 30 || t0.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    assert!(synced >= 30, "writer too slow: {synced}");
    let pid = ctx.status()["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = logs.kill();
    let _ = logs.wait();
    eventually(
        "host agent notices the dead VM",
        Duration::from_secs(30),
        || ctx.status()["state"] == "stopped",
    );
    let s = ctx.status();
    assert!(
        s["error"].as_str().unwrap_or("").contains("signal 9"),
        "status should say why: {s}"
    );
    let out = ctx.berth_ok(&["start"]);
    assert!(out.contains("Berth is running"), "{out}");
    let console = ctx.console();
    assert!(disk_mounted(&console), "{console}");
    let log = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-durable:/data",
        BB,
        "cat",
        "/data/log",
    ]);
    let recs: Vec<&str> = log.lines().collect();
    assert!(
        recs.len() as u64 >= synced,
        "{} records, {synced} synced",
        recs.len()
    );
    for (i, r) in recs.iter().take(synced as usize).enumerate() {
        assert_eq!(*r, format!("rec-{}", i + 1), "record {} damaged", i + 1);
    }
    println!(
        "    {synced} synced records before kill -9, {} found after",
        recs.len()
    );
    ctx.docker_ok(&["rm", "-f", "e2e-writer"]);
}

fn disk_clean_after_stop(ctx: &Ctx) {
    let out = ctx.berth_ok(&["stop"]);
    assert!(out.contains("Berth stopped"), "{out}");
    assert_eq!(ctx.status()["state"], "stopped");
    for s in ["docker.sock", "agent.sock", "vsock.sock"] {
        assert!(!ctx.state.join(s).exists(), "{s} left behind");
    }
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(ctx.state.join("data.img"))
        .output()
        .expect("e2fsck (apt-get install e2fsprogs)");
    assert!(
        fsck.status.success(),
        "e2fsck found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// The agent found an existing filesystem (not a blank disk to format).
fn disk_mounted(console: &str) -> bool {
    console.lines().any(|l| {
        l.starts_with("berth-agent: data-disk ") && l.trim_end().ends_with("state=mounted")
    })
}

/// Size of the guest's data filesystem, from `df` in the guest.
fn data_fs_kib(ctx: &Ctx) -> u64 {
    let out = ctx.berth_ok(&["shell", "--", "df", "-k", "/var/lib/berth"]);
    out.lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("df output: {out}"))
}

/// `kill -9` of the host agent leaves the VM process orphaned; the next
/// `berth start` ends it and starts a fresh VM on the same, intact disk.
fn host_agent_killed(ctx: &Ctx) {
    ctx.docker_ok(&["volume", "create", "e2e-orphan"]);
    ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-orphan:/data",
        BB,
        "sh",
        "-c",
        "echo orphan-ok > /data/f; sync",
    ]);
    let s = ctx.status();
    let agent = s["host_agent_pid"].as_u64().unwrap() as i32;
    let vm = s["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("berth status says stopped", Duration::from_secs(10), || {
        ctx.status()["state"] == "stopped"
    });
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm), None).is_ok(),
        "the VM process outlives its host agent"
    );
    let out = ctx.berth_ok(&["start"]);
    assert!(out.contains("Berth is running"), "{out}");
    let s = ctx.status();
    assert_ne!(s["pid"].as_u64().unwrap() as i32, vm);
    let stat = std::fs::read_to_string(format!("/proc/{vm}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the orphaned VM process {vm} still runs: {stat}"
    );
    let f = ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-orphan:/data",
        BB,
        "cat",
        "/data/f",
    ]);
    assert_eq!(f, "orphan-ok\n");
}

//! The forwarded docker.sock under load: many connections at once, no
//! leaks, large uploads.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::{eventually, Case, Ctx};

pub const CASES: &[Case] = &[
    ("socket_200_concurrent_connections", concurrent),
    ("socket_no_fd_leak_after_1000_connections", no_fd_leak),
    ("socket_large_upload_docker_import", large_upload),
];

fn sock(ctx: &Ctx) -> PathBuf {
    ctx.state.join("docker.sock")
}

const PING: &[u8] = b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n";

fn concurrent(ctx: &Ctx) {
    let mut conns: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(sock(ctx)).expect("connect"))
        .collect();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        c.write_all(PING).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut resp = String::new();
        c.read_to_string(&mut resp)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(
            resp.starts_with("HTTP/1.1 200 OK") && resp.ends_with("OK"),
            "connection {i}: {resp:?}"
        );
    }
}

fn fd_count(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn no_fd_leak(ctx: &Ctx) {
    let pid = ctx.status()["host_agent_pid"]
        .as_u64()
        .expect("host agent pid");
    let before = fd_count(pid);
    for i in 0..1000 {
        let mut c = UnixStream::connect(sock(ctx)).unwrap();
        match i % 3 {
            // A full request and answer.
            0 => {
                c.write_all(PING).unwrap();
                let mut resp = String::new();
                c.read_to_string(&mut resp).unwrap();
                assert!(resp.ends_with("OK"), "{resp:?}");
            }
            // Half a request, then gone.
            1 => c.write_all(b"GET /_pi").unwrap(),
            // Connected and closed at once.
            _ => {}
        }
    }
    let mut after = 0;
    eventually("fds back to the baseline", Duration::from_secs(60), || {
        after = fd_count(pid);
        after <= before + 2
    });
    println!("    host agent fds: {before} before, {after} after 1000 connections");
}

fn large_upload(ctx: &Ctx) {
    // A 64 MiB root filesystem tar streamed through the socket by `docker import`.
    let dir = ctx.work.join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let data: Vec<u8> = (0..64 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    std::fs::copy(ctx.work.join("bbroot/bin/busybox"), dir.join("busybox")).unwrap();
    let tar = ctx.work.join("big.tar");
    let st = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&dir)
        .args(["big.bin", "busybox"])
        .status()
        .unwrap();
    assert!(st.success());
    ctx.docker_ok(&["import", tar.to_str().unwrap(), "berth-e2e/big:1"]);
    let sum = ctx.docker_ok(&[
        "run",
        "--rm",
        "berth-e2e/big:1",
        "/busybox",
        "md5sum",
        "/big.bin",
    ]);
    let host = std::process::Command::new("md5sum")
        .arg(dir.join("big.bin"))
        .output()
        .unwrap();
    assert_eq!(
        sum.split_whitespace().next(),
        String::from_utf8_lossy(&host.stdout)
            .split_whitespace()
            .next()
    );
    ctx.docker_ok(&["rmi", "berth-e2e/big:1"]);
    // The forwarder copies through fixed buffers: 64 MiB passing through
    // must not show up in the host agent's peak memory.
    let pid = ctx.status()["host_agent_pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    println!(
        "    host agent peak RSS after the 64 MiB upload: {} MiB",
        hwm_kib / 1024
    );
    assert!(hwm_kib < 48 * 1024, "host agent peak RSS {hwm_kib} KiB");
}

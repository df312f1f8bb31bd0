//! `cargo bench -p berth-core --bench docker_socket`: the forwarded Docker
//! socket against the same work done inside the guest, and `berth start`
//! wall time. Figures go into docs/benchmarks.md.
//!
//! * `GET /_ping` round trip, median of 1,000 on one keep-alive connection:
//!   host → docker.sock → host agent → vsock → guest agent → dockerd, next
//!   to the same loop run inside the guest (`berth-agent bench-ping`);
//! * a 1 GiB upload (`docker cp` of a 1 GiB file into a container);
//! * `berth start` to Docker ready: cold (fresh data disk) and warm.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Sequential pings on one keep-alive connection; sorted latencies in µs.
fn host_pings(sock: &Path, n: usize) -> Vec<u64> {
    let s = UnixStream::connect(sock).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            .unwrap();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    lat
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let b = common::ScratchVm::new("bench");
    let work = b.work.clone();
    // Nothing in this VM looks anything up outside the machine.
    let _dead = b.no_outside_dns();

    let t = Instant::now();
    b.berth(&["start"]);
    let cold = t.elapsed();
    let status: serde_json::Value = serde_json::from_str(&b.berth(&["status", "--json"])).unwrap();
    let driver = status["driver"].as_str().unwrap_or("?").to_owned();
    b.berth(&["stop"]);
    let t = Instant::now();
    b.berth(&["start"]);
    let warm = t.elapsed();

    // Warm-up, then the measured runs.
    host_pings(&b.data_home.join("berth/default/docker.sock"), 100);
    let host = host_pings(&b.data_home.join("berth/default/docker.sock"), 1000);
    let guest_line = b.berth(&["shell", "--", "/sbin/berth-agent", "bench-ping", "1000"]);
    let field = |k: &str| -> u64 {
        guest_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {guest_line:?}"))
    };
    let (g50, g90, gmean) = (field("median_us"), field("p90_us"), field("mean_us"));
    let (h50, h90) = (percentile(&host, 0.5), percentile(&host, 0.9));
    let hmean = host.iter().sum::<u64>() / host.len() as u64;

    // 1 GiB upload: a sparse-free file through `docker cp` (tar stream).
    let big = work.join("upload.bin");
    {
        let mut f = std::fs::File::create(&big).unwrap();
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        for _ in 0..1024 {
            f.write_all(&chunk).unwrap();
        }
    }
    let tar = berth_testkit::busybox_rootfs_tar(&work);
    b.docker(&["import", tar.to_str().unwrap(), "bench/bb"]);
    b.docker(&[
        "run",
        "-d",
        "--name",
        "bench-sink",
        "bench/bb",
        "/bin/sleep",
        "3600",
    ]);
    let t = Instant::now();
    b.docker(&["cp", big.to_str().unwrap(), "bench-sink:/upload.bin"]);
    let up = t.elapsed();
    b.docker(&["rm", "-f", "bench-sink"]);
    b.berth(&["stop"]);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("\nBerth benchmark (driver {driver})");
    println!("| measure | through docker.sock (host) | inside the guest | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| GET /_ping median of 1000, µs | {h50} | {g50} | {:.2}x |",
        h50 as f64 / g50.max(1) as f64
    );
    println!(
        "| GET /_ping p90, µs | {h90} | {g90} | {:.2}x |",
        h90 as f64 / g90.max(1) as f64
    );
    println!(
        "| GET /_ping mean of 1000, µs | {hmean} | {gmean} | {:.2}x |",
        hmean as f64 / gmean.max(1) as f64
    );
    println!("(the guest clock under TCG is jiffies, 4 ms: its single samples are quantized, its mean is not)");
    println!(
        "\n1 GiB `docker cp` upload: {:.1} s, {:.0} MiB/s",
        up.as_secs_f64(),
        1024.0 / up.as_secs_f64()
    );
    println!(
        "`berth start` to Docker ready: cold (fresh data disk) {:.0} ms, warm {:.0} ms",
        ms(cold),
        ms(warm)
    );
}

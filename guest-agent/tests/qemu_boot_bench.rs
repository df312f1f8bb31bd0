//! Boot benchmark under QEMU (not run by default; it only measures):
//!
//! ```text
//! cargo test --release -p berth-guest-agent --test qemu_boot_bench -- --ignored --nocapture
//! ```
//!
//! Boots the guest image `BERTH_BOOT_RUNS` times (default 5) on one warm data
//! disk (after one formatting boot) and prints, per boot and as medians, the
//! guest uptime at agent start and at docker-ready, and the host wall time
//! from QEMU's start to the docker-ready line. Agent start is the kernel's
//! share of the boot and serves as the reference the agent's part is read
//! against.

use std::time::Duration;

use berth_testkit::{uptime_of, Boot, Guest, Scratch};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[test]
#[ignore = "benchmark: run with --ignored"]
fn boot_to_docker_ready() {
    let Some(dir) = berth_testkit::require_image() else {
        return;
    };
    let runs: usize = std::env::var("BERTH_BOOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let scratch = Scratch::new("boot-bench");
    let data = scratch.0.join("data.img");
    berth_testkit::sparse_disk(&data, 8 << 30);
    let timeout = Duration::from_secs(300);
    let (mut agent, mut ready, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=runs {
        let mut g = Guest::boot(Boot {
            dir: &dir,
            work: &scratch.0,
            data_disk: Some(&data),
            extra_disk: None,
            // The first boot's disk is new, as the host agent would say.
            extra_cmdline: if i == 0 { "berth.data_fresh=1" } else { "" },
            name: &format!("bench{i}"),
            vhost_user_vsock: None,
        });
        let (a, _) = g.wait_for("berth-agent: agent-start", timeout);
        let (r, w) = g.wait_for("berth-agent: docker-ready", timeout);
        g.monitor("sendkey ctrl-alt-delete");
        assert_eq!(g.wait_exit(timeout), 0);
        let label = if i == 0 {
            "cold (formats the disk)"
        } else {
            "warm"
        };
        println!(
            "boot {i} {label:>24}: agent-start {:>6} ms  docker-ready {:>6} ms guest uptime  {:>5.1} s host wall",
            uptime_of(&a),
            uptime_of(&r),
            w.as_secs_f64()
        );
        if i > 0 {
            agent.push(uptime_of(&a) as f64);
            ready.push(uptime_of(&r) as f64);
            wall.push(w.as_secs_f64());
        }
    }
    let (ma, mr) = (median(agent), median(ready));
    println!(
        "median of {runs} warm boots: agent-start {ma:.0} ms (kernel), docker-ready {mr:.0} ms guest uptime \
         (agent's part {:.0} ms), {:.1} s host wall QEMU start → docker-ready",
        mr - ma,
        median(wall)
    );
}

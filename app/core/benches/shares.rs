//! `cargo bench -p berth-core --bench shares` (via `scripts/bench.sh`):
//! shared folders end to end, in a real VM (whatever driver `auto` picks;
//! QEMU with TCG here).
//!
//! A container works on a bind mount of a host folder and, as the
//! reference, on a docker volume (the guest's own ext4 data disk, same
//! guest, same TCG): an npm `node_modules` tree (`BERTH_BENCH_TREE`, a tar
//! `scripts/bench.sh` makes with npm on the host, kept in the guest's
//! memory while it is extracted) is extracted, `stat`-walked, read back and
//! removed, then a 1 GiB file is written and read sequentially. Caches are
//! dropped in the guest before each phase but the extract. The whole run is
//! done twice: with Berth's backend serving the folder, then with QEMU's
//! own virtiofsd (`BERTH_BENCH_VIRTIOFSD`, default
//! `/usr/lib/qemu/virtiofsd`, `-o cache=auto`) serving the same folder to
//! the same guest; the volume figures of each boot show how steady TCG is
//! between them. Times are taken in the guest (`/proc/uptime`, 10 ms).
//!
//! The VM's only resolver is a dead loopback port: nothing leaves the
//! machine. BERTH_BENCH_BIG_MIB sets the big file's size (default 1024).

mod common;

use std::path::Path;

/// Run in the container as `sh -c SCRIPT sh TARGET BIG_MIB`: one line
/// `phase centiseconds` per phase.
const SCRIPT: &str = r#"
set -e
T=$1; MIB=$2
now() { read u _ < /proc/uptime; echo "${u%.*}${u#*.}"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
rm -rf "$T"; mkdir -p "$T"; drop
a=$(now); tar -xf /dev/shm/tree.tar -C "$T"; sync; b=$(now); echo "extract $((b-a))"
drop; a=$(now); du -s "$T" > /dev/null; b=$(now); echo "stat-walk $((b-a))"
drop; a=$(now); find "$T" -type f -exec cat {} + > /dev/null; b=$(now); echo "read-all $((b-a))"
a=$(now); rm -rf "$T/node_modules"; sync; b=$(now); echo "remove $((b-a))"
a=$(now); dd if=/dev/zero of="$T/big" bs=1M count="$MIB" conv=fsync 2> /dev/null; b=$(now); echo "write-big $((b-a))"
drop; a=$(now); dd if="$T/big" of=/dev/null bs=1M 2> /dev/null; b=$(now); echo "read-big $((b-a))"
rm -rf "$T"
"#;

const PHASES: [&str; 6] = [
    "extract",
    "stat-walk",
    "read-all",
    "remove",
    "write-big",
    "read-big",
];

/// Seconds per phase, in [`PHASES`] order.
fn phases(vm: &common::ScratchVm, target: &str, big_mib: u64) -> Vec<f64> {
    let out = vm.docker(&[
        "exec",
        "fsb",
        "sh",
        "-c",
        SCRIPT,
        "sh",
        target,
        &big_mib.to_string(),
    ]);
    let got: Vec<(String, f64)> = out
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse::<f64>().ok()? / 100.0))
        })
        .collect();
    PHASES
        .iter()
        .map(|p| {
            got.iter()
                .find(|(k, _)| k == p)
                .unwrap_or_else(|| panic!("no {p} figure in {out:?}"))
                .1
        })
        .collect()
}

struct Run {
    backend: &'static str,
    bind: Vec<f64>,
    volume: Vec<f64>,
}

fn one_boot(vm: &common::ScratchVm, virtiofsd: Option<&str>, tree: &Path, big_mib: u64) -> Run {
    let mut start = vm.cmd(env!("CARGO_BIN_EXE_berth"), &["start"]);
    if let Some(v) = virtiofsd {
        start.env("BERTH_BENCH_VIRTIOFSD", v);
    }
    let st = start.status().expect("berth start");
    assert!(st.success(), "berth start failed");
    let status: serde_json::Value = serde_json::from_str(&vm.berth(&["status", "--json"])).unwrap();
    let driver = status["driver"].as_str().unwrap_or("?").to_owned();
    if vm.docker(&["images", "-q", "bench/bb"]).trim().is_empty() {
        let tar = berth_testkit::busybox_rootfs_tar(&vm.work);
        vm.docker(&["import", tar.to_str().unwrap(), "bench/bb"]);
    }
    let work = vm.work.to_str().unwrap();
    let _ = vm
        .cmd("docker", &["rm", "-f", "fsb"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    vm.docker(&[
        "run",
        "-d",
        "--name",
        "fsb",
        "--privileged",
        "--shm-size",
        "512m",
        "-v",
        &format!("{work}:{work}"),
        "-v",
        "fsbench-vol:/vol",
        "bench/bb",
        "sleep",
        "1000000",
    ]);
    let in_share = vm.work.join("tree.tar");
    std::fs::copy(tree, &in_share).unwrap();
    vm.docker(&[
        "exec",
        "fsb",
        "cp",
        in_share.to_str().unwrap(),
        "/dev/shm/tree.tar",
    ]);
    let backend = if virtiofsd.is_some() {
        "QEMU virtiofsd"
    } else {
        "Berth"
    };
    eprintln!("shares bench: {backend} serving {work} (driver {driver})");
    let bind = phases(vm, &format!("{work}/bind-t"), big_mib);
    let volume = phases(vm, "/vol/t", big_mib);
    vm.docker(&["rm", "-f", "fsb"]);
    vm.berth(&["stop"]);
    Run {
        backend,
        bind,
        volume,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(tree) = std::env::var_os("BERTH_BENCH_TREE") else {
        eprintln!(
            "shares bench SKIPPED: BERTH_BENCH_TREE is not set (scripts/bench.sh makes the npm tree)"
        );
        return;
    };
    let tree = Path::new(&tree);
    let virtiofsd = std::env::var("BERTH_BENCH_VIRTIOFSD")
        .unwrap_or_else(|_| "/usr/lib/qemu/virtiofsd".to_owned());
    let big_mib: u64 = std::env::var("BERTH_BENCH_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let listing = std::process::Command::new("tar")
        .arg("-tvf")
        .arg(tree)
        .output()
        .expect("tar");
    let (mut files, mut dirs) = (0, 0);
    for l in String::from_utf8_lossy(&listing.stdout).lines() {
        match l.as_bytes().first() {
            Some(b'-') => files += 1,
            Some(b'd') => dirs += 1,
            _ => {}
        }
    }
    let mib = std::fs::metadata(tree).unwrap().len() >> 20;

    let vm = common::ScratchVm::new("fsbench");
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    vm.berth(&[
        "config",
        "set",
        "dns_servers",
        &dead.local_addr().unwrap().to_string(),
    ]);
    let mut runs = vec![one_boot(&vm, None, tree, big_mib)];
    if Path::new(&virtiofsd).exists() {
        runs.push(one_boot(&vm, Some(&virtiofsd), tree, big_mib));
    } else {
        eprintln!("shares bench: {virtiofsd} not found; the virtiofsd reference is SKIPPED");
    }

    println!(
        "\nshared folder, end to end: node_modules tree of {files} files and {dirs} directories ({mib} MiB tar), {big_mib} MiB file"
    );
    println!(
        "{:<11} {:>14} {:>14} {:>7} {:>16} {:>7} {:>14}",
        "phase",
        "volume (ext4)",
        "Berth bind",
        "ratio",
        "virtiofsd bind",
        "ratio",
        "volume, boot 2"
    );
    for (i, p) in PHASES.iter().enumerate() {
        let vol = runs[0].volume[i];
        let ours = runs[0].bind[i];
        let (theirs, vol2) = runs
            .get(1)
            .map(|r| (r.bind[i], r.volume[i]))
            .unwrap_or((f64::NAN, f64::NAN));
        println!(
            "{:<11} {:>12.2} s {:>12.2} s {:>6.2}x {:>14.2} s {:>6.2}x {:>12.2} s",
            p,
            vol,
            ours,
            ours / vol,
            theirs,
            theirs / vol2,
            vol2
        );
    }
    for r in &runs {
        let mbs = |secs: f64| big_mib as f64 / secs;
        println!(
            "{}: big file write {:.0} MiB/s, read {:.0} MiB/s on the bind mount; volume {:.0} / {:.0} MiB/s",
            r.backend,
            mbs(r.bind[4]),
            mbs(r.bind[5]),
            mbs(r.volume[4]),
            mbs(r.volume[5])
        );
    }
}

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

/// Run in the container as `sh -c SCRIPT sh TARGET TREE BIG_MIB`: one
/// line `phase centiseconds` per phase, or `failed phase: message` (and
/// nothing more). TREE `-` skips the tree phases, BIG_MIB 0 the big file.
const SCRIPT: &str = r#"
T=$1; TREE=$2; MIB=$3
now() { read u _ < /proc/uptime; echo "${u%.*}${u#*.}"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
step() {
    name=$1; shift; a=$(now)
    if ! out=$("$@" 2>&1); then
        echo "failed $name: $(echo "$out" | tail -n 1)"; rm -rf "$T"; exit 0
    fi
    b=$(now); echo "$name $((b-a))"
}
rm -rf "$T"; mkdir -p "$T"
if [ "$TREE" != - ]; then
    drop; step extract sh -c "tar -xf $TREE -C $T && sync"
    drop; step stat-walk du -s "$T"
    drop; step read-all sh -c "find $T -type f -exec cat {} + > /dev/null"
    step remove sh -c "rm -rf $T/node_modules && sync"
fi
if [ "$MIB" != 0 ]; then
    step write-big dd if=/dev/zero of="$T/big" bs=1M count="$MIB" conv=fsync
    drop; step read-big dd if="$T/big" of=/dev/null bs=1M
fi
rm -rf "$T"
"#;

const TREE_PHASES: [&str; 4] = ["extract", "stat-walk", "read-all", "remove"];
const BIG_PHASES: [&str; 2] = ["write-big", "read-big"];

/// Seconds per phase, or why it failed.
type Figures = std::collections::BTreeMap<String, Result<f64, String>>;

fn phases(vm: &common::ScratchVm, target: &str, tree: Option<&str>, big_mib: u64) -> Figures {
    let out = vm.docker(&[
        "exec",
        "fsb",
        "sh",
        "-c",
        SCRIPT,
        "sh",
        target,
        tree.unwrap_or("-"),
        &big_mib.to_string(),
    ]);
    let mut got = Figures::new();
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("failed ") {
            let (k, why) = rest.split_once(": ").unwrap_or((rest, ""));
            got.insert(k.to_owned(), Err(why.to_owned()));
        } else if let Some((k, v)) = l.split_once(' ') {
            if let Ok(cs) = v.trim().parse::<f64>() {
                got.insert(k.to_owned(), Ok(cs / 100.0));
            }
        }
    }
    got
}

fn show(f: Option<&Result<f64, String>>) -> String {
    match f {
        Some(Ok(s)) => format!("{s:.2} s"),
        Some(Err(_)) => "failed".into(),
        None => "-".into(),
    }
}

/// One boot with one backend; every figure is printed as soon as it is
/// measured (`figure BACKEND TARGET TREE PHASE VALUE`).
fn one_boot(
    vm: &common::ScratchVm,
    virtiofsd: Option<&str>,
    trees: &[(&str, &Path)],
    big_mib: u64,
    plan: &[(&str, &str, bool)],
) -> std::collections::BTreeMap<(String, String, String), Result<f64, String>> {
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
        "768m",
        "-v",
        &format!("{work}:{work}"),
        "-v",
        "fsbench-vol:/vol",
        "bench/bb",
        "sleep",
        "1000000",
    ]);
    // The trees are read from the guest's memory, not from the share.
    for (name, tree) in trees {
        let in_share = vm.work.join(format!("{name}.tar"));
        std::fs::copy(tree, &in_share).unwrap();
        vm.docker(&[
            "exec",
            "fsb",
            "cp",
            in_share.to_str().unwrap(),
            &format!("/dev/shm/{name}.tar"),
        ]);
        std::fs::remove_file(&in_share).unwrap();
    }
    let backend = if virtiofsd.is_some() {
        "virtiofsd"
    } else {
        "berth"
    };
    eprintln!("shares bench: {backend} serving {work} (driver {driver})");
    let mut all = std::collections::BTreeMap::new();
    for (target, tree, big) in plan {
        let dir = match *target {
            "bind" => format!("{work}/bind-t"),
            _ => "/vol/t".to_owned(),
        };
        let tar = (*tree != "-").then(|| format!("/dev/shm/{tree}.tar"));
        let f = phases(vm, &dir, tar.as_deref(), if *big { big_mib } else { 0 });
        for (k, v) in f {
            println!(
                "figure {backend} {target} {tree} {k} {}",
                match &v {
                    Ok(s) => format!("{s:.2}"),
                    Err(e) => format!("failed: {e}"),
                }
            );
            let t = if TREE_PHASES.contains(&k.as_str()) {
                tree
            } else {
                &"big"
            };
            all.insert((target.to_string(), t.to_string(), k), v);
        }
    }
    vm.docker(&["rm", "-f", "fsb"]);
    vm.berth(&["stop"]);
    all
}

/// Files and directories in a tar.
fn count(tree: &Path) -> (usize, usize) {
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
    (files, dirs)
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
    let full = Path::new(&tree);
    let virtiofsd = std::env::var("BERTH_BENCH_VIRTIOFSD")
        .unwrap_or_else(|_| "/usr/lib/qemu/virtiofsd".to_owned());
    let big_mib: u64 = std::env::var("BERTH_BENCH_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let vm = common::ScratchVm::new("fsbench");
    // A smaller tree (without date-fns and rxjs) that fits under this
    // machine's descriptor limit even for a backend that holds one per
    // inode the guest caches and never asks it to let go.
    let small = vm.work.join("small-tree.tar");
    std::fs::copy(full, &small).unwrap();
    let st = std::process::Command::new("tar")
        .args(["--delete", "-f"])
        .arg(&small)
        .args(["node_modules/date-fns", "node_modules/rxjs"])
        .status()
        .unwrap();
    assert!(st.success(), "tar --delete");
    let trees = [("full", full), ("small", small.as_path())];
    let sizes: Vec<(usize, usize)> = trees.iter().map(|(_, t)| count(t)).collect();
    let fd_limit = berth_limits::fds::current_nofile_limit();

    let _dead = vm.no_outside_dns();
    // Both boots run the same phases in the same order (what ran before
    // matters: the full tree's removal leaves the host disk discarding
    // blocks), the full tree last: virtiofsd fails it.
    let plan: &[(&str, &str, bool)] = &[
        ("bind", "small", true),
        ("volume", "small", true),
        ("bind", "full", false),
        ("volume", "full", false),
    ];
    let ours = one_boot(&vm, None, &trees, big_mib, plan);
    let theirs = if Path::new(&virtiofsd).exists() {
        one_boot(&vm, Some(&virtiofsd), &trees, big_mib, &plan[..3])
    } else {
        eprintln!("shares bench: {virtiofsd} not found; the virtiofsd reference is SKIPPED");
        Default::default()
    };

    println!(
        "\nshared folder, end to end (open-file limit {fd_limit}); trees: full = {} files + {} directories, small = {} + {}; big file {big_mib} MiB",
        sizes[0].0, sizes[0].1, sizes[1].0, sizes[1].1
    );
    println!(
        "{:<7} {:<10} {:>13} {:>11} {:>7} {:>15} {:>7} {:>15}",
        "tree",
        "phase",
        "volume (ext4)",
        "Berth bind",
        "ratio",
        "virtiofsd bind",
        "ratio",
        "volume, boot 2"
    );
    let get = |m: &std::collections::BTreeMap<(String, String, String), Result<f64, String>>,
               target: &str,
               tree: &str,
               phase: &str| {
        m.get(&(target.to_owned(), tree.to_owned(), phase.to_owned()))
            .cloned()
    };
    let ratio = |a: &Option<Result<f64, String>>, b: &Option<Result<f64, String>>| match (a, b) {
        (Some(Ok(a)), Some(Ok(b))) => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    };
    let rows: Vec<(&str, &str)> = ["full", "small"]
        .iter()
        .flat_map(|t| TREE_PHASES.iter().map(move |p| (*t, *p)))
        .chain(BIG_PHASES.iter().map(|p| ("big", *p)))
        .collect();
    for (tree, phase) in rows {
        let vol = get(&ours, "volume", tree, phase);
        let bind = get(&ours, "bind", tree, phase);
        let vbind = get(&theirs, "bind", tree, phase);
        let vol2 = get(&theirs, "volume", tree, phase);
        println!(
            "{:<7} {:<10} {:>13} {:>11} {:>7} {:>15} {:>7} {:>15}",
            tree,
            phase,
            show(vol.as_ref()),
            show(bind.as_ref()),
            ratio(&bind, &vol),
            show(vbind.as_ref()),
            ratio(&vbind, &vol2.clone().or(vol.clone())),
            show(vol2.as_ref()),
        );
    }
    for (name, m) in [("Berth", &ours), ("virtiofsd", &theirs)] {
        for ((target, tree, phase), v) in m.iter() {
            if let Err(e) = v {
                println!("{name} {target} {tree} {phase} failed: {e}");
            }
        }
    }
}

//! Staying out of the way: memory the guest frees goes back to the host,
//! deleted data shrinks the host's disk file, the guest clock is right
//! after a pause and stays right. Figures are printed as `figure:` lines.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_proto::{read_exec_frame, write_exec_frame, ExecFrame, ExecRequest};

use super::{Case, Ctx, BB};

pub const CASES: &[Case] = &[
    ("hygiene_memory_given_back", memory_given_back),
    ("hygiene_page_cache_given_back", page_cache_given_back),
    ("hygiene_disk_shrinks", disk_shrinks),
    ("hygiene_clock_holds_without_pauses", clock_holds),
    ("hygiene_clock_right_after_a_pause", clock_after_pause),
];

const MIB: u64 = 1 << 20;

fn rss(ctx: &Ctx) -> u64 {
    ctx.status()["resources"]["vm_rss_bytes"]
        .as_u64()
        .expect("berth status reports the VM's resident memory")
}

fn disk_allocated(ctx: &Ctx) -> u64 {
    ctx.status()["resources"]["data_disk_allocated_bytes"]
        .as_u64()
        .expect("berth status reports the data disk's allocated size")
}

/// Guest memory is a memfd that QEMU shares with the vhost-user
/// backends: its allocated size (QEMU's fd to it) and the other
/// processes that map it. A page released from the file is released for
/// every process that maps it.
fn guest_memory_file(ctx: &Ctx) -> (u64, Vec<u32>) {
    use std::os::unix::fs::MetadataExt;
    let pid = ctx.status()["pid"].as_u64().expect("the VM's pid") as u32;
    let mut best: Option<(u64, String)> = None;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy().into_owned();
        if !t.starts_with("/memfd:") {
            continue;
        }
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        // The guest's RAM is by far the largest memfd QEMU holds.
        if best.as_ref().is_none_or(|b| m.size() > b.0) {
            best = Some((m.size(), e.path().to_string_lossy().into_owned()));
        }
    }
    let (_, path) = best.expect("QEMU holds the guest memory memfd");
    let m = std::fs::metadata(&path).unwrap();
    let name = std::fs::read_link(&path).unwrap();
    let name = name.to_string_lossy();
    let ino = m.ino();
    // Mappers: processes whose maps show this memfd's inode.
    let mut mappers = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(other) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if other == pid {
            continue;
        }
        let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) else {
            continue;
        };
        let mapped = maps.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 6 && f[4] == ino.to_string() && name.starts_with(f[5])
        });
        if mapped {
            mappers.push(other);
        }
    }
    (m.blocks() * 512, mappers)
}

/// The VM's resident memory once it stops falling: sampled every 2 s
/// until three samples in a row are within 2 % (at most 90 s).
fn settled_rss(ctx: &Ctx) -> u64 {
    let t0 = Instant::now();
    let mut last = [rss(ctx), u64::MAX, u64::MAX];
    while t0.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_secs(2));
        last.rotate_right(1);
        last[0] = rss(ctx);
        let (lo, hi) = (last.iter().min().unwrap(), last.iter().max().unwrap());
        if *hi != u64::MAX && (hi - lo) * 50 <= *lo {
            break;
        }
    }
    last[0]
}

/// Waits until the VM's resident memory is within 10 % of `idle`; returns
/// how long that took, or fails after `limit` with the figures.
fn back_to(ctx: &Ctx, idle: u64, limit: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    let mut now = rss(ctx);
    while now > idle + idle / 10 {
        assert!(
            t0.elapsed() < limit,
            "{what}: the VM still holds {} MiB after {limit:?} (idle {} MiB, goal ≤ {} MiB)",
            now / MIB,
            idle / MIB,
            (idle + idle / 10) / MIB
        );
        std::thread::sleep(Duration::from_millis(500));
        now = rss(ctx);
    }
    t0.elapsed()
}

/// A container that touches `mib` of memory (a memory-backed tmpfs it
/// fills) and keeps it: returns once it has, with dd's summary line.
fn fill(ctx: &Ctx, mib: u32) -> String {
    ctx.docker_ok(&[
        "run",
        "-d",
        "--name",
        "e2e-fill",
        "--tmpfs",
        "/fill:size=2100m",
        BB,
        "sh",
        "-c",
        &format!(
            "dd if=/dev/zero of=/fill/f bs=1M count={mib} 2>&1 | tail -n1; echo filled; exec sleep 600"
        ),
    ]);
    let t0 = Instant::now();
    loop {
        let logs = ctx.docker_ok(&["logs", "e2e-fill"]);
        if logs.contains("filled") {
            return logs.lines().next().unwrap_or("").to_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the container did not fill {mib} MiB in 300 s: {logs}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The container exits (killed), its memory free in the guest.
fn end_fill(ctx: &Ctx) {
    ctx.docker_ok(&["rm", "-f", "e2e-fill"]);
}

fn memory_given_back(ctx: &Ctx) {
    let mib = ctx.status()["memory_mib"].as_u64().unwrap_or(0);
    assert!(
        mib >= 3072,
        "the VM has {mib} MiB: a container holding 2 GiB needs the suite's 3 GiB (did a case change memory_mib before a restart?)"
    );
    // The same container once with a little memory first: what running
    // it leaves (its files in the page cache, QEMU's translated code
    // under TCG) belongs to the idle figure.
    fill(ctx, 16);
    end_fill(ctx);
    let idle = settled_rss(ctx);
    let (file_idle, mappers) = guest_memory_file(ctx);
    println!(
        "      VM resident memory, idle: {} MiB; guest memory file {} MiB allocated, mapped by {} vhost-user backend process(es) too",
        idle / MIB,
        file_idle / MIB,
        mappers.len()
    );
    assert!(
        !mappers.is_empty(),
        "no backend maps guest memory: the check below would not cover them"
    );
    // A container touches 2 GiB (a memory-backed tmpfs it fills) and exits.
    let t0 = Instant::now();
    let out = fill(ctx, 2048);
    let peak = rss(ctx);
    let (file_peak, _) = guest_memory_file(ctx);
    println!(
        "      the container filled 2 GiB in {:.1} s; VM resident memory now {} MiB ({})",
        t0.elapsed().as_secs_f64(),
        peak / MIB,
        out.trim()
    );
    assert!(
        peak >= idle + 1536 * MIB,
        "the VM did not grow by the 2 GiB the container touched: idle {} MiB, after {} MiB",
        idle / MIB,
        peak / MIB
    );
    end_fill(ctx);
    let took = back_to(
        ctx,
        idle,
        Duration::from_secs(30),
        "after the container exited",
    );
    // Given back from the shared file, hence from the backends' mappings
    // as well, not only from QEMU's.
    let (file_after, _) = guest_memory_file(ctx);
    assert!(
        file_after <= file_idle + file_idle / 10 + 64 * MIB,
        "the guest memory file kept its pages: {} MiB allocated idle, {} MiB after",
        file_idle / MIB,
        file_after / MIB
    );
    println!(
        "      guest memory file (shared with the backends): {} MiB allocated idle, {} MiB with 2 GiB touched, {} MiB after",
        file_idle / MIB,
        file_peak / MIB,
        file_after / MIB
    );
    println!(
        "      figure: memory given back: {} MiB idle → {} MiB with 2 GiB touched → within 10 % of idle {:.1} s after the container exited ({} MiB)",
        idle / MIB,
        peak / MIB,
        took.as_secs_f64(),
        rss(ctx) / MIB
    );
}

fn page_cache_given_back(ctx: &Ctx) {
    // A 1 GiB file on the data disk, out of the cache, then read back.
    let f = "/var/lib/berth/hygiene-cache.bin";
    ctx.berth_ok(&[
        "shell",
        "--",
        "sh",
        "-c",
        &format!("dd if=/dev/zero of={f} bs=1M count=1024 2>/dev/null && sync && echo 3 > /proc/sys/vm/drop_caches"),
    ]);
    let idle = settled_rss(ctx);
    ctx.berth_ok(&["shell", "--", "sh", "-c", &format!("cat {f} > /dev/null")]);
    let cached = rss(ctx);
    assert!(
        cached >= idle + 768 * MIB,
        "reading 1 GiB did not grow the VM: {} → {} MiB",
        idle / MIB,
        cached / MIB
    );
    ctx.berth_ok(&[
        "shell",
        "--",
        "sh",
        "-c",
        "sync && echo 3 > /proc/sys/vm/drop_caches",
    ]);
    let took = back_to(
        ctx,
        idle,
        Duration::from_secs(30),
        "after the page cache was dropped",
    );
    println!(
        "      figure: page cache given back: {} MiB → {} MiB with a 1 GiB file cached → within 10 % {:.1} s after the cache was dropped",
        idle / MIB,
        cached / MIB,
        took.as_secs_f64()
    );
    ctx.berth_ok(&["shell", "--", "rm", "-f", f]);
}

/// A tar stream holding one `len`-byte file of zeros, written as it goes.
fn write_tar(mut w: impl Write, name: &str, len: u64) -> std::io::Result<()> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{len:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    w.write_all(&h)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    let pad = (512 - (len % 512) as usize) % 512;
    w.write_all(&zeros[..pad + 1024])
}

/// `data.img`'s allocated size once it stops changing (deletions of the
/// earlier cases may still be reaching the host): sampled every 2 s until
/// three samples in a row are within 1 % (at most 60 s).
fn settled_disk(ctx: &Ctx) -> u64 {
    let t0 = Instant::now();
    let mut last = [disk_allocated(ctx), u64::MAX, u64::MAX];
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(2));
        last.rotate_right(1);
        last[0] = disk_allocated(ctx);
        let (lo, hi) = (last.iter().min().unwrap(), last.iter().max().unwrap());
        if *hi != u64::MAX && (hi - lo) * 100 <= *lo {
            break;
        }
    }
    last[0]
}

fn disk_shrinks(ctx: &Ctx) {
    ctx.berth_ok(&["shell", "--", "sync"]);
    let before = settled_disk(ctx);
    // A 1 GiB image, imported from the host.
    let t0 = Instant::now();
    let mut child = ctx
        .docker_cmd(&["import", "-", "berth-e2e/big:1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker import");
    write_tar(child.stdin.take().unwrap(), "big.bin", 1 << 30).expect("streaming the tar");
    assert!(child.wait().unwrap().success(), "docker import failed");
    // And a 1 GiB file in a volume.
    ctx.docker_ok(&["volume", "create", "e2e-big"]);
    ctx.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "e2e-big:/v",
        BB,
        "sh",
        "-c",
        "dd if=/dev/zero of=/v/f bs=1M count=1024 2>/dev/null && sync",
    ]);
    ctx.berth_ok(&["shell", "--", "sync"]);
    let full = disk_allocated(ctx);
    println!(
        "      image and volume written in {:.1} s; data.img allocated {} MiB → {} MiB",
        t0.elapsed().as_secs_f64(),
        before / MIB,
        full / MIB
    );
    assert!(
        full >= before + 1800 * MIB,
        "2 GiB written but data.img grew only {} → {} MiB",
        before / MIB,
        full / MIB
    );
    ctx.docker_ok(&["rmi", "berth-e2e/big:1"]);
    ctx.docker_ok(&["volume", "rm", "e2e-big"]);
    let t0 = Instant::now();
    // Within 10 %, with a floor of 16 MiB for an almost empty disk: what
    // stays is metadata (directory blocks Docker grew, the journal).
    let goal = before + (before / 10).max(16 * MIB);
    let mut now = disk_allocated(ctx);
    while now > goal {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "data.img still has {} MiB allocated 60 s after the removals (before: {} MiB)",
            now / MIB,
            before / MIB
        );
        std::thread::sleep(Duration::from_millis(500));
        now = disk_allocated(ctx);
    }
    println!(
        "      figure: disk given back: data.img allocated {} MiB → {} MiB with a 1 GiB image and a 1 GiB volume → {} MiB {:.1} s after removing them",
        before / MIB,
        full / MIB,
        now / MIB,
        t0.elapsed().as_secs_f64()
    );
}

/// A shell in the guest answering each line with its clock, for readings
/// that do not depend on the clock keeper's own code path. bash's
/// `EPOCHREALTIME` reads the clock without starting a process (a `date`
/// per reading cost tens of ms under TCG, most of the error bound).
struct GuestClock {
    rt: tokio::runtime::Runtime,
    stream: tokio::net::UnixStream,
}

impl GuestClock {
    fn open(ctx: &Ctx) -> GuestClock {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let vsock = berth_core::paths::StateDir::at(&ctx.state).vsock_sock();
        let stream = rt.block_on(async {
            let c = berth_core::guest::GuestClient::connect(&vsock, "e2e clock probe")
                .await
                .expect("guest agent");
            c.exec(ExecRequest {
                argv: vec![
                    "bash".into(),
                    "-c".into(),
                    "while read x; do echo \"${EPOCHREALTIME/./}\"; done".into(),
                ],
                env: Vec::new(),
                cwd: None,
                tty: None,
            })
            .await
            .expect("exec in the guest")
        });
        GuestClock { rt, stream }
    }

    /// One reading: (guest minus host in ms, round trip in ms).
    fn try_read_once(&mut self) -> Result<(f64, f64), String> {
        let stream = &mut self.stream;
        self.rt.block_on(async {
            let t0 = unix_nanos();
            write_exec_frame(stream, &ExecFrame::Stdin(b"x\n".to_vec()))
                .await
                .map_err(|e| e.to_string())?;
            let mut line = Vec::new();
            while !line.ends_with(b"\n") {
                match read_exec_frame(stream).await.map_err(|e| e.to_string())? {
                    ExecFrame::Stdout(d) => line.extend_from_slice(&d),
                    ExecFrame::Exit(c) => return Err(format!("the probe exited ({c})")),
                    _ => {}
                }
            }
            let t1 = unix_nanos();
            let text = String::from_utf8_lossy(&line);
            let g: i128 = text
                .trim()
                .parse::<i128>()
                .map_err(|_| format!("EPOCHREALTIME read {text:?}"))?
                * 1000;
            let mid = (t0 + t1) / 2;
            Ok(((g - mid) as f64 / 1e6, (t1 - t0) as f64 / 1e6))
        })
    }

    fn read_once(&mut self) -> (f64, f64) {
        self.try_read_once().expect("clock probe")
    }

    /// The reading with the shortest round trip of `n`.
    fn try_read(&mut self, n: usize) -> Result<(f64, f64), String> {
        let mut best = self.try_read_once()?;
        for _ in 1..n {
            let r = self.try_read_once()?;
            if r.1 < best.1 {
                best = r;
            }
        }
        Ok(best)
    }

    fn read(&mut self, n: usize) -> (f64, f64) {
        self.try_read(n).expect("clock probe")
    }
}

fn unix_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// Readings taken since the suite's start: (seconds since, offset ms,
/// round trip ms).
static SINCE_START: Mutex<Vec<(f64, f64, f64)>> = Mutex::new(Vec::new());
/// Set once [`clock_holds`] has run: the watch ends.
static WATCH_DONE: AtomicBool = AtomicBool::new(false);

/// Takes a reading every 30 s on a thread of its own, for
/// [`clock_holds`], from the suite's start until that case runs.
pub fn start_watch(ctx: &Ctx) {
    let mut probe = GuestClock::open(ctx);
    let t0 = Instant::now();
    let first = probe.read(5);
    SINCE_START.lock().unwrap().push((0.0, first.0, first.1));
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(30));
        if WATCH_DONE.load(Ordering::SeqCst) {
            return;
        }
        // A failed reading ends the watch (the VM was restarted).
        let Ok((o, rtt)) = probe.try_read(5) else {
            return;
        };
        SINCE_START
            .lock()
            .unwrap()
            .push((t0.elapsed().as_secs_f64(), o, rtt));
    });
}

fn clock_holds(ctx: &Ctx) {
    WATCH_DONE.store(true, Ordering::SeqCst);
    // The guest keeps time on a clock source, not by counting ticks
    // (`jiffies`, `refined-jiffies`), which drifts by tenths of a second a
    // minute (under TCG: the TSC, given the host's frequency).
    let source = ctx.berth_ok(&[
        "shell",
        "--",
        "cat",
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    ]);
    println!("      guest clock source: {}", source.trim());
    assert!(
        !source.contains("jiffies"),
        "the guest counts ticks for time ({}); its boot log says why: {}",
        source.trim(),
        ctx.berth_ok(&[
            "shell",
            "--",
            "sh",
            "-c",
            "dmesg | grep -i -E 'tsc|clocksource'"
        ])
    );
    let mut probe = GuestClock::open(ctx);
    let (now, rtt) = probe.read(5);
    let v = SINCE_START.lock().unwrap().clone();
    let span = v.last().map_or(0.0, |x| x.0);
    let mut all = v.clone();
    all.push((span, now, rtt));
    // Each reading is good to half its round trip: the guest read its
    // clock somewhere between sending and receiving.
    let worst = all
        .iter()
        .copied()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap();
    let least_possible = |r: &(f64, f64, f64)| (r.1.abs() - r.2 / 2.0).max(0.0);
    let max_rtt = all.iter().map(|r| r.2).fold(0.0, f64::max);
    println!(
        "      figure: guest clock over {:.1} min of the suite without pauses: {} readings, worst offset {:+.1} ms (±{:.1}), now {now:+.1} ms (±{:.1}); longest round trip of a kept reading {max_rtt:.1} ms",
        span / 60.0,
        all.len(),
        worst.1,
        worst.2 / 2.0,
        rtt / 2.0
    );
    if span < 600.0 {
        println!(
            "      (a filtered run covers {:.1} min; the whole suite covers more than 10)",
            span / 60.0
        );
    }
    let off: Vec<_> = all.iter().filter(|r| least_possible(r) >= 50.0).collect();
    assert!(
        off.is_empty(),
        "the guest clock was 50 ms or more off without any pause (seconds since the start, offset ms, round trip ms): {off:?} of {all:?}"
    );
    let s = ctx.status();
    assert!(
        s["clock"]["checked_at_unix"].as_u64().is_some(),
        "berth status shows the clock's last check: {}",
        s["clock"]
    );
}

/// Sends one HMP command to QEMU's monitor.
/// `stop` or `cont` on QEMU's human monitor, checked.
fn monitor(ctx: &Ctx, cmd: &str) {
    berth_testkit::qemu_monitor(
        &berth_core::paths::StateDir::at(&ctx.state).qemu_monitor(),
        cmd,
    );
}

fn clock_after_pause(ctx: &Ctx) {
    let driver = ctx.status()["driver"].as_str().unwrap_or("").to_owned();
    if !driver.starts_with("qemu") {
        println!("      *** SKIPPED: pausing through QEMU's monitor needs the qemu driver (this VM runs {driver}) ***");
        return;
    }
    let mut probe = GuestClock::open(ctx);
    let (before, _) = probe.read(3);
    let corrections = |s: &serde_json::Value| s["clock"]["corrections"].as_u64().unwrap_or(0);
    let made_before = corrections(&ctx.status());
    monitor(ctx, "stop");
    std::thread::sleep(Duration::from_secs(20));
    monitor(ctx, "cont");
    let resumed = Instant::now();
    let mut first = None;
    let mut readings = Vec::new();
    loop {
        let (o, rtt) = probe.read_once();
        let at = resumed.elapsed();
        first.get_or_insert(o);
        readings.push((at.as_secs_f64(), o, rtt));
        if o.abs() <= 100.0 {
            // The keeper reads the clock again after a step before it
            // updates its status: wait for that (the guest's clock can be
            // right before the status says so).
            let mut s = ctx.status();
            let waited = Instant::now();
            while corrections(&s) == made_before && waited.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
                s = ctx.status();
            }
            let found = s["clock"]["last_correction"]["offset_ms"]
                .as_f64()
                .unwrap_or(f64::NAN);
            println!(
                "      figure: after a 20 s pause the clock keeper found the guest {found:+.0} ms off and corrected it; the guest clock read {:.0} ms after `cont`: {o:+.1} ms (±{:.1}) from the host (first reading {:+.1} ms); before the pause {before:+.1} ms",
                at.as_secs_f64() * 1000.0,
                rtt / 2.0,
                first.unwrap_or(o),
            );
            assert!(
                at < Duration::from_secs(1),
                "the clock was right only {at:?} after the resume: {readings:?}"
            );
            break;
        }
        assert!(
            at < Duration::from_secs(10),
            "the guest clock is still off 10 s after the resume: {readings:?}"
        );
    }
    // Containers share the guest's clock.
    let t0 = unix_nanos();
    // (busybox's `date` has whole seconds: a second of slack either way;
    // without the correction the container would be 20 s behind.)
    let out = ctx.docker_ok(&["run", "--rm", BB, "date", "+%s"]);
    let t1 = unix_nanos();
    let c = out.trim().parse::<i128>().expect("date in a container") * 1_000_000_000;
    assert!(
        c >= t0 - 2_000_000_000 && c <= t1 + 1_000_000_000,
        "a container's clock ({c}) is outside the host's [{t0}, {t1}] by more than a second"
    );
    let s = ctx.status();
    let last = &s["clock"]["last_correction"];
    assert_eq!(last["step"], true, "the pause was stepped away: {last}");
    assert_eq!(last["reason"], "resumed", "{last}");
}

//! berth-vmm boots the guest kernel on the real /dev/kvm, from our own
//! devices: memory layout, kernel loading, boot params, CPUID, interrupts,
//! the serial console, the virtio-mmio transport and virtio-blk together.
//!
//! Slow (about a minute of guest time): on this project's machines /dev/kvm
//! is kvm_pvm, which emulates every instruction. There the test boots the
//! kvm_pvm test kernel (guest-image/kernel/pvm-test) until it mounts its
//! root from our virtio-blk and runs init; kvm_pvm can't deliver init's
//! first syscall, so init dies, the kernel panics and resets through our
//! i8042, and berth-vmm exits with code 2 (guest panic). On a host with real
//! KVM the product kernel boots, init runs, and `PUT /shutdown` ends the VM
//! in order (exit 0).
//!
//! Needs /dev/kvm and the guest image; without them it prints a loud
//! SKIPPED line unless BERTH_KVM_REQUIRED=1 / BERTH_E2E_REQUIRED=1.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::Scratch;

fn api(sock: &Path, method: &str, path: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("control API socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        let msg = "/dev/kvm is not accessible";
        if std::env::var("BERTH_KVM_REQUIRED").as_deref() == Ok("1") {
            panic!("KVM is required: {msg}");
        }
        eprintln!("\n*** SKIPPED (needs /dev/kvm): {msg} ***\n");
    }
    ok
}

/// Which kernel image format to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// ELF vmlinux entered through its PVH note (the product's default).
    Pvh,
    /// bzImage entered at its 64-bit entry point.
    BzImage,
}

#[test]
fn boots_the_guest_kernel_to_init_on_kvm() {
    boot_to_init(Format::Pvh);
}

#[test]
fn boots_the_bzimage_to_init_on_kvm() {
    boot_to_init(Format::BzImage);
}

fn boot_to_init(format: Format) {
    if !kvm_usable() {
        return;
    }
    let Some(dir) = berth_testkit::require_image() else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_berth-vmm");
    let probe = Command::new(bin).arg("probe").output().unwrap();
    let real_kvm = probe.status.success();
    eprintln!("probe: {}", String::from_utf8_lossy(&probe.stdout).trim());
    let (product, test) = match format {
        Format::Pvh => ("vmlinux", "test/vmlinux-pvm-test"),
        Format::BzImage => ("bzImage", "test/bzImage-pvm-test"),
    };
    let (kernel, mut cmdline) = if real_kvm {
        (dir.join(product), berth_testkit::manifest(&dir).0)
    } else {
        (
            dir.join(test),
            "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootfstype=erofs init=/sbin/berth-agent \
             i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
                .to_owned(),
        )
    };
    if !real_kvm {
        // The instructions kvm_pvm's emulator trips on (see GUEST-TRIALS).
        cmdline.push_str(" clearcpuid=141,151,154,295,308");
    }
    let scratch = Scratch::new(&format!("kvm-boot-{format:?}"));
    let console = scratch.0.join("console.log");
    let api_sock = scratch.0.join("vmm.sock");
    // Every device berth-vmm has: root and data disks, vsock, net, rng,
    // a shared folder, serial.
    let data = scratch.0.join("data.img");
    berth_testkit::sparse_disk(&data, 1 << 30);
    let vsock = scratch.0.join("v.sock");
    let share = scratch.0.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--cpus",
        "1",
        "--memory",
        "512",
        "--cmdline",
        &cmdline,
    ])
    .arg("--kernel")
    .arg(&kernel)
    .arg("--rootfs")
    .arg(dir.join(berth_testkit::manifest(&dir).1))
    .arg("--data-disk")
    .arg(&data)
    .arg("--vsock")
    .arg(&vsock)
    .arg("--net-socket")
    .arg(scratch.0.join("net.sock"))
    .arg("--share")
    .arg(format!("share0={}", share.display()))
    .arg("--console-log")
    .arg(&console)
    .arg("--api-socket")
    .arg(&api_sock)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if !real_kvm {
        cmd.arg("--ignore-probe");
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();

    // Milestones, in order, from our serial device.
    let wanted: [(&str, &str); 6] = [
        ("banner", "Linux version 6.1"),
        ("command line", "Command line: console=ttyS0"),
        (
            "virtio-mmio registration",
            "virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000",
        ),
        ("virtio-blk disk", "[vda]"),
        (
            "root mounted from virtio-blk",
            "VFS: Mounted root (erofs filesystem) readonly",
        ),
        ("init", "Run /sbin/berth-agent as init process"),
    ];
    let deadline = started + Duration::from_secs(1800);
    let mut next = 0;
    let mut checked_api = false;
    // Taken once the root is mounted: every built-in driver has probed its
    // device by then, and on kvm_pvm the guest panics and resets about a
    // second after it starts init, so later would race the VMM's exit.
    let mut idle: Option<((u64, u64), String)> = None;
    const ROOT_MOUNTED: usize = 5;
    while next < wanted.len() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {:?}",
            wanted[next].0
        );
        let exited = child.try_wait().unwrap();
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        while next < wanted.len() && text.contains(wanted[next].1) {
            eprintln!(
                "{:>6.1} s: {}",
                started.elapsed().as_secs_f64(),
                wanted[next].0
            );
            next += 1;
        }
        if let Some(st) = exited {
            if next < wanted.len() || idle.is_none() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!(
                    "berth-vmm exited ({st}) before {:?}: {err}\nconsole tail:\n{}",
                    wanted.get(next).map_or("its metrics were read", |w| w.0),
                    tail(&text, 40)
                );
            }
            break;
        }
        if !checked_api && api_sock.exists() {
            let (code, body) = api(&api_sock, "GET", "/status");
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("\"state\":\"running\""), "{body}");
            assert_eq!(api(&api_sock, "GET", "/nope").0, 404);
            checked_api = true;
        }
        if idle.is_none() && next >= ROOT_MOUNTED {
            let rss = resident_kib(child.id(), 512 << 20);
            let (code, metrics) = api(&api_sock, "GET", "/metrics");
            assert_eq!(code, 200);
            idle = Some((rss, metrics));
            // vCPUs paused and resumed through the API (what the host
            // agent's clock keeper is told about): the console stays
            // still while paused and the boot goes on after.
            assert_eq!(api(&api_sock, "PUT", "/pause").0, 202);
            std::thread::sleep(Duration::from_millis(300));
            let st: serde_json::Value =
                serde_json::from_str(&api(&api_sock, "GET", "/status").1).unwrap();
            assert_eq!(st["paused"], true, "{st}");
            let out = |m: &str| {
                serde_json::from_str::<serde_json::Value>(m).unwrap()["serial"]["bytes_out"]
                    .as_u64()
                    .unwrap()
            };
            let a = out(&api(&api_sock, "GET", "/metrics").1);
            std::thread::sleep(Duration::from_millis(1500));
            let b = out(&api(&api_sock, "GET", "/metrics").1);
            assert_eq!(a, b, "the guest wrote to its console while paused");
            // A client waiting for resumes (the host agent's clock
            // keeper) is answered at the resume, not at its next look.
            let waiter = {
                let sock = api_sock.clone();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let r = api(&sock, "GET", "/resumes?after=0");
                    (r, t.elapsed())
                })
            };
            std::thread::sleep(Duration::from_millis(500));
            let asked = Instant::now();
            assert_eq!(api(&api_sock, "PUT", "/resume").0, 202);
            let ((code, body), waited) = waiter.join().unwrap();
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("\"resumes\":1"), "{body}");
            assert!(
                waited < Duration::from_secs(30),
                "the waiter was answered only by its timeout ({waited:?})"
            );
            eprintln!(
                "resume seen by a waiting client {:?} after PUT /resume was sent",
                asked.elapsed()
            );
            std::thread::sleep(Duration::from_millis(300));
            let st: serde_json::Value =
                serde_json::from_str(&api(&api_sock, "GET", "/status").1).unwrap();
            assert_eq!(st["paused"], false, "{st}");
            assert_eq!(st["resumes"], 1, "{st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Resident memory with every device attached and idle (the guest is
    // starting init), apart from guest RAM itself.
    let ((total, guest), metrics) = idle.expect("read once the root was mounted");
    eprintln!(
        "berth-vmm resident: {total} KiB, of which guest RAM {guest} KiB: {} KiB beyond guest memory",
        total - guest
    );
    eprintln!("metrics: {metrics}");
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert!(
        m["virtio"][0]["reads"].as_u64().unwrap() > 0,
        "the root was read through our virtio-blk"
    );
    assert!(m["serial"]["bytes_out"].as_u64().unwrap() > 1000);
    // The guest's virtio_net driver took our virtio-net (features
    // negotiated, queues set up, DRIVER_OK) before init ran.
    let device = |kind: u32| {
        m["virtio"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_type"] == kind)
            .unwrap_or_else(|| panic!("no virtio device of type {kind}: {m}"))
    };
    let net = device(1);
    assert_eq!(net["driver_ok"], 1, "{net}");
    assert_eq!(net["tx_malformed"], 0, "{net}");
    // Likewise the guest's virtio_fs driver took our virtio-fs (its tag and
    // queues read from our config space).
    let fs = device(26);
    assert_eq!(fs["driver_ok"], 1, "{fs}");
    // And its virtio_balloon driver took our balloon, with free page
    // reporting.
    let balloon = device(5);
    assert_eq!(balloon["driver_ok"], 1, "{balloon}");
    assert_eq!(balloon["reporting"], 1, "{balloon}");
    assert_eq!(balloon["refused"], 0, "{balloon}");

    let status = if real_kvm {
        // User space runs: ask for an orderly shutdown.
        assert_eq!(api(&api_sock, "PUT", "/shutdown").0, 202);
        wait(&mut child, Duration::from_secs(120))
    } else {
        // kvm_pvm can't deliver init's first syscall: the guest panics and
        // resets; berth-vmm reports a guest panic.
        wait(&mut child, Duration::from_secs(600))
    };
    let mut err = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_to_string(&mut err)
        .unwrap();
    // The loader took the path we meant: PVH note, or bzImage's 64-bit entry.
    let loaded_as = if format == Format::Pvh {
        "(Pvh)"
    } else {
        "(Linux64)"
    };
    assert!(
        err.contains(loaded_as),
        "expected a {loaded_as} entry: {err}"
    );
    if real_kvm {
        assert_eq!(status, Some(0), "{err}");
    } else {
        assert_eq!(status, Some(2), "exit code 2 = guest panic; stderr: {err}");
        assert!(err.contains("panicked"), "{err}");
    }
}

/// (resident KiB of the whole process, resident KiB of the mapping(s) of
/// exactly `guest_bytes`, i.e. guest RAM), from /proc/<pid>/smaps.
fn resident_kib(pid: u32, guest_bytes: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = (0, 0);
    let mut size_kib = 0;
    for line in smaps.lines() {
        let kib = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            size_kib = kib(line);
        } else if line.starts_with("Rss:") {
            let rss = kib(line);
            total += rss;
            if size_kib == guest_bytes >> 10 {
                guest += rss;
            }
        }
    }
    (total, guest)
}

fn wait(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn bad_settings_are_refused_before_anything_starts() {
    let bin = env!("CARGO_BIN_EXE_berth-vmm");
    let out = Command::new(bin)
        .args(["run", "--kernel", "/nonexistent/vmlinux"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel /nonexistent/vmlinux does not exist"),
        "{err}"
    );
    let exe = PathBuf::from(bin);
    let out = Command::new(bin)
        .args(["run", "--memory", "99999999", "--kernel"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("host's memory"));
    let out = Command::new(bin)
        .args(["run", "--cpus", "0", "--kernel"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cpus must be between 1"));
}

#[test]
fn shutdown_request_is_forced_after_its_timeout() {
    if !kvm_usable() {
        return;
    }
    let Some(dir) = berth_testkit::require_image() else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_berth-vmm");
    let scratch = Scratch::new("kvm-shutdown");
    let console = scratch.0.join("console.log");
    let api_sock = scratch.0.join("vmm.sock");
    // A kernel that never gets far enough to honour ctrl-alt-del: the
    // shutdown must still end the VM, after --shutdown-timeout.
    let mut child = Command::new(bin)
        .args([
            "run",
            "--ignore-probe",
            "--cpus",
            "1",
            "--memory",
            "256",
            "--shutdown-timeout",
            "2",
        ])
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 clearcpuid=141,151,154,295,308",
        ])
        .arg("--kernel")
        .arg(dir.join("test/vmlinux-pvm-test"))
        .arg("--console-log")
        .arg(&console)
        .arg("--api-socket")
        .arg(&api_sock)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("Linux version")
    {
        assert!(Instant::now() < deadline, "no banner");
        assert!(child.try_wait().unwrap().is_none(), "berth-vmm ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t0 = Instant::now();
    assert_eq!(api(&api_sock, "PUT", "/shutdown").0, 202);
    assert!(api(&api_sock, "GET", "/status").1.contains("shutting_down"));
    // A forced stop is not a power-off: exit code 5, and it says so.
    assert_eq!(wait(&mut child, Duration::from_secs(60)), Some(5));
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "forced only after the timeout"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("stopped it by force"), "{err}");
}

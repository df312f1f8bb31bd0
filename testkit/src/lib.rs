//! Booting the real guest image under QEMU for end-to-end tests.
//!
//! Needs `qemu-system-x86_64` and the artifacts of `guest-image/build.sh`.
//! Where either is missing the tests print a loud SKIPPED line, unless
//! `BERTH_E2E_REQUIRED=1` (set by the CI script) turns that into a failure.

pub mod pty;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where `guest-image/build.sh` put the artifacts.
pub fn image_dir() -> PathBuf {
    std::env::var_os("BERTH_GUEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-image"))
}

/// Returns the image directory, or None after printing why the test is
/// skipped. Panics instead when skips are not allowed.
pub fn require_image() -> Option<PathBuf> {
    let dir = image_dir();
    let mut missing = Vec::new();
    if !dir.join("manifest.json").exists() {
        missing.push(format!(
            "guest image at {} (run guest-image/build.sh)",
            dir.display()
        ));
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("qemu-system-x86_64 (apt-get install qemu-system-x86)".into());
    }
    if missing.is_empty() {
        return Some(dir);
    }
    let msg = format!("missing: {}", missing.join("; "));
    if std::env::var("BERTH_E2E_REQUIRED").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("\n*** SKIPPED (needs QEMU and the guest image): {msg} ***\n");
    None
}

/// The manifest's default kernel command line and root image name.
pub fn manifest(dir: &Path) -> (String, String) {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    (
        m["cmdline"].as_str().unwrap().to_owned(),
        m["rootfs"]["file"].as_str().unwrap().to_owned(),
    )
}

/// Whether QEMU can use KVM here for a stock Linux guest. This machine's
/// `/dev/kvm` (kvm_pvm) cannot, so the default is TCG unless asked.
fn accel() -> &'static str {
    if std::env::var("BERTH_QEMU_ACCEL").as_deref() == Ok("kvm") {
        "kvm"
    } else {
        "tcg,thread=single"
    }
}

/// A guest booted under QEMU, its console captured line by line.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
    pub started: Instant,
    monitor: PathBuf,
    pub console_log: PathBuf,
}

/// What to attach to a boot.
#[derive(Debug)]
pub struct Boot<'a> {
    pub dir: &'a Path,
    pub work: &'a Path,
    pub data_disk: Option<&'a Path>,
    pub extra_disk: Option<&'a Path>,
    pub extra_cmdline: &'a str,
    pub name: &'a str,
    /// A vhost-user vsock backend's socket to attach (guest CID 3).
    pub vhost_user_vsock: Option<&'a Path>,
}

impl Guest {
    pub fn boot(b: Boot<'_>) -> Guest {
        let (cmdline, rootfs) = manifest(b.dir);
        let monitor = b.work.join(format!("{}.monitor", b.name));
        let console_log = b.work.join(format!("{}.console.log", b.name));
        let _ = std::fs::remove_file(&monitor);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
            "-accel",
            accel(),
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            // microvm has no keyboard controller by default; the host sends
            // ctrl-alt-del through this one.
            "-device",
            "i8042",
            "-monitor",
        ])
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-kernel")
        .arg(b.dir.join("vmlinux"))
        .arg("-append")
        .arg(format!("{cmdline} {}", b.extra_cmdline));
        if let Some(sock) = b.vhost_user_vsock {
            // vhost-user needs the guest's memory shared with the backend.
            cmd.args([
                "-object",
                "memory-backend-memfd,id=mem,size=1024M,share=on",
                "-machine",
                "memory-backend=mem",
            ]);
            cmd.arg("-chardev")
                .arg(format!("socket,id=vsock0,path={}", sock.display()));
            cmd.args(["-device", "vhost-user-vsock-device,chardev=vsock0"]);
        }
        let mut disks = vec![(b.dir.join(&rootfs), true)];
        disks.extend(b.data_disk.map(|d| (d.to_owned(), false)));
        disks.extend(b.extra_disk.map(|d| (d.to_owned(), true)));
        for (i, (path, ro)) in disks.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "id=d{i},file={},format=raw,if=none,readonly={},discard=unmap",
                path.display(),
                if *ro { "on" } else { "off" }
            ));
            cmd.arg("-device")
                .arg(format!("virtio-blk-device,drive=d{i}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("starting qemu-system-x86_64");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let l2 = lines.clone();
        let log_path = console_log.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                l2.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines,
            rx,
            started,
            monitor,
            console_log,
        }
    }

    /// Waits for a console line containing `needle`; returns it and the
    /// host wall time since QEMU started.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> (String, Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return (line, self.started.elapsed()),
                Ok(_) => {}
                Err(_) => panic!(
                    "no console line containing {needle:?} within {timeout:?}; console:\n{}",
                    self.tail(60)
                ),
            }
        }
    }

    /// Waits for QEMU to exit by itself; returns its exit status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader thread drain the pipe.
                std::thread::sleep(Duration::from_millis(200));
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "QEMU did not exit within {timeout:?}; console:\n{}",
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a QEMU monitor command (e.g. `sendkey ctrl-alt-delete`).
    pub fn monitor(&self, command: &str) {
        let mut s = std::os::unix::net::UnixStream::connect(&self.monitor).expect("monitor socket");
        writeln!(s, "{command}").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }

    pub fn console(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn tail(&self, n: usize) -> String {
        let l = self.lines.lock().unwrap();
        l[l.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `uptime_ms=` of a milestone line.
pub fn uptime_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("uptime_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no uptime_ms in {line:?}"))
}

/// A tar of a busybox-static root filesystem, for `docker import` (no
/// registry is reachable from CI): every applet, `/etc/passwd` and
/// `/etc/group` with root and an unprivileged `app` (1000), `/tmp`, `/data`,
/// and `/www/index.html` for busybox httpd. The tree stays in
/// `work/bbroot`.
pub fn busybox_rootfs_tar(work: &Path) -> PathBuf {
    let root = work.join("bbroot");
    let tar = work.join("busybox-rootfs.tar");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "etc", "tmp", "www", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is needed (apt-get install busybox-static)");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    std::fs::write(root.join("www/index.html"), "hello from busybox httpd\n").unwrap();
    let st = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

/// A fresh sparse raw disk of `size` bytes.
pub fn sparse_disk(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A digest of a (sparse) file's contents: every data extent's offset and
/// bytes, found with SEEK_DATA/SEEK_HOLE so a 64 GiB sparse disk is read
/// in the time its allocated part takes. Equal digests: equal files.
pub fn data_digest(path: &Path) -> u64 {
    use std::hash::Hasher;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write_u64(len);
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        let Ok(start) = nix::unistd::lseek(f.as_fd(), pos, nix::unistd::Whence::SeekData) else {
            break; // no more data
        };
        let end = nix::unistd::lseek(f.as_fd(), start, nix::unistd::Whence::SeekHole)
            .unwrap_or(len as i64);
        h.write_i64(start);
        f.seek(SeekFrom::Start(start as u64)).unwrap();
        let mut left = (end - start) as usize;
        while left > 0 {
            let n = left.min(buf.len());
            f.read_exact(&mut buf[..n]).unwrap();
            h.write(&buf[..n]);
            left -= n;
        }
        pos = end;
    }
    h.finish()
}

/// A scratch directory that is removed at the end of the test.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("berth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("BERTH_KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Static network helpers for containers built from [`busybox_rootfs_tar`]
/// (whose nc has no UDP and forks per connection): `nettool echo PORT`
/// (UDP echo), `nettool send HOST PORT MSG` (one UDP exchange), `nettool
/// tcpecho PORT` (TCP echo without forking). Compiled with the host's C
/// compiler into `work`.
pub fn nettool(work: &Path) -> PathBuf {
    c_tool(work, "nettool")
}

/// Static file-system checks for containers on a bind mount (mmap reads,
/// flock and fcntl locks, fsync, a file past 4 GiB, O_APPEND, EROFS):
/// `fstool CMD FILE`, see `src/tools/fstool.c`.
pub fn fstool(work: &Path) -> PathBuf {
    c_tool(work, "fstool")
}

/// Compiles `src/tools/NAME.c` statically into `work/NAME`.
fn c_tool(work: &Path, name: &str) -> PathBuf {
    let out = work.join(name);
    let src = format!("{}/src/tools/{name}.c", env!("CARGO_MANIFEST_DIR"));
    let st = Command::new("cc")
        .args(["-static", "-O2", "-w", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) is needed: apt-get install build-essential");
    assert!(st.success(), "compiling {src} failed");
    out
}

/// Reads from QEMU's human monitor until its prompt, at most 10 s.
fn until_prompt(s: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    let t0 = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"(qemu) ") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "QEMU's monitor gave no prompt: {:?}",
            String::from_utf8_lossy(&got)
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("QEMU's monitor closed the connection"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading QEMU's monitor: {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Runs `cmd` on QEMU's human monitor at `sock` (one client at a time),
/// waiting for its answer; for `stop` and `cont` checks with `info
/// status` that the VM is then paused or running.
pub fn qemu_monitor(sock: &Path, cmd: &str) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("QEMU's monitor");
    s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    until_prompt(&mut s); // the banner
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    until_prompt(&mut s);
    let want = match cmd {
        "stop" => "paused",
        "cont" => "running",
        _ => return,
    };
    s.write_all(b"info status\n").unwrap();
    let st = until_prompt(&mut s);
    assert!(
        st.contains(&format!("VM status: {want}")),
        "after `{cmd}` QEMU says: {st:?}"
    );
}

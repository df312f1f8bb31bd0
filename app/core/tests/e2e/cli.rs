//! The `berth` CLI itself.

use std::time::Duration;

use berth_testkit::pty::PtySession;

use super::{ok, Case, Ctx};

pub const CASES: &[Case] = &[
    ("cli_status_json", status_json),
    ("cli_start_when_running", start_when_running),
    ("cli_second_host_agent_refused", second_host_agent_refused),
    ("cli_second_vmm_on_disk_refused", second_vmm_refused),
    ("cli_docker_context", docker_context),
    ("cli_config_get_set", config_get_set),
    ("cli_logs", logs),
    ("cli_shell_command", shell_command),
    ("cli_shell_pty", shell_pty),
    ("cli_start_failure_reports_and_cleans_up", start_failure),
    ("cli_unusable_driver_is_explained", unusable_driver),
    ("cli_missing_passt_is_explained", missing_passt),
    ("cli_works_without_docker_cli", without_docker_cli),
    ("cli_vmm_driver_arguments_accepted", vmm_driver_arguments),
    ("cli_closed_stdout_ends_quietly", closed_stdout),
];

fn status_json(ctx: &Ctx) {
    let s = ctx.status();
    assert_eq!(s["state"], "running", "{s}");
    for key in [
        "driver",
        "pid",
        "uptime_s",
        "cpus",
        "memory_mib",
        "docker_socket",
        "docker_version",
        "boot_ms",
    ] {
        assert!(!s[key].is_null(), "status lacks {key}: {s}");
    }
    // Which driver auto picks follows the hypervisor probe.
    let probe = std::process::Command::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_berth")).with_file_name("berth-vmm"),
    )
    .arg("probe")
    .output()
    .expect("berth-vmm probe");
    if !probe.status.success() {
        assert_eq!(s["driver"], "qemu-tcg", "{s}");
        assert!(s["driver_reason"].as_str().unwrap().contains("TCG"));
    }
    let sock = std::path::PathBuf::from(s["docker_socket"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "docker.sock mode");
    let dmode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode, 0o700, "state dir mode");
    let human = ctx.berth_ok(&["status"]);
    assert!(human.contains("state:          running"), "{human}");
    assert!(human.contains("docker context: berth"), "{human}");
}

fn start_when_running(ctx: &Ctx) {
    let out = ctx.berth_ok(&["start"]);
    assert!(out.contains("already running"), "{out}");
}

fn second_host_agent_refused(ctx: &Ctx) {
    let out = ctx
        .berth_cmd(&["host-agent", "--state-dir"])
        .arg(&ctx.state)
        .arg("--image-dir")
        .arg(&ctx.image_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds") && err.contains("lock"), "{err}");
    assert_eq!(ctx.status()["state"], "running");
}

fn second_vmm_refused(ctx: &Ctx) {
    let vmm = std::path::Path::new(env!("CARGO_BIN_EXE_berth")).with_file_name("berth-vmm");
    let out = std::process::Command::new(vmm)
        .args(["run", "--ignore-probe", "--kernel"])
        .arg(ctx.image_dir.join("vmlinux"))
        .arg("--data-disk")
        .arg(ctx.state.join("data.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
}

fn docker_context(ctx: &Ctx) {
    let ls = ctx.docker_ok(&[
        "context",
        "ls",
        "--format",
        "{{.Name}} {{.Current}} {{.DockerEndpoint}}",
    ]);
    let berth = ls
        .lines()
        .find(|l| l.starts_with("berth "))
        .expect("berth context");
    assert!(berth.contains("true"), "{ls}");
    assert!(berth.contains("docker.sock"), "{ls}");
    // Other contexts are left alone.
    assert!(ls.lines().any(|l| l.starts_with("default ")), "{ls}");
    assert_eq!(ctx.docker_ok(&["context", "show"]).trim(), "berth");
}

fn config_get_set(ctx: &Ctx) {
    assert_eq!(ctx.berth_ok(&["config", "get", "cpus"]).trim(), "2");
    let out = ctx.berth(&["config", "set", "cpus", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpus: 0 is out of range"));
    let out = ctx.berth(&["config", "set", "memory_mib", "lots"]);
    assert!(!out.status.success());
    let out = ctx.berth(&["config", "set", "disk_gib", "8"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot shrink"),
        "{out:?}"
    );
    let was = ctx.berth_ok(&["config", "get", "memory_mib"]);
    let other = if was.trim() == "2048" { "2560" } else { "2048" };
    let out = ctx.berth_ok(&["config", "set", "memory_mib", other]);
    assert!(out.contains("berth restart"), "{out}");
    // Put back: later cases restart the VM, and the hygiene cases need
    // the suite's memory size.
    ctx.berth_ok(&["config", "set", "memory_mib", was.trim()]);
    let all = ctx.berth_ok(&["config", "get"]);
    assert!(all.contains("driver = auto"), "{all}");
}

fn logs(ctx: &Ctx) {
    let out = ctx.berth_ok(&["logs"]);
    assert!(out.contains("berth-agent: docker-ready"), "{out}");
    let tail = ctx.berth_ok(&["logs", "-n", "3"]);
    assert!(tail.lines().count() <= 3, "{tail}");
    // -f follows: a line the guest prints now shows up.
    let mut follow = ctx
        .berth_cmd(&["logs", "-f", "-n", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    // A watchdog: if the marker never comes, end `logs -f` so the read ends.
    let pid = nix::unistd::Pid::from_raw(follow.id() as i32);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    ctx.berth_ok(&[
        "shell",
        "--",
        "sh",
        "-c",
        "echo berth-logs-follow-marker > /dev/console",
    ]);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let found = lines.any(|l| l.is_ok_and(|l| l.contains("berth-logs-follow-marker")));
    let _ = done_tx.send(());
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(found, "berth logs -f did not show the new console line");
}

fn shell_command(ctx: &Ctx) {
    let out = ctx.berth(&[
        "shell",
        "--",
        "sh",
        "-c",
        "echo out-$((40+2)); echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-42\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let out = ok(
        ctx.berth(&["shell", "--", "cat", "/proc/1/comm"]),
        "berth shell cat",
    );
    assert_eq!(out.trim(), "berth-agent");
    let out = ctx.berth(&["shell", "--", "no-such-program"]);
    assert!(!out.status.success());
}

fn shell_pty(ctx: &Ctx) {
    let mut s = PtySession::spawn(ctx.berth_cmd(&["shell"]));
    s.expect("#", Duration::from_secs(30));
    s.send("tty; echo answer-$((6*7))\n");
    s.expect("answer-42", Duration::from_secs(20));
    s.send("exit 5\n");
    assert_eq!(s.wait(Duration::from_secs(20)), 5);
    assert!(s.output().contains("/dev/pts/"), "{}", s.output());
}

/// A guest that cannot boot: `berth start` says why, shows the console,
/// and leaves no process behind.
fn start_failure(ctx: &Ctx) {
    ctx.berth_ok(&[
        "--vm",
        "broken",
        "config",
        "set",
        "cmdline_extra",
        "init=/no/such/init",
    ]);
    let out = ctx.berth(&["--vm", "broken", "start"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the VM failed to start"), "{err}");
    assert!(
        err.contains("last guest console lines") && err.contains("Kernel panic"),
        "{err}"
    );
    assert!(err.contains("Nothing is left running"), "{err}");
    let state = ctx.data_home.join("berth/broken");
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines().any(|l| l.contains(state.to_str().unwrap())),
        "processes left behind:\n{ps}"
    );
    assert!(!state.join("agent.sock").exists() && !state.join("docker.sock").exists());
    let s: serde_json::Value =
        serde_json::from_str(&ctx.berth_ok(&["--vm", "broken", "status", "--json"])).unwrap();
    assert_eq!(s["state"], "stopped");
    assert!(
        s["error"]
            .as_str()
            .unwrap_or("")
            .contains("exited during boot"),
        "{s}"
    );
}

/// Asking for a driver this host cannot run is refused with the reason.
fn unusable_driver(ctx: &Ctx) {
    let vmm = std::path::Path::new(env!("CARGO_BIN_EXE_berth")).with_file_name("berth-vmm");
    let probe = std::process::Command::new(vmm)
        .arg("probe")
        .output()
        .unwrap();
    if probe.status.success() {
        println!("    (this host can run berth-vmm: nothing to refuse)");
        return;
    }
    ctx.berth_ok(&["--vm", "novmm", "config", "set", "driver", "vmm"]);
    let out = ctx.berth(&["--vm", "novmm", "start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("driver vmm cannot run here") && err.contains("kvm"),
        "{err}"
    );
}

/// Without passt, `berth start` refuses before anything starts and says
/// how to install it.
fn missing_passt(ctx: &Ctx) {
    let out = ctx
        .berth_cmd(&["--vm", "nopasst", "start"])
        .env("PATH", "/nonexistent")
        .env_remove("BERTH_PASST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("passt was not found") && err.contains("apt-get install passt"),
        "{err}"
    );
    let state = ctx.data_home.join("berth/nopasst");
    assert!(!state.join("agent.sock").exists(), "nothing started");
    let pids = std::fs::read_to_string(state.join("vm.pids")).unwrap_or_default();
    assert!(pids.is_empty(), "nothing started: {pids}");
}

/// Without a docker CLI on PATH Berth still answers and says how to get one.
fn without_docker_cli(ctx: &Ctx) {
    let out = ctx
        .berth_cmd(&["status"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let text = ok(out, "berth status without docker");
    assert!(text.contains("state:          running"), "{text}");
    assert!(
        text.contains("docker CLI is not installed") && text.contains("apt-get install"),
        "{text}"
    );
}

/// The `vmm` driver can't boot Linux here, but berth-vmm must accept every
/// argument the driver passes: it gets as far as validating the files.
fn vmm_driver_arguments(ctx: &Ctx) {
    use berth_core::driver::{vmm::run_args, Image, MachineSpec};
    let state = berth_core::paths::StateDir::at(ctx.work.join("vmm-args"));
    let spec = MachineSpec {
        image: Image::load(&ctx.image_dir).unwrap(),
        state: state.clone(),
        cpus: 1,
        memory_mib: 512,
        cmdline_extra: "quiet".into(),
        fresh_disk: true,
        console_log_max: 1 << 20,
        net: Some(berth_proto::NetConfig::berth_default(false)),
        shares: vec![
            berth_proto::share::ShareSpec {
                tag: "share0".into(),
                path: ctx.work.display().to_string(),
                read_only: false,
            },
            berth_proto::share::ShareSpec {
                tag: "share1".into(),
                path: std::env::temp_dir().display().to_string(),
                read_only: true,
            },
        ],
    };
    let args = run_args(&spec);
    let vmm = std::path::Path::new(env!("CARGO_BIN_EXE_berth")).with_file_name("berth-vmm");
    let out = std::process::Command::new(vmm)
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{} does not exist", state.data_disk().display())),
        "berth-vmm should get to validating the data disk: {err}"
    );
}

/// `berth status | head -1`: the reader goes away; berth must not panic.
fn closed_stdout(ctx: &Ctx) {
    for args in [&["status"][..], &["config", "get"], &["start"]] {
        let mut child = ctx
            .berth_cmd(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running berth");
        // Nobody reads: the first write fails with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("waiting for berth");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "berth {args:?}: {err}");
        assert!(
            out.status.success(),
            "berth {args:?}: {:?} {err}",
            out.status
        );
    }
}

//! The harness and the context every case gets.

mod build;
mod cli;
mod compose;
mod containers;
mod faults;
mod hostnet;
mod hygiene;
mod network;
mod persistence;
mod ports;
mod shares;
mod socket;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use berth_testkit::{require_image, Scratch};

/// Everything a case needs: where the VM lives and how to run the clients.
pub struct Ctx {
    pub work: PathBuf,
    pub data_home: PathBuf,
    pub docker_config: PathBuf,
    pub image_dir: PathBuf,
    pub state: PathBuf,
}

impl Ctx {
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("XDG_DATA_HOME", &self.data_home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("BERTH_IMAGE_DIR", &self.image_dir)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null());
    }

    pub fn berth_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
        c.args(args);
        self.env(&mut c);
        c
    }

    pub fn docker_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.args(args);
        self.env(&mut c);
        c
    }

    pub fn berth(&self, args: &[&str]) -> Output {
        self.berth_cmd(args).output().expect("running berth")
    }

    /// Runs `berth`, asserts success, returns stdout.
    pub fn berth_ok(&self, args: &[&str]) -> String {
        ok(self.berth(args), &format!("berth {}", args.join(" ")))
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_cmd(args).output().expect("running docker")
    }

    /// Runs `docker`, asserts success, returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        ok(self.docker(args), &format!("docker {}", args.join(" ")))
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.berth_ok(&["status", "--json"])).expect("status JSON")
    }

    pub fn console(&self) -> String {
        // The console is raw serial output: not always valid UTF-8.
        String::from_utf8_lossy(&std::fs::read(self.state.join("console.log")).unwrap_or_default())
            .into_owned()
    }
}

/// Asserts a command succeeded and returns its stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it returns true.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not true after {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The local base image every case builds on.
pub const BB: &str = "berth-e2e/busybox:1";

pub type Case = (&'static str, fn(&Ctx));

/// Whether host program `program` is on PATH. Without it the case is
/// skipped with a loud line, or fails where the suite must run whole
/// (`BERTH_E2E_REQUIRED=1`).
pub fn have_program(program: &str, package: &str) -> bool {
    if berth_core::paths::find_on_path(program).is_some() {
        return true;
    }
    let msg = format!("{program} is not on PATH (apt-get install {package})");
    assert!(
        std::env::var("BERTH_E2E_REQUIRED").as_deref() != Ok("1"),
        "{msg}"
    );
    println!("*** SKIPPED: {msg} ***");
    false
}

/// In order: the later cases restart and kill the VM.
fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    v.extend(cli::CASES);
    v.extend(containers::CASES);
    v.extend(build::CASES);
    v.extend(socket::CASES);
    v.extend(compose::CASES);
    v.extend(network::CASES);
    v.extend(ports::CASES);
    v.extend(shares::CASES);
    v.extend(hygiene::CASES);
    v.extend(persistence::CASES);
    v.extend(faults::CASES);
    v
}

pub fn main() -> ExitCode {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in cases() {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let Some(image_dir) = require_image() else {
        return ExitCode::SUCCESS;
    };
    if Command::new("docker").arg("--version").output().is_err() {
        let msg = "the docker CLI is not on PATH";
        if std::env::var("BERTH_E2E_REQUIRED").as_deref() == Ok("1") {
            eprintln!("FAILED: {msg}");
            return ExitCode::FAILURE;
        }
        eprintln!("\n*** SKIPPED e2e_docker: {msg} ***\n");
        return ExitCode::SUCCESS;
    }
    let scratch = Scratch::new("e2e");
    let data_home = scratch.0.join("data");
    let ctx = Ctx {
        work: scratch.0.clone(),
        state: data_home.join("berth/default"),
        data_home,
        docker_config: scratch.0.join("docker-config"),
        image_dir,
    };
    std::fs::create_dir_all(&ctx.docker_config).unwrap();

    let selected: Vec<Case> = cases()
        .into_iter()
        .filter(|(n, _)| filter.as_deref().is_none_or(|f| n.contains(f)))
        .collect();
    println!(
        "\nrunning {} end-to-end cases against one Berth VM",
        selected.len()
    );
    // The VM's only DNS server during the suite: no query leaves this host.
    let dns = hostnet::start_dns();
    ctx.berth_ok(&["config", "set", "dns_servers", &dns.to_string()]);
    // Shared folders: the defaults (home, temp dir) and a read-only one.
    let shares = shares::setting(&ctx.work);
    ctx.berth_ok(&["config", "set", "shares", &shares]);
    // Room for a container that touches 2 GiB (hygiene_memory_given_back).
    ctx.berth_ok(&["config", "set", "memory_mib", "3072"]);
    println!("setup: shared folders {shares}");
    println!(
        "setup: test resolver on {dns} ({} and below)",
        hostnet::ZONE
    );
    let t0 = Instant::now();
    let out = ctx.berth(&["start"]);
    println!(
        "setup: berth start ({:.1} s)\n{}{}",
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    if !out.status.success() {
        eprintln!("FAILED: berth start\n{}", ctx.console());
        return ExitCode::FAILURE;
    }
    let (base, _) = {
        let tar = berth_testkit::busybox_rootfs_tar(&ctx.work);
        let o = ctx.docker_ok(&[
            "import",
            "--change",
            "CMD [\"/bin/sh\"]",
            tar.to_str().unwrap(),
            BB,
        ]);
        (o, ())
    };
    println!("setup: imported {BB} ({})", base.trim());
    // The guest clock's offset, read every 30 s until the hygiene cases.
    hygiene::start_watch(&ctx);

    let mut failed = Vec::new();
    for (name, f) in &selected {
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&ctx)));
        let secs = t.elapsed().as_secs_f64();
        match r {
            Ok(()) => println!("case {name} ... ok ({secs:.1} s)"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("case {name} ... FAILED ({secs:.1} s)\n{msg}");
                failed.push(*name);
            }
        }
    }
    let stop = ctx.berth(&["stop", "--force"]);
    println!(
        "teardown: berth stop: {}",
        String::from_utf8_lossy(&stop.stdout).trim()
    );
    println!(
        "\n{} passed, {} failed in {:.0} s",
        selected.len() - failed.len(),
        failed.len(),
        t0.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed: {}", failed.join(", "));
        println!(
            "--- last console lines ---\n{}",
            berth_core::lifecycle::tail(&ctx.state.join("console.log"), 30)
        );
        ExitCode::FAILURE
    }
}

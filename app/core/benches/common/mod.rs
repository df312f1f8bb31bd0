//! What the benchmarks that boot a VM share: a scratch state directory
//! and the clients run against it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A Berth VM in a scratch directory of its own.
pub struct ScratchVm {
    pub work: PathBuf,
    pub data_home: PathBuf,
    pub docker_config: PathBuf,
}

impl ScratchVm {
    /// A fresh scratch directory named for `name`; nothing started yet.
    pub fn new(name: &str) -> ScratchVm {
        let work = std::env::temp_dir().join(format!("berth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let vm = ScratchVm {
            data_home: work.join("data"),
            docker_config: work.join("docker-config"),
            work,
        };
        std::fs::create_dir_all(&vm.docker_config).unwrap();
        vm
    }

    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env("XDG_DATA_HOME", &self.data_home)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null());
        c
    }

    /// Runs a client to completion, asserting success; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program, args).output().expect("spawn");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Points the VM's resolver at a loopback port nobody answers on, so
    /// nothing in the VM resolves (or reaches) anything outside this
    /// machine. Keep the socket for as long as the VM runs.
    pub fn no_outside_dns(&self) -> std::net::UdpSocket {
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        self.berth(&[
            "config",
            "set",
            "dns_servers",
            &dead.local_addr().unwrap().to_string(),
        ]);
        dead
    }

    pub fn berth(&self, args: &[&str]) -> String {
        self.run(env!("CARGO_BIN_EXE_berth"), args)
    }

    pub fn docker(&self, args: &[&str]) -> String {
        self.run("docker", args)
    }
}

impl Drop for ScratchVm {
    fn drop(&mut self) {
        // A bench that panicked must not leave its VM running (a stray
        // TCG guest takes CPU from every later measurement).
        let _ = self
            .cmd(env!("CARGO_BIN_EXE_berth"), &["stop", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

//! The host agent's logs, both capped in size and rotated:
//!
//! * `host-agent.log`: the host agent's stdout and stderr go through a
//!   pipe that a thread drains into the file, so every child that inherits
//!   them (QEMU, the vhost-user backend, berth-vmm) is capped too, and so is
//!   a panic message;
//! * `console.log` under QEMU: QEMU writes the guest console to
//!   `console.sock` and a thread writes it to the file (berth-vmm rotates
//!   its own console log).

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use berth_limits::{drain_to_log, RotatingLog};

/// The capture of this process's stdout and stderr.
#[derive(Debug)]
pub struct LogPipe {
    thread: Option<JoinHandle<()>>,
}

/// Sends fds 1 and 2 through a pipe into `path`, rotated at `max_bytes`.
pub fn capture_stdio(path: &Path, max_bytes: u64) -> std::io::Result<LogPipe> {
    let mut log = RotatingLog::open(path, max_bytes)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    nix::unistd::dup2_stdout(&write)?;
    nix::unistd::dup2_stderr(&write)?;
    drop(write);
    let thread = std::thread::Builder::new()
        .name("host-agent-log".into())
        .spawn(move || {
            drain_to_log(std::fs::File::from(read), &mut log);
            let _ = log.flush();
        })?;
    Ok(LogPipe {
        thread: Some(thread),
    })
}

impl LogPipe {
    /// Closes this process's ends of the pipe and waits (briefly) until
    /// everything written so far is in the file. Children still holding
    /// the pipe (a VM process that outlives us) keep the thread alive; we
    /// do not wait for them.
    pub fn finish(mut self) {
        let _ = std::io::stderr().flush();
        let _ = std::io::stdout().flush();
        if let Ok(null) = std::fs::File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
        let Some(t) = self.thread.take() else { return };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
}

/// Listens on `sock` for QEMU's console connection and writes what it
/// sends to `log_path`, rotated at `max_bytes`, until QEMU closes it.
pub fn serve_console(sock: &Path, log_path: &Path, max_bytes: u64) -> std::io::Result<()> {
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock)?;
    let mut log = RotatingLog::open(log_path, max_bytes)?;
    std::thread::Builder::new()
        .name("console-log".into())
        .spawn(move || {
            // One connection: QEMU's, for the VM's life.
            if let Ok((stream, _)) = listener.accept() {
                drop(listener);
                drain_to_log(stream, &mut log);
            }
            let _ = log.flush();
        })?;
    Ok(())
}

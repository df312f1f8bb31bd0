//! Driving a program through a pseudo-terminal, as a person at a terminal
//! would: `docker run -it`, `docker exec -it`, `berth shell`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::{openpty, Winsize};

/// A program running on a new terminal.
#[derive(Debug)]
pub struct PtySession {
    child: std::process::Child,
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl PtySession {
    /// Starts `cmd` with a 24x80 terminal as its stdin, stdout and stderr.
    pub fn spawn(mut cmd: Command) -> PtySession {
        let ws = Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&ws), None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let dup = |f: &OwnedFd| Stdio::from(f.try_clone().expect("dup pty"));
        cmd.stdin(dup(&slave))
            .stdout(dup(&slave))
            .stderr(dup(&slave));
        let child = cmd.spawn().expect("spawning on a pty");
        drop(cmd);
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("dup master");
        let out = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every slave is closed: the program is gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        PtySession {
            child,
            master,
            output,
        }
    }

    /// Everything the program printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle`.
    pub fn expect(&self, needle: &str, timeout: Duration) {
        let t0 = Instant::now();
        while !self.output().contains(needle) {
            assert!(
                t0.elapsed() < timeout,
                "no {needle:?} on the terminal after {timeout:?}; got:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text`.
    pub fn send(&mut self, text: &str) {
        self.master
            .write_all(text.as_bytes())
            .expect("writing to the pty");
    }

    /// Waits for the program to exit and returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("waiting") {
                // Let the reader drain what is left.
                std::thread::sleep(Duration::from_millis(200));
                return st.code().unwrap_or(-1);
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "still running after {timeout:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

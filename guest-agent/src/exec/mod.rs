//! `Request::Exec`: a process run for the host, its stdio carried by exec
//! frames on the control connection (see `berth_proto::exec`).
//!
//! [`start`] checks the request and spawns the process through the
//! [`Reaper`], each in a new session (so its process group can be
//! signalled as a whole); the returned [`Session`] relays until it exits.

mod pty;
mod session;
#[cfg(test)]
mod tests;

pub use session::Session;

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use berth_proto::ExecRequest;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use crate::process::PATH;
use crate::reaper::Reaper;
use session::Io;

/// Why an exec request was refused or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("bad environment entry {0:?}: expected KEY=value")]
    BadEnv(String),
    #[error("arguments must not contain NUL bytes or be an empty program name")]
    BadArgv,
    #[error("working directory must be an absolute path: {0:?}")]
    RelativeCwd(String),
    #[error("no such directory: {0}")]
    NoCwd(String),
    #[error("no such program: {0}")]
    NoProgram(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot open a terminal: {0}")]
    Pty(std::io::Error),
    #[error("cannot relay the stdio of {program}: {source}")]
    Stdio {
        program: String,
        source: std::io::Error,
    },
}

/// The shell run for an empty `argv`.
fn login_shell() -> Vec<String> {
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    vec![shell.to_owned(), "-l".to_owned()]
}

/// Splits `KEY=value`; keys are printable ASCII without `=`.
fn parse_env(entry: &str) -> Option<(&str, &str)> {
    let (key, value) = entry.split_once('=')?;
    let key_ok = !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic());
    (key_ok && !value.contains('\0')).then_some((key, value))
}

/// At most 64 characters of something the host sent, for error messages.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks `req`, spawns its process and returns the session to relay it.
pub fn start(reaper: &Reaper, req: ExecRequest) -> Result<Session, ExecError> {
    let argv = if req.argv.is_empty() {
        login_shell()
    } else {
        req.argv
    };
    if argv[0].is_empty() || argv.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::BadArgv);
    }
    let mut env = Vec::with_capacity(req.env.len());
    for entry in &req.env {
        env.push(parse_env(entry).ok_or_else(|| ExecError::BadEnv(clip(entry)))?);
    }
    let cwd = req.cwd.as_deref().unwrap_or("/");
    if !cwd.starts_with('/') {
        return Err(ExecError::RelativeCwd(clip(cwd)));
    }
    // Checked here because a chdir failing in the child would be reported
    // like a missing program (both ENOENT).
    if !Path::new(cwd).is_dir() {
        return Err(ExecError::NoCwd(clip(cwd)));
    }

    let program = argv[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .current_dir(cwd);
    if req.tty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    let stdio_error = |source| ExecError::Stdio {
        program: clip(&program),
        source,
    };
    let master = match req.tty {
        Some(size) => {
            let pty = pty::open(size).map_err(ExecError::Pty)?;
            cmd.stdin(Stdio::from(pty.slave.try_clone().map_err(ExecError::Pty)?))
                .stdout(Stdio::from(pty.slave.try_clone().map_err(ExecError::Pty)?))
                .stderr(Stdio::from(pty.slave));
            Some(pty.master)
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let tty = master.is_some();
    // SAFETY: the hook runs in the forked child before exec and only makes
    // two system calls (setsid, ioctl) without allocating or taking locks,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if tty {
                pty::make_controlling_terminal()?;
            }
            Ok(())
        });
    }
    let (mut child, exited) = reaper.spawn(&mut cmd).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ExecError::NoProgram(clip(&program))
        } else {
            ExecError::Spawn {
                program: clip(&program),
                source,
            }
        }
    })?;
    // Closes the agent's copies of the terminal's slave: the master must
    // read EIO once the process and its children have closed theirs.
    drop(cmd);
    let pid = Pid::from_raw(child.id() as i32);
    let io = match master {
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays
        // open, and whose as_raw_fd() never changes, until it is dropped.
        Some(master) => unsafe { AsyncFd::register(master) }
            .map(Io::Pty)
            .map_err(std::io::Error::from),
        None => pipes(&mut child),
    };
    match io {
        Ok(io) => Ok(Session::new(pid, exited, io)),
        Err(source) => {
            let _ = killpg(pid, Signal::SIGKILL);
            Err(stdio_error(source))
        }
    }
}

/// The agent's ends of a piped child's stdio, made non-blocking.
fn pipes(child: &mut std::process::Child) -> std::io::Result<Io> {
    let missing = || std::io::Error::other("a stdio pipe was not created");
    let stdin = child.stdin.take().ok_or_else(missing)?;
    let stdout = child.stdout.take().ok_or_else(missing)?;
    let stderr = child.stderr.take().ok_or_else(missing)?;
    Ok(Io::Pipes {
        stdin: Some(pipe::Sender::from_owned_fd(OwnedFd::from(stdin))?),
        stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))?,
        stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr))?,
    })
}

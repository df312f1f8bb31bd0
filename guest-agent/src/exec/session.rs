//! Relaying a running exec process: its output to the host, the host's
//! input, resizes and signals to it, and finally its exit.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_proto::exec::MAX_EXEC_PAYLOAD;
use berth_proto::{read_exec_frame, write_exec_frame, ExecFrame, ExecFrameError, TermSize};
use nix::libc;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use super::pty;
use crate::reaper::Exit;

/// Once the process has exited, output still arriving (from children
/// that inherited its stdio) is relayed until none came for this long.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// How long to wait for a SIGKILLed process to be reaped before giving up
/// on it (the reaper still collects it later).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The exit code sent if the agent lost track of the process's status.
const LOST_EXIT: i32 = -1;

/// The agent's ends of the process's stdio.
#[derive(Debug)]
pub(super) enum Io {
    /// The pseudo-terminal's master: input and output in one.
    Pty(AsyncFd<OwnedFd>),
    Pipes {
        /// `None` once closed by `StdinEof` or a failed write.
        stdin: Option<pipe::Sender>,
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
}

/// A started process whose stdio is not relayed yet. Dropping it kills
/// the process group unless the process was seen to exit.
#[derive(Debug)]
pub struct Session {
    /// The process, leader of its own session and process group.
    pid: Pid,
    exited: oneshot::Receiver<Exit>,
    /// Set once `exited` delivered: the pid may be reused from then on, so
    /// its group is no longer signalled.
    leader_exited: AtomicBool,
    io: Io,
}

/// Why a session ended before its `Exit` frame was written.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the host closed the connection")]
    Closed,
    #[error("reading from the host failed: {0}")]
    Read(ExecFrameError),
    #[error("the host sent a {0} frame, which only the agent sends")]
    Unexpected(&'static str),
    #[error("writing to the host failed: {0}")]
    Write(ExecFrameError),
}

impl Session {
    pub(super) fn new(pid: Pid, exited: oneshot::Receiver<Exit>, io: Io) -> Session {
        Session {
            pid,
            exited,
            leader_exited: AtomicBool::new(false),
            io,
        }
    }

    /// Relays until the process has exited, its output is drained and the
    /// `Exit` frame is written. If the host goes away or breaks the
    /// protocol first, the process group is killed instead.
    pub async fn run<S>(mut self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let Session {
            pid,
            exited,
            leader_exited,
            io,
        } = &mut self;
        let (out, err, input) = match io {
            Io::Pty(master) => (Some(Source::Pty(master)), None, Input::Pty(master)),
            Io::Pipes {
                stdin,
                stdout,
                stderr,
            } => (
                Some(Source::Pipe(stdout)),
                Some(Source::Pipe(stderr)),
                Input::Pipe(stdin),
            ),
        };
        let ended = tokio::select! {
            r = relay_output(out, err, exited, leader_exited, &mut wr) => r.map_err(Cut::Write),
            cut = relay_input(&mut rd, input, *pid, leader_exited) => Err(cut),
        };
        if let Err(cut) = ended {
            tracing::debug!("exec session of pid {pid} cut short: {cut}");
            self.kill().await;
        }
    }

    /// SIGKILLs the process group (unless the process already exited) and
    /// waits, bounded, for the process to be reaped.
    pub async fn kill(&mut self) {
        if self.leader_gone() {
            return;
        }
        if let Err(e) = killpg(self.pid, Signal::SIGKILL) {
            tracing::debug!("killing exec process group {}: {e}", self.pid);
        }
        match tokio::time::timeout(KILL_WAIT, &mut self.exited).await {
            Ok(_) => self.leader_exited.store(true, Ordering::Relaxed),
            Err(_) => tracing::warn!(
                "exec process {} not reaped {KILL_WAIT:?} after SIGKILL",
                self.pid
            ),
        }
    }

    /// Whether the process is known to have exited; looks at the reaper's
    /// answer if it was not collected yet.
    fn leader_gone(&mut self) -> bool {
        if self.leader_exited.load(Ordering::Relaxed) {
            return true;
        }
        match self.exited.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => false,
            // Delivered, or the reaper is gone and cannot tell: either way
            // the pid can no longer be trusted to be ours.
            Ok(_) | Err(oneshot::error::TryRecvError::Closed) => {
                self.leader_exited.store(true, Ordering::Relaxed);
                true
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.leader_gone() {
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
    }
}

/// One output stream of the process.
enum Source<'a> {
    Pty(&'a AsyncFd<OwnedFd>),
    Pipe(&'a mut pipe::Receiver),
}

impl Source<'_> {
    /// Reads some output; 0 at its end.
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            // A master whose slave is closed by everyone reads EIO.
            Source::Pty(fd) => match read_fd(fd, buf).await {
                Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
                r => r,
            },
            Source::Pipe(p) => p.read(buf).await,
        }
    }
}

/// Reads from `source`, or never completes once it has ended.
async fn read_from(source: &mut Option<Source<'_>>, buf: &mut [u8]) -> io::Result<usize> {
    match source {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Output and the exit, process → host. Reads only while no write to the
/// host is pending, so a slow host slows the process down instead of
/// filling the agent's memory.
async fn relay_output<W>(
    mut out: Option<Source<'_>>,
    mut err: Option<Source<'_>>,
    exited: &mut oneshot::Receiver<Exit>,
    leader_exited: &AtomicBool,
    wr: &mut W,
) -> Result<(), ExecFrameError>
where
    W: AsyncWrite + Unpin,
{
    let mut out_buf = vec![0u8; MAX_EXEC_PAYLOAD];
    let mut err_buf = if err.is_some() {
        vec![0u8; MAX_EXEC_PAYLOAD]
    } else {
        Vec::new()
    };
    let mut code = None;
    loop {
        if out.is_none() && err.is_none() && code.is_some() {
            break;
        }
        let draining = code.is_some();
        let idle = async move {
            if draining {
                tokio::time::sleep(DRAIN_IDLE).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = read_from(&mut out, &mut out_buf) => match r {
                Ok(n) if n > 0 => {
                    write_exec_frame(wr, &ExecFrame::Stdout(out_buf[..n].to_vec())).await?
                }
                Ok(_) => out = None,
                Err(e) => {
                    tracing::debug!("reading exec output failed: {e}");
                    out = None;
                }
            },
            r = read_from(&mut err, &mut err_buf) => match r {
                Ok(n) if n > 0 => {
                    write_exec_frame(wr, &ExecFrame::Stderr(err_buf[..n].to_vec())).await?
                }
                Ok(_) => err = None,
                Err(e) => {
                    tracing::debug!("reading exec stderr failed: {e}");
                    err = None;
                }
            },
            exit = &mut *exited, if code.is_none() => {
                leader_exited.store(true, Ordering::Relaxed);
                code = Some(match exit {
                    Ok(Exit::Code(c)) => c,
                    Ok(Exit::Signal(s)) => 128 + s,
                    Err(_) => LOST_EXIT,
                });
            },
            // Children that inherited the output and keep it open (or keep
            // writing) must not hold the session open forever.
            () = idle => break,
        }
    }
    write_exec_frame(wr, &ExecFrame::Exit(code.unwrap_or(LOST_EXIT))).await
}

/// Where host input goes.
enum Input<'a> {
    Pty(&'a AsyncFd<OwnedFd>),
    Pipe(&'a mut Option<pipe::Sender>),
}

impl Input<'_> {
    async fn write(&mut self, data: &[u8]) {
        match self {
            Input::Pty(fd) => {
                if let Err(e) = write_fd(fd, data).await {
                    tracing::debug!("writing to the exec terminal failed: {e}");
                }
            }
            Input::Pipe(stdin) => {
                let Some(pipe) = stdin.as_mut() else {
                    return;
                };
                if let Err(e) = pipe.write_all(data).await {
                    // The process closed its stdin; drop further input.
                    tracing::debug!("writing exec stdin failed: {e}");
                    **stdin = None;
                }
            }
        }
    }

    async fn eof(&mut self) {
        match self {
            Input::Pty(_) => self.write(&[pty::EOF_CHAR]).await,
            Input::Pipe(stdin) => **stdin = None,
        }
    }

    fn resize(&self, size: TermSize) {
        if let Input::Pty(fd) = self {
            if let Err(e) = pty::set_size(fd.get_ref().as_fd(), size) {
                tracing::debug!("resizing the exec terminal failed: {e}");
            }
        }
    }
}

/// Host → process, until the host closes or breaks the protocol (a
/// session never ends here by itself).
async fn relay_input<R>(
    rd: &mut R,
    mut input: Input<'_>,
    pid: Pid,
    leader_exited: &AtomicBool,
) -> Cut
where
    R: AsyncRead + Unpin,
{
    loop {
        let frame = match read_exec_frame(rd).await {
            Ok(f) => f,
            Err(ExecFrameError::Closed) => return Cut::Closed,
            Err(e) => return Cut::Read(e),
        };
        match frame {
            ExecFrame::Stdin(data) => input.write(&data).await,
            ExecFrame::StdinEof => input.eof().await,
            ExecFrame::Resize { rows, cols } => input.resize(TermSize { rows, cols }),
            ExecFrame::Signal(n) => signal_group(pid, n, leader_exited),
            ExecFrame::Stdout(_) => return Cut::Unexpected("stdout"),
            ExecFrame::Stderr(_) => return Cut::Unexpected("stderr"),
            ExecFrame::Exit(_) => return Cut::Unexpected("exit"),
        }
    }
}

/// Delivers signal number `n` to the process group while its leader lives.
fn signal_group(pid: Pid, n: i32, leader_exited: &AtomicBool) {
    if leader_exited.load(Ordering::Relaxed) {
        return;
    }
    match Signal::try_from(n) {
        Ok(sig) => {
            if let Err(e) = killpg(pid, sig) {
                tracing::debug!("signal {n} to exec process group {pid}: {e}");
            }
        }
        Err(_) => tracing::debug!("ignoring unknown signal number {n} for exec"),
    }
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        if let Ok(r) =
            guard.try_io(|f| nix::unistd::read(f.get_ref(), buf).map_err(io::Error::from))
        {
            return r;
        }
    }
}

async fn write_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|f| nix::unistd::write(f.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

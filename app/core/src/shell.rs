//! `berth shell`: a process in the guest, through the agent's exec request,
//! with the local terminal in raw mode when there is one.

use std::io::IsTerminal;
use std::path::Path;

use berth_proto::{read_exec_frame, write_exec_frame, ExecFrame, ExecRequest, TermSize};
use nix::sys::termios;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::guest::{GuestClient, GuestError};

/// Errors of a shell session.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("the session failed: {0}")]
    Exec(#[from] berth_proto::ExecFrameError),
    #[error("the guest closed the session without an exit status")]
    NoExit,
}

/// Restores the terminal when dropped.
struct RawMode {
    saved: termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), termios::SetArg::TCSANOW, &self.saved);
    }
}

fn term_size() -> Option<TermSize> {
    terminal_size::terminal_size_of(std::io::stdout()).map(|(w, h)| TermSize {
        rows: h.0,
        cols: w.0,
    })
}

/// Runs `argv` (empty: a login shell) in the guest and returns its exit code.
pub async fn run(vsock_sock: &Path, argv: Vec<String>) -> Result<i32, ShellError> {
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let tty = if interactive {
        Some(term_size().unwrap_or(TermSize { rows: 24, cols: 80 }))
    } else {
        None
    };
    let mut env = Vec::new();
    if let Ok(t) = std::env::var("TERM") {
        if tty.is_some() && !t.is_empty() && t.is_ascii() {
            env.push(format!("TERM={t}"));
        }
    }
    let client = GuestClient::connect(vsock_sock, "berth-shell").await?;
    let stream = client
        .exec(ExecRequest {
            argv,
            env,
            cwd: None,
            tty,
        })
        .await?;
    let _raw = if tty.is_some() {
        RawMode::enter()
    } else {
        None
    };
    let (mut rd, mut wr) = stream.into_split();

    // Everything the host sends goes through one writer task.
    let (tx, mut rx) = mpsc::channel::<ExecFrame>(16);
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_exec_frame(&mut wr, &f).await.is_err() {
                break;
            }
        }
        // Dropping the write half would shut the stream down, which the
        // agent takes as the host leaving: keep it open until the Exit.
        std::future::pending::<()>().await;
        drop(wr);
    });
    let stdin_tx = tx.clone();
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = stdin_tx.send(ExecFrame::StdinEof).await;
                    break;
                }
                Ok(n) => {
                    if stdin_tx
                        .send(ExecFrame::Stdin(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let resize_task = if tty.is_some() {
        let tx = tx.clone();
        Some(tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(s) = term_size() {
                    let f = ExecFrame::Resize {
                        rows: s.rows,
                        cols: s.cols,
                    };
                    if tx.send(f).await.is_err() {
                        break;
                    }
                }
            }
        }))
    } else {
        None
    };
    drop(tx);

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = loop {
        match read_exec_frame(&mut rd).await {
            Ok(ExecFrame::Stdout(d)) => {
                let _ = stdout.write_all(&d).await;
                let _ = stdout.flush().await;
            }
            Ok(ExecFrame::Stderr(d)) => {
                let _ = stderr.write_all(&d).await;
                let _ = stderr.flush().await;
            }
            Ok(ExecFrame::Exit(c)) => break Ok(c),
            Ok(_) => {}
            Err(berth_proto::ExecFrameError::Closed) => break Err(ShellError::NoExit),
            Err(e) => break Err(e.into()),
        }
    };
    stdin_task.abort();
    if let Some(t) = resize_task {
        t.abort();
    }
    writer.abort();
    code
}

/// What a process run with [`capture`] printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output beyond the limit was dropped.
    pub truncated: bool,
}

/// Runs `argv` in the guest without a terminal or stdin and collects its
/// output, keeping at most `limit` bytes of each stream (the process runs
/// to its end either way). Callers bound the time with a timeout; dropping
/// the future closes the connection, which kills the process.
pub async fn capture(
    vsock_sock: &Path,
    argv: Vec<String>,
    limit: usize,
) -> Result<Captured, ShellError> {
    let client = GuestClient::connect(vsock_sock, "berth-capture").await?;
    let stream = client
        .exec(ExecRequest {
            argv,
            env: Vec::new(),
            cwd: None,
            tty: None,
        })
        .await?;
    let (mut rd, mut wr) = stream.into_split();
    write_exec_frame(&mut wr, &ExecFrame::StdinEof).await?;
    let mut out = Captured {
        code: -1,
        stdout: Vec::new(),
        stderr: Vec::new(),
        truncated: false,
    };
    loop {
        let (buf, d) = match read_exec_frame(&mut rd).await {
            Ok(ExecFrame::Stdout(d)) => (&mut out.stdout, d),
            Ok(ExecFrame::Stderr(d)) => (&mut out.stderr, d),
            Ok(ExecFrame::Exit(c)) => {
                out.code = c;
                return Ok(out);
            }
            Ok(_) => continue,
            Err(berth_proto::ExecFrameError::Closed) => return Err(ShellError::NoExit),
            Err(e) => return Err(e.into()),
        };
        let room = limit.saturating_sub(buf.len());
        out.truncated |= d.len() > room;
        buf.extend_from_slice(&d[..d.len().min(room)]);
    }
}

//! Running short helper programs (mkfs, e2fsck, ip) to completion.

use std::process::{Command, Stdio};

use tokio::io::AsyncReadExt;

use crate::reaper::{Exit, Reaper};

/// The output of a finished helper.
#[derive(Debug)]
pub struct Output {
    pub exit: Exit,
    /// stdout and stderr, interleaved by stream (stdout first).
    pub text: String,
}

/// Failure to run a helper at all.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} vanished without an exit status")]
    Lost { program: String },
}

/// The PATH every program the agent starts gets.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `program args…` to completion, capturing its output.
pub async fn run(reaper: &Reaper, program: &str, args: &[&str]) -> Result<Output, ProcessError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exited) = reaper
        .spawn(&mut cmd)
        .map_err(|source| ProcessError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let stdout = child.stdout.take().map(read_all);
    let stderr = child.stderr.take().map(read_all);
    let mut text = String::new();
    if let Some(f) = stdout {
        text.push_str(&f.await);
    }
    if let Some(f) = stderr {
        text.push_str(&f.await);
    }
    let exit = exited.await.map_err(|_| ProcessError::Lost {
        program: program.to_owned(),
    })?;
    Ok(Output { exit, text })
}

/// Reads a child's pipe to its end on a blocking thread.
fn read_all<R: std::io::Read + Send + 'static>(
    mut pipe: R,
) -> impl std::future::Future<Output = String> {
    let handle = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    async move { handle.await.unwrap_or_default() }
}

/// Turns a child's pipe into an async reader.
pub fn async_pipe(
    fd: impl Into<std::os::fd::OwnedFd>,
) -> std::io::Result<impl tokio::io::AsyncRead + Unpin> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd.into())
}

/// Reads `reader` line by line, passing each (lossily decoded, capped at
/// 4 KiB) to `sink`, until EOF.
pub async fn for_each_line<R, F>(reader: R, mut sink: F)
where
    R: tokio::io::AsyncRead + Unpin,
    F: FnMut(&str),
{
    const MAX_LINE: usize = 4096;
    let mut reader = tokio::io::BufReader::new(reader);
    let mut line = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    loop {
        line.clear();
        let mut eof = false;
        loop {
            match reader.read(&mut byte).await {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < MAX_LINE => line.push(byte[0]),
                Ok(_) => {}
            }
        }
        if !line.is_empty() {
            sink(String::from_utf8_lossy(&line).trim_end_matches('\r'));
        }
        if eof {
            return;
        }
    }
}

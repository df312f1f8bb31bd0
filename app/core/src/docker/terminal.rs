//! An interactive shell in a container: an exec with a TTY, its output
//! streamed to a callback, its input written as it comes, resizes passed on.

use std::pin::Pin;

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::ResizeExecOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::containers::check_id;
use super::DockerError;

/// The shell: `bash` where the image has one, else `sh`.
const SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi";

/// One open terminal.
pub struct Terminal {
    exec_id: String,
    /// Behind a lock so a terminal can be shared between tasks.
    input: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal")
            .field("exec_id", &self.exec_id)
            .finish()
    }
}

/// Opens a shell in running container `id`, `cols`×`rows`; its output goes
/// to `on_output` (on a task of its own) until the shell exits, then
/// `on_exit` is called once.
pub async fn open(
    docker: &Docker,
    id: &str,
    cols: u16,
    rows: u16,
    mut on_output: impl FnMut(Vec<u8>) + Send + 'static,
    on_exit: impl FnOnce(Option<String>) + Send + 'static,
) -> Result<Terminal, DockerError> {
    check_id(id)?;
    let exec = docker
        .create_exec(
            id,
            CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(true),
                env: Some(vec!["TERM=xterm-256color"]),
                cmd: Some(vec!["/bin/sh", "-c", SHELL]),
                ..Default::default()
            },
        )
        .await?;
    let started = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                tty: true,
                output_capacity: None,
            }),
        )
        .await?;
    let StartExecResults::Attached { mut output, input } = started else {
        return Err(DockerError::Api("the exec started detached".into()));
    };
    let t = Terminal {
        exec_id: exec.id,
        input: tokio::sync::Mutex::new(input),
    };
    // The size can only be set once the exec runs.
    let _ = resize(docker, &t, cols, rows).await;
    tokio::spawn(async move {
        let mut why = None;
        while let Some(chunk) = output.next().await {
            match chunk {
                Ok(out) => on_output(out.into_bytes().to_vec()),
                Err(e) => {
                    why = Some(e.to_string());
                    break;
                }
            }
        }
        on_exit(why);
    });
    Ok(t)
}

impl Terminal {
    /// Sends keystrokes (or pasted text) to the shell.
    pub async fn write(&self, data: &[u8]) -> Result<(), DockerError> {
        let mut input = self.input.lock().await;
        input
            .write_all(data)
            .await
            .map_err(|e| DockerError::Api(format!("the terminal is closed: {e}")))?;
        input
            .flush()
            .await
            .map_err(|e| DockerError::Api(format!("the terminal is closed: {e}")))
    }

    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }
}

/// Tells the shell its window's size.
pub async fn resize(
    docker: &Docker,
    t: &Terminal,
    cols: u16,
    rows: u16,
) -> Result<(), DockerError> {
    let opts = ResizeExecOptionsBuilder::default()
        .w(i32::from(cols.max(1)))
        .h(i32::from(rows.max(1)))
        .build();
    Ok(docker.resize_exec(&t.exec_id, opts).await?)
}

//! The `berth` docker context: created or updated on start, made current
//! unless the config says not to. Other contexts are never touched.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::paths::find_on_path;

/// Name of Berth's context.
pub const CONTEXT: &str = "berth";

/// What happened to the context, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextOutcome {
    /// Created or updated; `current` says whether it is now the current one.
    Ready { current: bool },
    /// No `docker` CLI on PATH: nothing done.
    NoDockerCli,
    /// The docker CLI failed; the message says how.
    Failed(String),
}

fn docker() -> Option<std::path::PathBuf> {
    find_on_path("docker")
}

fn run(args: &[&str]) -> Result<String, String> {
    let docker = docker().ok_or_else(|| "docker CLI not found".to_owned())?;
    let out = Command::new(docker)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Points the `berth` context at `socket` and, if `make_current`, uses it.
pub fn install(socket: &Path, make_current: bool) -> ContextOutcome {
    if docker().is_none() {
        return ContextOutcome::NoDockerCli;
    }
    let host = format!("host=unix://{}", socket.display());
    let desc = "Berth: Docker in a lightweight VM";
    let exists = run(&["context", "inspect", CONTEXT]).is_ok();
    let r = if exists {
        run(&[
            "context",
            "update",
            CONTEXT,
            "--description",
            desc,
            "--docker",
            &host,
        ])
    } else {
        run(&[
            "context",
            "create",
            CONTEXT,
            "--description",
            desc,
            "--docker",
            &host,
        ])
    };
    if let Err(e) = r {
        return ContextOutcome::Failed(e);
    }
    if make_current {
        if let Err(e) = run(&["context", "use", CONTEXT]) {
            return ContextOutcome::Failed(e);
        }
    }
    ContextOutcome::Ready {
        current: current().as_deref() == Some(CONTEXT),
    }
}

/// The docker CLI's current context, if there is a CLI.
pub fn current() -> Option<String> {
    run(&["context", "show"]).ok()
}

/// How to install the docker CLI, for messages.
pub const INSTALL_HINT: &str = "the docker CLI is not installed; Berth works without it, but to use it install it (Debian/Ubuntu: apt-get install docker.io or docker-ce-cli; macOS: brew install docker)";

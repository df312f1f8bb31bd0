//! The Docker API on the forwarded socket, as the desktop app uses it:
//! containers, their events, logs, stats and terminals, images and
//! volumes. Everything goes
//! through `bollard`; nothing runs the `docker` CLI.

pub mod containers;
pub mod events;
pub mod images;
pub mod logs;
pub mod stats;
pub mod terminal;
pub mod volumes;

use std::time::Duration;

use bollard::Docker;

use crate::paths::StateDir;

/// How long one Docker API call may take before it fails (streams are not
/// bounded by it).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a Docker call failed, sorted by what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("the engine is not running: start it first")]
    EngineStopped,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("Docker: {0}")]
    Api(String),
}

impl DockerError {
    /// The stable code the UI keys on.
    pub fn code(&self) -> &'static str {
        match self {
            DockerError::EngineStopped => "engine_stopped",
            DockerError::NotFound(_) => "not_found",
            DockerError::Conflict(_) => "conflict",
            DockerError::Invalid(_) => "invalid",
            DockerError::Api(_) => "docker",
        }
    }
}

impl From<bollard::errors::Error> for DockerError {
    fn from(e: bollard::errors::Error) -> DockerError {
        use bollard::errors::Error as E;
        match e {
            E::DockerResponseServerError {
                status_code,
                message,
            } => match status_code {
                404 => DockerError::NotFound(message),
                409 => DockerError::Conflict(message),
                400 => DockerError::Invalid(message),
                _ => DockerError::Api(message),
            },
            E::SocketNotFoundError(_) => DockerError::EngineStopped,
            E::HyperResponseError { .. } | E::IOError { .. } => DockerError::EngineStopped,
            other => DockerError::Api(other.to_string()),
        }
    }
}

/// A client for the VM's forwarded socket, at the API version the engine
/// speaks (the guest's dockerd may be older than bollard's default).
pub async fn connect(state: &StateDir) -> Result<Docker, DockerError> {
    let sock = state.docker_sock();
    let path = sock.to_str().ok_or(DockerError::EngineStopped)?;
    let d = Docker::connect_with_unix(path, CALL_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)?;
    Ok(d.negotiate_version().await?)
}

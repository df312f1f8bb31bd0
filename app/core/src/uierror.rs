//! Errors as the desktop app shows them: a stable code the UI can act on
//! (offer Start for `engine_stopped`, Force for `conflict`) and a message a
//! person can act on.

use serde::Serialize;
use ts_rs::TS;

use crate::config::ConfigError;
use crate::docker::DockerError;
use crate::lifecycle::LifecycleError;

/// An error for the UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct UiError {
    /// Stable, snake_case: `engine_stopped`, `not_found`, `conflict`,
    /// `invalid`, `config`, `lifecycle`, `docker`, `io`.
    pub code: String,
    pub message: String,
    /// More for people who dig: the guest console's last lines when a
    /// start failed.
    pub detail: Option<String>,
}

impl UiError {
    pub fn new(code: &str, message: impl Into<String>) -> UiError {
        UiError {
            code: code.to_owned(),
            message: message.into(),
            detail: None,
        }
    }
}

impl std::fmt::Display for UiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for UiError {}

impl From<DockerError> for UiError {
    fn from(e: DockerError) -> UiError {
        UiError::new(e.code(), e.to_string())
    }
}

impl From<crate::troubleshoot::TroubleError> for UiError {
    fn from(e: crate::troubleshoot::TroubleError) -> UiError {
        match e {
            crate::troubleshoot::TroubleError::Lifecycle(l) => l.into(),
            e => UiError::new(e.code(), e.to_string()),
        }
    }
}

impl From<LifecycleError> for UiError {
    fn from(e: LifecycleError) -> UiError {
        let code = match &e {
            LifecycleError::StartFailed {
                console_tail,
                reason,
            } => {
                return UiError {
                    code: "start_failed".into(),
                    message: format!("the VM failed to start: {reason}"),
                    detail: Some(console_tail.clone()).filter(|t| !t.is_empty()),
                }
            }
            LifecycleError::Config(_) => "config",
            LifecycleError::Locked(_) => "locked",
            LifecycleError::StartTimeout(_) | LifecycleError::StopTimeout(_) => "timeout",
            _ => "lifecycle",
        };
        UiError::new(code, e.to_string())
    }
}

impl From<ConfigError> for UiError {
    fn from(e: ConfigError) -> UiError {
        UiError::new("config", e.to_string())
    }
}

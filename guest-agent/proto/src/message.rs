//! The messages themselves.

use serde::{Deserialize, Serialize};

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Opens a conversation; the agent answers with [`Response::Hello`].
    Hello {
        /// The highest protocol version the client speaks.
        protocol: u32,
        /// Free-form name of the client, for the agent's log.
        client: String,
    },
    /// Liveness check; answered with [`Response::Pong`] carrying `nonce`.
    Ping { nonce: u64 },
    /// Asks for [`Response::State`].
    GetState,
    /// Sets the guest's wall clock (e.g. after host sleep).
    SetClock {
        /// Nanoseconds since the Unix epoch, UTC.
        unix_nanos: u64,
    },
    /// Reads the guest's wall clock: answered with [`Response::Clock`].
    /// The host times the round trip to estimate the offset. Added in
    /// protocol 1 as an optional request.
    GetClock,
    /// Corrects the guest's wall clock by `offset_nanos` (positive: the
    /// guest is behind). With `step` the clock jumps at once; without it
    /// the kernel slews it (about 0.5 ms per second), so time never runs
    /// backwards for small corrections. Answered with [`Response::Ok`].
    /// Added in protocol 1 as an optional request.
    AdjustClock { offset_nanos: i64, step: bool },
    /// Orderly shutdown: containers stopped, disks flushed, power off.
    /// Answered with [`Response::Ok`] before the shutdown starts.
    Shutdown,
    /// Runs a process in the guest. Answered with [`Response::Ok`] once it
    /// started; the connection then carries exec frames (see
    /// [`crate::exec`]) until the process exits. Added in protocol 1 as an
    /// optional request: older agents answer `bad_request`.
    Exec(ExecRequest),
    /// Reports the ports running containers publish: answered at once with
    /// [`Response::Ports`], then again with the whole list whenever it
    /// changes, for as long as the connection lives (it carries nothing
    /// else from then on). Added in protocol 1 as an optional request.
    WatchPorts,
}

/// A process to run in the guest, as root, in a new session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`. Empty means
    /// the guest's login shell.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Extra environment, `KEY=value`, on top of a minimal default one.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; `/` if absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run on a new pseudo-terminal of this size (stdout and stderr are
    /// then one stream); without it, stdin/stdout/stderr are pipes.
    #[serde(default)]
    pub tty: Option<TermSize>,
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello(AgentInfo),
    Pong {
        nonce: u64,
    },
    State(AgentState),
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The guest's wall clock (see [`Request::GetClock`]).
    Clock {
        /// Nanoseconds since the Unix epoch, UTC.
        unix_nanos: u64,
    },
    /// Every port the running containers publish (see
    /// [`Request::WatchPorts`]).
    Ports {
        ports: Vec<crate::net::PublishedPort>,
    },
}

/// Who the agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The protocol version the agent will speak on this connection:
    /// the lower of the client's and its own.
    pub protocol: u32,
    pub agent_version: String,
    pub kernel_release: String,
}

/// Where the guest is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Mounting filesystems and preparing the data disk.
    Booting,
    /// containerd and dockerd are starting; `/_ping` has not answered yet.
    StartingDocker,
    /// dockerd answered `/_ping`.
    Ready,
    /// The agent will not start dockerd; see [`AgentState::error`].
    Failed,
    /// An orderly shutdown is under way.
    ShuttingDown,
}

/// State of the data disk that holds Docker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataDiskState {
    /// Not looked at yet.
    Pending,
    /// Formatted on this boot (it was blank).
    Formatted,
    /// Checked clean (or repaired) and mounted.
    Mounted,
    /// No data disk: Docker's state lives in memory and is lost at power off.
    Missing,
    /// Unusable and left untouched; dockerd is not started on it.
    Refused,
}

/// A snapshot of the agent's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub phase: Phase,
    pub uptime_ms: u64,
    /// Guest uptime at which dockerd first answered `/_ping`.
    pub docker_ready_uptime_ms: Option<u64>,
    pub data_disk: DataDiskState,
    /// Why the agent is in [`Phase::Failed`], if it is.
    pub error: Option<String>,
    /// How often each supervised daemon has been restarted.
    #[serde(default)]
    pub restarts: Vec<(String, u32)>,
}

/// A milestone pushed by the agent to the host's [`crate::EVENTS_PORT`]
/// listener, the same as its `berth-agent: <name> uptime_ms=…` console line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub name: String,
    pub uptime_ms: u64,
    #[serde(default)]
    pub fields: Vec<(String, String)>,
}

/// Stable error codes, for programs; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame or its JSON was malformed; the connection is closed next.
    BadRequest,
    /// The client's protocol version is not one the agent speaks.
    UnsupportedVersion,
    /// The request was valid but carrying it out failed.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Hello {
                protocol: 1,
                client: "berth".into()
            })
            .unwrap(),
            r#"{"type":"hello","protocol":1,"client":"berth"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::GetState).unwrap(),
            r#"{"type":"get_state"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::AdjustClock {
                offset_nanos: -5,
                step: false
            })
            .unwrap(),
            r#"{"type":"adjust_clock","offset_nanos":-5,"step":false}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Clock { unix_nanos: 7 }).unwrap(),
            r#"{"type":"clock","unix_nanos":7}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Error {
                code: ErrorCode::BadRequest,
                message: "x".into()
            })
            .unwrap(),
            r#"{"type":"error","code":"bad_request","message":"x"}"#
        );
    }

    /// The form shown in docs/guest-agent-protocol.md; absent fields take
    /// their defaults.
    #[test]
    fn exec_request_wire_format() {
        let req = Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["FOO=bar".into()],
            cwd: Some("/root".into()),
            tty: Some(TermSize { rows: 24, cols: 80 }),
        });
        let json = r#"{"type":"exec","argv":["sh","-c","echo hi"],"env":["FOO=bar"],"cwd":"/root","tty":{"rows":24,"cols":80}}"#;
        assert_eq!(serde_json::to_string(&req).unwrap(), json);
        assert_eq!(serde_json::from_str::<Request>(json).unwrap(), req);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"type":"exec"}"#).unwrap(),
            Request::Exec(ExecRequest {
                argv: Vec::new(),
                env: Vec::new(),
                cwd: None,
                tty: None,
            })
        );
    }
}

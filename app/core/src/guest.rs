//! Client of the guest agent's control port (protocol in `berth-proto`).

use std::path::Path;

use berth_proto::{
    read_frame, write_frame, AgentInfo, AgentState, ErrorCode, ExecRequest, FrameError, Request,
    Response, CONTROL_PORT, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;

use crate::vsock::{self, VsockError};

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("guest agent connection failed: {0}")]
    Frame(#[from] FrameError),
    #[error("guest agent refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("guest agent answered {0:?} unexpectedly")]
    Unexpected(Box<Response>),
}

/// The guest's published ports, as they change.
#[derive(Debug)]
pub struct PortsWatch {
    stream: UnixStream,
}

impl PortsWatch {
    /// The next full list (the first arrives at once). Not cancel-safe.
    pub async fn next(&mut self) -> Result<Vec<berth_proto::PublishedPort>, GuestError> {
        match read_frame(&mut self.stream).await? {
            Response::Ports { ports } => Ok(ports),
            Response::Error { code, message } => Err(GuestError::Refused { code, message }),
            other => Err(GuestError::Unexpected(Box::new(other))),
        }
    }
}

/// One reading of the guest's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// Guest minus host, in nanoseconds (positive: the guest is ahead).
    pub offset: i64,
    /// The round trip the reading took; the offset is good to half of it.
    pub rtt: std::time::Duration,
}

/// An open control connection.
#[derive(Debug)]
pub struct GuestClient {
    stream: UnixStream,
    pub info: AgentInfo,
}

impl GuestClient {
    /// Connects and says hello.
    pub async fn connect(vsock_sock: &Path, client: &str) -> Result<GuestClient, GuestError> {
        let stream = vsock::connect(vsock_sock, CONTROL_PORT).await?;
        let mut c = GuestClient {
            stream,
            info: AgentInfo {
                protocol: 0,
                agent_version: String::new(),
                kernel_release: String::new(),
            },
        };
        match c
            .call(&Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: client.to_owned(),
            })
            .await?
        {
            Response::Hello(info) => c.info = info,
            other => return Err(GuestError::Unexpected(Box::new(other))),
        }
        Ok(c)
    }

    async fn call(&mut self, req: &Request) -> Result<Response, GuestError> {
        write_frame(&mut self.stream, req).await?;
        match read_frame(&mut self.stream).await? {
            Response::Error { code, message } => Err(GuestError::Refused { code, message }),
            r => Ok(r),
        }
    }

    pub async fn state(&mut self) -> Result<AgentState, GuestError> {
        match self.call(&Request::GetState).await? {
            Response::State(s) => Ok(s),
            other => Err(GuestError::Unexpected(Box::new(other))),
        }
    }

    pub async fn set_clock_now(&mut self) -> Result<(), GuestError> {
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.expect_ok(&Request::SetClock { unix_nanos }).await
    }

    /// Reads the guest's clock once, timing the round trip.
    pub async fn clock_sample(&mut self) -> Result<ClockSample, GuestError> {
        let wall = std::time::SystemTime::now();
        let t0 = std::time::Instant::now();
        let reply = self.call(&Request::GetClock).await?;
        let rtt = t0.elapsed();
        let Response::Clock { unix_nanos } = reply else {
            return Err(GuestError::Unexpected(Box::new(reply)));
        };
        // Our clock half-way through the trip, against the guest's reading.
        let host = (wall + rtt / 2)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let offset = (i128::from(unix_nanos) - host).clamp(i64::MIN as i128, i64::MAX as i128);
        Ok(ClockSample {
            offset: offset as i64,
            rtt,
        })
    }

    /// Moves the guest clock by `offset_nanos`: stepped, or slewed.
    pub async fn adjust_clock(&mut self, offset_nanos: i64, step: bool) -> Result<(), GuestError> {
        self.expect_ok(&Request::AdjustClock { offset_nanos, step })
            .await
    }

    /// Asks for the orderly shutdown (containers stopped, disks flushed,
    /// power off). Returns once the agent accepted it.
    pub async fn shutdown(&mut self) -> Result<(), GuestError> {
        self.expect_ok(&Request::Shutdown).await
    }

    /// Starts a process; on success the stream now carries exec frames.
    pub async fn exec(mut self, req: ExecRequest) -> Result<UnixStream, GuestError> {
        self.expect_ok(&Request::Exec(req)).await?;
        Ok(self.stream)
    }

    /// Turns the connection into a stream of the guest's published ports.
    pub async fn watch_ports(mut self) -> Result<PortsWatch, GuestError> {
        write_frame(&mut self.stream, &Request::WatchPorts).await?;
        Ok(PortsWatch {
            stream: self.stream,
        })
    }

    async fn expect_ok(&mut self, req: &Request) -> Result<(), GuestError> {
        match self.call(req).await? {
            Response::Ok => Ok(()),
            other => Err(GuestError::Unexpected(Box::new(other))),
        }
    }
}

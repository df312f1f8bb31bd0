//! The host ⇄ guest-agent control protocol.
//!
//! Both sides link this crate: the guest agent serves it on vsock port
//! [`CONTROL_PORT`], the host agent speaks it as a client. Every message is
//! one *frame*: a 4-byte big-endian body length followed by that many bytes
//! of UTF-8 JSON. The client sends a [`Request`], the agent answers with
//! exactly one [`Response`], in order. The first request on a connection
//! should be [`Request::Hello`]; the agent answers any request whose framing
//! or JSON is malformed with [`Response::Error`] and then closes the
//! connection, since it can no longer trust where the next frame begins.
//!
//! See `docs/guest-agent-protocol.md` for the port map and examples.

pub mod exec;
mod frame;
mod message;
pub mod net;
pub mod share;
pub mod shutdown;

#[cfg(feature = "tokio")]
pub use exec::{read_exec_frame, write_exec_frame};
pub use exec::{ExecFrame, ExecFrameError};
pub use frame::{decode_body, decode_len, encode_frame, FrameError, HEADER_LEN, MAX_FRAME_LEN};
#[cfg(feature = "tokio")]
pub use frame::{read_frame, write_frame};
pub use message::{
    AgentInfo, AgentState, DataDiskState, ErrorCode, Event, ExecRequest, Phase, Request, Response,
    TermSize,
};
#[cfg(feature = "tokio")]
pub use net::read_dns_frame;
pub use net::{
    DnsFrame, DnsTransport, ForwardHeader, NetConfig, Proto, PublishedPort, DNS_PORT, FORWARD_PORT,
};

/// Version of the messages in [`message`]. Bumped on any incompatible change;
/// additive fields with serde defaults do not bump it.
pub const PROTOCOL_VERSION: u32 = 1;

/// vsock port of the agent's control channel (this protocol).
pub const CONTROL_PORT: u32 = 1024;

/// vsock port whose connections the agent joins to `/var/run/docker.sock`.
pub const DOCKER_PORT: u32 = 2375;

/// Host vsock port the agent connects to, if something listens there, to
/// push [`Event`] frames (boot milestones) as they happen.
pub const EVENTS_PORT: u32 = 1025;

/// vsock port of a byte echo service, only with `berth.echo=1` on the
/// kernel command line (transport tests and benchmarks).
pub const ECHO_PORT: u32 = 1099;

/// The CID a guest always has from the host's point of view in Berth VMs.
pub const GUEST_CID: u32 = 3;

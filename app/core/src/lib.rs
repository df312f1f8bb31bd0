//! Berth's VM lifecycle without a GUI, shared by the `berth` CLI and the
//! desktop app: settings, the state directory, machine drivers, the host
//! agent, the guest-agent client and the docker context.

pub mod bindings;
pub mod config;
pub mod context;
pub mod docker;
pub mod driver;
pub mod guest;
pub mod hostagent;
pub mod http;
pub mod lifecycle;
pub mod net;
pub mod paths;
pub mod shell;
pub mod status;
pub mod troubleshoot;
pub mod uierror;
pub mod vsock;

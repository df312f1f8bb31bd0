//! Bounds on what a peer (the guest, a local client) can make a Berth
//! process consume, shared by the host agent, `berth-vmm` and the guest
//! agent:
//!
//! * [`fds`]: the open-file limit, raised at start, and connection caps
//!   derived from the limit actually obtained;
//! * [`RateLimiter`]: log lines a peer can trigger, at most a burst per
//!   time window, with a count of what was suppressed;
//! * [`RotatingLog`]: log files capped in size, rotated to `<name>.1`.

#[cfg(unix)]
pub mod fds;
mod logfile;
mod rate;

pub use logfile::{drain_to_log, RotatingLog};
pub use rate::{RateLimiter, Suppressed};

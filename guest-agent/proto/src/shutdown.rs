//! One shutdown budget for every party: the guest agent's ordered
//! shutdown fits inside it, and whoever asks for a shutdown (the host
//! agent, `berth-vmm` on SIGTERM) waits this long before forcing the stop.

use std::time::Duration;

/// dockerd's grace: it stops each container with the container's stop
/// timeout (10 s by default, SIGTERM then SIGKILL) within its own 15 s
/// shutdown timeout; 35 s leaves room for a slow guest.
pub const DOCKERD_GRACE: Duration = Duration::from_secs(35);
/// containerd's grace after dockerd has gone.
pub const CONTAINERD_GRACE: Duration = Duration::from_secs(10);
/// Left-over processes between SIGTERM and SIGKILL.
pub const STRAGGLER_GRACE: Duration = Duration::from_secs(3);
/// Waiting for killed processes to be gone before unmounting.
pub const REAP_GRACE: Duration = Duration::from_secs(5);
/// Sync, unmount, power off.
pub const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// The guest agent's worst case from a shutdown request to power-off.
pub const GUEST_WORST_CASE: Duration = Duration::from_secs(
    DOCKERD_GRACE.as_secs()
        + CONTAINERD_GRACE.as_secs()
        + STRAGGLER_GRACE.as_secs()
        + REAP_GRACE.as_secs()
        + FLUSH_GRACE.as_secs(),
);

/// How long a VMM or the host agent waits for the guest to power off
/// after asking, before it stops the VM by force: the guest's worst case
/// plus room for a slow (emulated) guest.
pub const BUDGET: Duration = Duration::from_secs(GUEST_WORST_CASE.as_secs() + 30);

const _: () = assert!(BUDGET.as_secs() > GUEST_WORST_CASE.as_secs());

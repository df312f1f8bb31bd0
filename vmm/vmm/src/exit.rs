//! How a VM ends, and the process exit code for each way.

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (its power-off path with `reboot=k`).
    PowerOff,
    /// The guest did not power off within the shutdown budget after it
    /// was asked to, and the VMM stopped it: its disks may not be clean.
    ForcedStop,
    GuestPanic,
    TripleFault,
    Error(String),
}

impl ExitReason {
    /// The process exit code for this reason (documented in docs/vmm.md).
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::GuestPanic => 2,
            ExitReason::TripleFault => 3,
            ExitReason::Error(_) => 4,
            ExitReason::ForcedStop => 5,
        }
    }
}

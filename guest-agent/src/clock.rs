//! The guest's wall clock, as the host corrects it (`get_clock`,
//! `adjust_clock`, `set_clock` in the control protocol).
//!
//! The host agent measures the offset against its own clock and asks for a
//! step when it is large (after the host slept or the VM was paused) or a
//! slew when it is small, so that time seen by containers only jumps when
//! it has to.

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

/// The wall clock in nanoseconds since the Unix epoch.
pub fn now_nanos() -> nix::Result<u64> {
    let t = clock_gettime(ClockId::CLOCK_REALTIME)?;
    Ok(to_nanos(t))
}

fn to_nanos(t: TimeSpec) -> u64 {
    (t.tv_sec().max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec().max(0) as u64)
}

fn from_nanos(n: u64) -> TimeSpec {
    TimeSpec::new((n / 1_000_000_000) as i64, (n % 1_000_000_000) as i64)
}

/// Sets the wall clock.
pub fn set(unix_nanos: u64) -> nix::Result<()> {
    cancel_slew()?;
    clock_settime(ClockId::CLOCK_REALTIME, from_nanos(unix_nanos))
}

/// Largest correction taken: a larger one is a bug on the host side.
const MAX_OFFSET_NANOS: i64 = 100 * 365 * 86_400 * 1_000_000_000;
/// Largest slew: at 0.5 ms a second, half a second takes about 17 minutes.
const MAX_SLEW_NANOS: i64 = 500_000_000;

/// Moves the clock by `offset_nanos`: at once with `step`, else slewed.
pub fn adjust(offset_nanos: i64, step: bool) -> Result<(), String> {
    if offset_nanos.unsigned_abs() > MAX_OFFSET_NANOS as u64 {
        return Err(format!("an offset of {offset_nanos} ns is not believable"));
    }
    if step {
        cancel_slew().map_err(|e| format!("cancelling a slew failed: {e}"))?;
        let now = now_nanos().map_err(|e| format!("reading the clock failed: {e}"))?;
        let to = now.saturating_add_signed(offset_nanos);
        return clock_settime(ClockId::CLOCK_REALTIME, from_nanos(to))
            .map_err(|e| format!("setting the clock failed: {e}"));
    }
    if offset_nanos.abs() > MAX_SLEW_NANOS {
        return Err(format!(
            "an offset of {} ms is too large to slew; step it",
            offset_nanos / 1_000_000
        ));
    }
    slew_micros(offset_nanos / 1000).map_err(|e| format!("slewing the clock failed: {e}"))
}

fn cancel_slew() -> nix::Result<()> {
    slew_micros(0)
}

/// `adjtime(2)`-style slew: the kernel runs the clock slightly fast or
/// slow until `micros` is made up, replacing any slew still pending.
fn slew_micros(micros: i64) -> nix::Result<()> {
    // SAFETY: `timex` is a plain C struct for which all zeros is valid;
    // adjtimex only reads and writes the struct we pass and owns.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = libc::ADJ_OFFSET_SINGLESHOT;
    tx.offset = micros as libc::c_long;
    // SAFETY: `tx` is a valid, exclusively borrowed timex for the call.
    let rc = unsafe { libc::adjtimex(&mut tx) };
    if rc < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_round_trip_and_refusals() {
        let n = 1_795_000_000_123_456_789u64;
        assert_eq!(to_nanos(from_nanos(n)), n);
        assert!(adjust(i64::MAX, true).is_err());
        assert!(adjust(2 * MAX_SLEW_NANOS, false)
            .unwrap_err()
            .contains("step it"));
        assert!(now_nanos().unwrap() > 1_700_000_000_000_000_000);
    }
}

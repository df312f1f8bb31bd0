//! The host's TSC frequency, for guests that cannot calibrate their own.
//!
//! Under QEMU's TCG the guest's TSC counts at the host's rate (QEMU reads
//! the host's TSC and stops it while the VM is paused), but a microvm
//! guest has no reference timer (no HPET, no ACPI PM timer) and its
//! PIT-based calibration fails whenever the emulated vCPU is slow, so
//! Linux marks the TSC unstable and keeps time by counting ticks, which
//! drifts by tenths of a second a minute. Telling it the frequency
//! (`tsc_early_khz=`) keeps it on the TSC.

use std::time::{Duration, Instant};

/// The host TSC's frequency in kHz, measured against the monotonic clock
/// over `window` (100 ms gives about 10 ppm). `None` off x86_64 or when
/// the counter did not advance.
pub fn host_tsc_khz(window: Duration) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let read = || {
            // SAFETY: RDTSC reads a counter into registers; it touches no
            // memory and every x86_64 CPU has it.
            unsafe { core::arch::x86_64::_rdtsc() }
        };
        // Each end is the tighter of two back-to-back reads, so that an
        // interruption between the clock and the counter shows.
        let sample = || {
            let a = Instant::now();
            let c = read();
            let b = Instant::now();
            (a, c, b)
        };
        let (a0, c0, b0) = sample();
        std::thread::sleep(window);
        let (a1, c1, b1) = sample();
        let ticks = c1.checked_sub(c0)?;
        // Midpoints of each end's clock readings.
        let t0 = a0 + (b0 - a0) / 2;
        let t1 = a1 + (b1 - a1) / 2;
        let nanos = (t1 - t0).as_nanos();
        if nanos == 0 || ticks == 0 {
            return None;
        }
        Some((u128::from(ticks) * 1_000_000 / nanos) as u64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = window;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_same_frequency_twice() {
        let a = host_tsc_khz(Duration::from_millis(100)).expect("x86_64 has a TSC");
        let b = host_tsc_khz(Duration::from_millis(100)).unwrap();
        // A plausible clock (100 MHz .. 10 GHz) and two measurements that
        // agree within 0.1 %.
        assert!((100_000..10_000_000).contains(&a), "{a} kHz");
        assert!(a.abs_diff(b) * 1000 < a, "{a} vs {b} kHz");
    }
}

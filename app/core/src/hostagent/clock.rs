//! Keeps the guest's clock right: at once after the host slept or the VM
//! was paused, and against slow drift in between.
//!
//! Each check reads the guest clock a few times over the control
//! connection, keeps the reading with the shortest round trip (its error is
//! at most half that trip) and corrects the offset: a step when it is
//! large, a slew when it is small, nothing when it is within
//! [`TOLERANCE`]. Checks run when the VM resumes (a QMP `RESUME` event,
//! or berth-vmm's resume through its API: both kick [`Clock::kick`]), when
//! the host has slept (on Linux a timerfd wakes at resume, see
//! [`clock_jumps`]; everywhere the suspended time is compared every
//! [`SLEEP_CHECK`], see [`suspended`]), and every [`DRIFT_EVERY`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::Shared;
use crate::guest::{ClockSample, GuestClient};

/// Offsets at or above this are stepped.
pub const STEP_AT: Duration = Duration::from_millis(50);
/// Offsets below this are left alone.
pub const TOLERANCE: Duration = Duration::from_millis(2);
/// How often drift is checked.
pub const DRIFT_EVERY: Duration = Duration::from_secs(60);
/// How often the host's suspended time is looked at.
pub const SLEEP_CHECK: Duration = Duration::from_secs(5);
/// Growth of the host's suspended time that counts as a sleep.
const SLEPT: Duration = Duration::from_millis(500);
/// Readings per check.
const SAMPLES: usize = 3;

/// The last check and the last correction, for `berth status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ClockStatus {
    /// Unix time of the last check.
    pub checked_at_unix: u64,
    /// The guest's offset after that check (positive: ahead), ms: after a
    /// step, read again; a slew still under way is not subtracted.
    pub offset_ms: f64,
    /// Round trip of the reading used, ms (the offset is good to half of it).
    pub rtt_ms: f64,
    /// Corrections made since the VM started.
    pub corrections: u64,
    /// The last correction, if any.
    pub last_correction: Option<ClockCorrection>,
}

/// One correction of the guest clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ts_rs::TS)]
pub struct ClockCorrection {
    pub at_unix: u64,
    /// The offset corrected (positive: the guest was ahead), ms.
    pub offset_ms: f64,
    /// Stepped at once (else slewed).
    pub step: bool,
    /// Why the check ran: `resumed`, `host slept`, `host clock set`,
    /// `drift`, `boot`.
    pub reason: String,
}

/// What to do about an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Slew,
    Step,
}

/// The action for a guest `offset` (guest minus host).
pub fn action(offset: i64) -> Action {
    let a = offset.unsigned_abs();
    if a >= STEP_AT.as_nanos() as u64 {
        Action::Step
    } else if a >= TOLERANCE.as_nanos() as u64 {
        Action::Slew
    } else {
        Action::Nothing
    }
}

/// How long the host has been suspended since it booted, where the
/// platform says. A growth between two looks means it slept.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn suspended() -> Option<Duration> {
    use nix::time::{clock_gettime, ClockId};
    // BOOTTIME counts suspended time, MONOTONIC does not. MONOTONIC is
    // read first so that the later BOOTTIME reading is not the smaller.
    let mono = Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?);
    let boot = Duration::from(clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?);
    Some(boot.saturating_sub(mono))
}

/// macOS: `CLOCK_MONOTONIC` is `mach_continuous_time` (counts sleep),
/// `CLOCK_UPTIME_RAW` is `mach_absolute_time` (does not).
#[cfg(target_os = "macos")]
pub fn suspended() -> Option<Duration> {
    use nix::time::{clock_gettime, ClockId};
    let abs = Duration::from(clock_gettime(ClockId::CLOCK_UPTIME_RAW).ok()?);
    let cont = Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?);
    Some(cont.saturating_sub(abs))
}

/// Windows: the interrupt time counts sleep, the unbiased one does not;
/// their difference is the bias (100 ns units).
#[cfg(windows)]
pub fn suspended() -> Option<Duration> {
    use windows_sys::Win32::System::WindowsProgramming::{
        QueryInterruptTime, QueryUnbiasedInterruptTime,
    };
    let (mut biased, mut unbiased) = (0u64, 0u64);
    // SAFETY: both calls only write the u64 they are given.
    unsafe {
        if QueryUnbiasedInterruptTime(&mut unbiased) == 0 {
            return None;
        }
        QueryInterruptTime(&mut biased);
    }
    Some(Duration::from_nanos(biased.saturating_sub(unbiased) * 100))
}

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    windows
)))]
pub fn suspended() -> Option<Duration> {
    None
}

/// Wakes when the host's wall clock jumps. On Linux one thread per
/// process blocks on a `CLOCK_REALTIME` timerfd armed far ahead with
/// `TFD_TIMER_CANCEL_ON_SET`: the kernel cancels it when the clock is set
/// and when the host resumes from suspend, so a sleep is noticed at
/// wake-up rather than at the next [`SLEEP_CHECK`]. Each jump bumps a
/// counter every [`keep`] follows. Elsewhere nothing wakes (the
/// [`SLEEP_CHECK`] comparison finds sleeps).
pub fn clock_jumps() -> tokio::sync::watch::Receiver<u64> {
    static JUMPS: std::sync::OnceLock<tokio::sync::watch::Sender<u64>> = std::sync::OnceLock::new();
    JUMPS
        .get_or_init(|| {
            let (tx, _) = tokio::sync::watch::channel(0u64);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                let tx = tx.clone();
                let spawned = std::thread::Builder::new()
                    .name("clock-jumps".into())
                    .spawn(move || {
                        if let Err(e) = follow_jumps(&tx) {
                            tracing::debug!("host clock jumps are not followed: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::debug!("host clock jumps are not followed: {e}");
                }
            }
            tx
        })
        .subscribe()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn follow_jumps(tx: &tokio::sync::watch::Sender<u64>) -> nix::Result<()> {
    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    let fd = TimerFd::new(ClockId::CLOCK_REALTIME, TimerFlags::TFD_CLOEXEC)?;
    loop {
        // Ten years ahead: it only ever ends by being cancelled.
        let far = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            + Duration::from_secs(10 * 365 * 86_400);
        fd.set(
            Expiration::OneShot(TimeSpec::from_duration(far)),
            TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
        )?;
        // Returns on the cancellation (or the expiry); EINTR is retried.
        fd.wait()?;
        tx.send_modify(|n| *n += 1);
    }
}

/// Whether the host slept since the last look (and remembers this one).
#[derive(Debug)]
pub struct SleepWatch(Option<Duration>);

impl SleepWatch {
    pub fn new() -> SleepWatch {
        SleepWatch(suspended())
    }

    /// Compares `now` (a [`suspended`] reading) with the last one.
    pub fn slept(&mut self, now: Option<Duration>) -> bool {
        let before = std::mem::replace(&mut self.0, now);
        matches!((before, now), (Some(b), Some(n)) if n >= b + SLEPT)
    }
}

impl Default for SleepWatch {
    fn default() -> Self {
        SleepWatch::new()
    }
}

/// The clock keeper's handle: kick it when the VM resumes.
#[derive(Debug, Default)]
pub struct Clock {
    kick: Notify,
    /// Resumes seen, so that a correction a check already under way made
    /// after a resume is put down to the resume.
    resumes: std::sync::atomic::AtomicU64,
}

impl Clock {
    pub fn kick(&self) {
        self.resumes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.kick.notify_one();
    }

    fn resumes(&self) -> u64 {
        self.resumes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs until aborted (the VM stopped), checking as described above.
pub async fn keep(vsock: PathBuf, shared: Arc<Shared>, clock: Arc<Clock>) {
    let mut client: Option<GuestClient> = None;
    let mut watch = SleepWatch::new();
    let mut jumps = Some(clock_jumps());
    let mut tick = tokio::time::interval(SLEEP_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = Instant::now();
    let mut corrections = 0u64;
    let mut last_correction = None;
    // The boot set the clock; check at once that it took.
    let mut reason = Some("boot");
    let mut resumes_seen = clock.resumes();
    loop {
        if reason.is_none() {
            tokio::select! {
                biased;
                _ = clock.kick.notified() => reason = Some("resumed"),
                r = async {
                    match jumps.as_mut() {
                        Some(j) => j.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if r.is_err() {
                        // Not expected (the sender lives in a static).
                        jumps = None;
                    }
                    reason = Some(if watch.slept(suspended()) {
                        "host slept"
                    } else {
                        "host clock set"
                    });
                }
                _ = tick.tick() => {
                    if watch.slept(suspended()) {
                        reason = Some("host slept");
                    } else if last_check.elapsed() >= DRIFT_EVERY {
                        reason = Some("drift");
                    }
                }
            }
        }
        let Some(why) = reason.take() else { continue };
        last_check = Instant::now();
        match check(&vsock, &mut client, why).await {
            Ok((sample, done)) => {
                // A check that began before a resume (say, a drift check
                // while the VM was paused: it waits for the guest) and
                // corrected after it corrected the pause.
                let resumed = clock.resumes() != resumes_seen;
                resumes_seen = clock.resumes();
                if let Some(mut c) = done {
                    if resumed {
                        c.reason = "resumed".into();
                    }
                    corrections += 1;
                    tracing::info!(
                        "guest clock {} by {:.1} ms ({})",
                        if c.step { "stepped" } else { "slewed" },
                        -c.offset_ms,
                        c.reason
                    );
                    last_correction = Some(c);
                }
                let st = ClockStatus {
                    checked_at_unix: unix_now(),
                    offset_ms: sample.offset as f64 / 1e6,
                    rtt_ms: sample.rtt.as_secs_f64() * 1e3,
                    corrections,
                    last_correction: last_correction.clone(),
                };
                shared.update(|s| s.clock = Some(st));
            }
            Err(e) => {
                client = None;
                tracing::debug!("clock check ({why}) failed: {e}");
            }
        }
    }
}

/// One check: measure, and correct if needed. Returns the clock's offset
/// as it is now and the correction made.
async fn check(
    vsock: &std::path::Path,
    client: &mut Option<GuestClient>,
    why: &str,
) -> Result<(ClockSample, Option<ClockCorrection>), crate::guest::GuestError> {
    // Taken out while in use: after an error the next check reconnects.
    let mut c = match client.take() {
        Some(c) => c,
        None => GuestClient::connect(vsock, "berth-clock").await?,
    };
    let s = best_of(&mut c).await?;
    let step = match action(s.offset) {
        Action::Nothing => {
            *client = Some(c);
            return Ok((s, None));
        }
        Action::Slew => false,
        Action::Step => true,
    };
    c.adjust_clock(-s.offset, step).await?;
    // A step takes at once: read again, so that status shows where the
    // clock is now (a slew is still under way, so its reading stands).
    let now = if step { best_of(&mut c).await? } else { s };
    *client = Some(c);
    Ok((
        now,
        Some(ClockCorrection {
            at_unix: unix_now(),
            offset_ms: s.offset as f64 / 1e6,
            step,
            reason: why.to_owned(),
        }),
    ))
}

/// The reading with the shortest round trip of [`SAMPLES`].
async fn best_of(c: &mut GuestClient) -> Result<ClockSample, crate::guest::GuestError> {
    let mut s = c.clock_sample().await?;
    for _ in 1..SAMPLES {
        let next = c.clock_sample().await?;
        if next.rtt < s.rtt {
            s = next;
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stepped_slewed_or_left() {
        assert_eq!(action(0), Action::Nothing);
        assert_eq!(action(1_999_999), Action::Nothing);
        assert_eq!(action(-2_000_000), Action::Slew);
        assert_eq!(action(49_999_999), Action::Slew);
        assert_eq!(action(-50_000_000), Action::Step);
        assert_eq!(action(i64::MIN), Action::Step);
    }

    #[test]
    fn a_sleep_is_growth_of_suspended_time() {
        let mut w = SleepWatch(Some(Duration::from_secs(10)));
        assert!(!w.slept(Some(Duration::from_millis(10_100))));
        assert!(w.slept(Some(Duration::from_secs(40))));
        assert!(!w.slept(Some(Duration::from_secs(40))));
        assert!(!w.slept(None), "no reading, no verdict");
        assert!(
            !w.slept(Some(Duration::from_secs(99))),
            "nothing to compare with"
        );
        // This host's own reading is there and does not run backwards.
        let a = suspended().expect("Linux has CLOCK_BOOTTIME");
        assert!(suspended().unwrap() + Duration::from_millis(1) >= a);
    }
}

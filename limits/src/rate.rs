//! Rate limiting for log lines a peer can trigger.

use std::fmt;
use std::time::{Duration, Instant};

/// Allows a burst of events per time window and counts the rest, so a
/// flood costs a few lines per window, each saying how many were dropped.
///
/// ```
/// # use berth_limits::RateLimiter;
/// let mut l = RateLimiter::per_minute(2);
/// assert!(l.hit().is_some());
/// assert!(l.hit().is_some());
/// assert!(l.hit().is_none()); // the third in this minute is suppressed
/// assert_eq!(l.count(), 3);
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    total: u64,
}

/// How many events were suppressed before the one being logged; shows as
/// ` (N similar suppressed)`, or nothing when N is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suppressed(pub u64);

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 > 0 {
            write!(f, " ({} similar suppressed)", self.0)
        } else {
            Ok(())
        }
    }
}

impl Default for RateLimiter {
    /// Ten lines a minute.
    fn default() -> Self {
        RateLimiter::per_minute(10)
    }
}

impl RateLimiter {
    pub const fn new(burst: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
            total: 0,
        }
    }

    pub const fn per_minute(burst: u32) -> RateLimiter {
        RateLimiter::new(burst, Duration::from_secs(60))
    }

    /// Records one event; `Some` if this one may be logged, carrying the
    /// number suppressed since the last one logged.
    pub fn hit(&mut self) -> Option<Suppressed> {
        self.hit_at(Instant::now())
    }

    /// [`RateLimiter::hit`] at a given time (for tests).
    pub fn hit_at(&mut self, now: Instant) -> Option<Suppressed> {
        self.total += 1;
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= self.window {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(Suppressed(std::mem::take(&mut self.suppressed)))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Every event recorded, logged or not.
    pub fn count(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count_of_what_was_dropped() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(3, Duration::from_secs(10));
        let logged: Vec<_> = (0..1000).filter_map(|_| l.hit_at(t0)).collect();
        assert_eq!(logged, vec![Suppressed(0); 3]);
        // The next window logs again and says how many were dropped.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(l.hit_at(later), Some(Suppressed(997)));
        assert_eq!(l.hit_at(later), Some(Suppressed(0)));
        assert_eq!(l.count(), 1002);
        assert_eq!(Suppressed(997).to_string(), " (997 similar suppressed)");
        assert_eq!(Suppressed(0).to_string(), "");
    }
}

//! The open-file limit.
//!
//! Every connection a server holds costs descriptors, so each server sizes
//! its connection cap from the limit it actually has ([`connection_cap`])
//! instead of a constant: macOS starts processes with a soft limit of 256,
//! Linux usually with 1,024. Processes raise their soft limit towards the
//! hard limit once at start ([`raise_nofile_limit`]).

use std::io;

/// What a process asks for: plenty for every cap in Berth, without
/// pinning kernel memory for a million descriptors.
pub const WANTED: u64 = 65_536;

/// The most a process may ask for: macOS refuses `RLIMIT_NOFILE` above
/// `OPEN_MAX` whatever the hard limit says.
fn platform_cap(hard: u64) -> u64 {
    if cfg!(target_os = "macos") {
        hard.min(10_240)
    } else {
        hard
    }
}

/// The current (soft, hard) open-file limits.
pub fn nofile_limits() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is not u64 everywhere.
    #[allow(clippy::unnecessary_cast)]
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

/// Raises the soft open-file limit to `min(hard, WANTED)` (never lowers
/// it) and returns the soft limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = nofile_limits()?;
    let want = platform_cap(hard).min(WANTED);
    if want <= soft {
        return Ok(soft);
    }
    let r = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads one rlimit from the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(want)
}

/// The soft limit, or a conservative guess if it cannot be read.
pub fn current_nofile_limit() -> u64 {
    nofile_limits().map(|(soft, _)| soft).unwrap_or(256)
}

/// Descriptors a server keeps for everything but its connections: its own
/// listeners, log files, epoll and event descriptors, a child's pipes.
pub const RESERVED: u64 = 48;

/// How many connections a server may hold at once when each costs
/// `fds_per_conn` descriptors, leaving [`RESERVED`] for everything else,
/// and never more than `max`. At least 1, so a tiny limit degrades
/// service instead of refusing it entirely.
pub fn connection_cap(limit: u64, fds_per_conn: u64, max: usize) -> usize {
    let usable = limit.saturating_sub(RESERVED) / fds_per_conn.max(1);
    (usable.min(max as u64) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_limit() {
        assert_eq!(connection_cap(256, 1, 4096), 208);
        assert_eq!(connection_cap(256, 2, 1024), 104);
        assert_eq!(connection_cap(1 << 20, 2, 1024), 1024);
        assert_eq!(connection_cap(10, 2, 1024), 1);
    }

    #[test]
    fn raising_never_lowers_and_stays_within_the_hard_limit() {
        let (soft, hard) = nofile_limits().unwrap();
        let now = raise_nofile_limit().unwrap();
        assert!(
            now >= soft && now <= hard.max(soft),
            "{soft} {hard} → {now}"
        );
        assert_eq!(current_nofile_limit(), now);
    }
}

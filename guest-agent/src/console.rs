//! The serial console: milestone lines for hosts to parse, and the prefixed
//! log lines of supervised daemons.

use std::io::Write;

use nix::time::{clock_gettime, ClockId};

/// Guest uptime in milliseconds (CLOCK_BOOTTIME: includes time suspended).
pub fn uptime_ms() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => (ts.tv_sec() as u64) * 1000 + (ts.tv_nsec() as u64) / 1_000_000,
        Err(_) => 0,
    }
}

/// Formats a milestone line: `berth-agent: <name> uptime_ms=<n> [k=v ...]`.
/// Values are written as given; callers pass tokens without spaces.
pub fn milestone_line(name: &str, uptime_ms: u64, fields: &[(&str, &str)]) -> String {
    let mut line = format!("berth-agent: {name} uptime_ms={uptime_ms}");
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    line
}

/// Prints one machine-readable milestone line on the console and passes
/// it on to the host's events listener (see [`crate::events`]).
pub fn milestone(name: &str, fields: &[(&str, &str)]) {
    let uptime = uptime_ms();
    write_line(&milestone_line(name, uptime, fields));
    crate::events::publish(berth_proto::Event {
        name: name.to_owned(),
        uptime_ms: uptime,
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    });
}

/// Writes one whole line to the console. Lines from different tasks never
/// interleave because each is written under the stdout lock in one call.
pub fn write_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    // The console is all we have; if writing to it fails there is nowhere
    // to report that.
    let _ = out.write_all(&buf);
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestone_format() {
        assert_eq!(
            milestone_line("docker-ready", 1234, &[("agent_ms", "900")]),
            "berth-agent: docker-ready uptime_ms=1234 agent_ms=900"
        );
        assert_eq!(
            milestone_line("agent-start", 5, &[]),
            "berth-agent: agent-start uptime_ms=5"
        );
    }

    #[test]
    fn uptime_is_monotonic() {
        let a = uptime_ms();
        let b = uptime_ms();
        assert!(b >= a);
    }
}

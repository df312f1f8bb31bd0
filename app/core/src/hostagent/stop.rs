//! Stopping the VM, and saying truthfully how it went.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto::shutdown::BUDGET;

use super::events::Milestones;
use super::{describe, Command, Shared};
use crate::driver::Machine;
use crate::guest::GuestClient;
use crate::paths::StateDir;
use crate::status::{StopHow, StopReport, VmState};

/// How long reaching the guest agent and asking may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Orderly (asked of the guest) or forced stop, as `first` says; returns
/// what happened.
pub async fn stop(
    state: &StateDir,
    shared: &Arc<Shared>,
    milestones: &Milestones,
    machine: &mut Machine,
    first: Command,
) -> StopReport {
    let t0 = Instant::now();
    if first == Command::Kill {
        return kill(shared, machine, t0, "stopped by force on request (`berth stop --force` or POST /kill): the guest had no chance to flush its disks; ext4's journal makes the data disk consistent at the next start".into()).await;
    }
    shared.phase(VmState::Stopping, "stopping: containers, then power off");
    let asked = async {
        let mut g = GuestClient::connect(&state.vsock_sock(), "berth-host-agent").await?;
        g.shutdown().await
    };
    match tokio::time::timeout(ASK_TIMEOUT, asked).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let why = format!("the guest agent could not be reached ({e}), so it could not stop the containers and flush the disks: the VM was stopped by force; ext4's journal makes the data disk consistent at the next start");
            tracing::warn!("{why}");
            return kill(shared, machine, t0, why).await;
        }
        Err(_) => {
            let why = format!("the guest agent did not answer the shutdown request within {} s: the VM was stopped by force; ext4's journal makes the data disk consistent at the next start", ASK_TIMEOUT.as_secs());
            tracing::warn!("{why}");
            return kill(shared, machine, t0, why).await;
        }
    }
    let waited = tokio::select! {
        st = tokio::time::timeout(BUDGET, machine.wait()) => st.ok(),
        _ = shared.kill_requested() => None,
    };
    match waited {
        Some(Ok(st)) if st.success() => {
            let report = StopReport::new(
                StopHow::Clean,
                clean_summary(milestones, t0.elapsed()),
                t0.elapsed().as_secs_f64(),
            );
            tracing::info!("the guest powered off: {}", report.message);
            report
        }
        Some(Ok(st)) => StopReport::new(
            StopHow::Crashed,
            format!(
                "the VM process ended with {} during the shutdown (last guest step: {})",
                describe(st),
                milestones.newest().unwrap_or_else(|| "none".into())
            ),
            t0.elapsed().as_secs_f64(),
        ),
        Some(Err(e)) => StopReport::new(
            StopHow::Crashed,
            format!("waiting for the VM process failed: {e}"),
            t0.elapsed().as_secs_f64(),
        ),
        None => {
            let last = milestones.newest().unwrap_or_else(|| "none".into());
            let why = if t0.elapsed() < BUDGET {
                format!("stopped by force on request after {:.0} s of orderly shutdown (last guest step: {last}); the data disk is checked at the next start", t0.elapsed().as_secs_f64())
            } else {
                format!("the guest did not power off within {} s, Berth's shutdown budget (last guest step: {last}): the VM was stopped by force; the data disk is checked at the next start", BUDGET.as_secs())
            };
            tracing::warn!("{why}");
            kill(shared, machine, t0, why).await
        }
    }
}

async fn kill(shared: &Shared, machine: &mut Machine, t0: Instant, why: String) -> StopReport {
    shared.phase(VmState::Stopping, "killing the VM process");
    machine.kill().await;
    StopReport::new(StopHow::Forced, why, t0.elapsed().as_secs_f64())
}

/// "Stopped in order: …" from the guest's shutdown milestones.
pub fn clean_summary(m: &Milestones, took: Duration) -> String {
    let field = |e: &berth_proto::Event, k: &str| {
        e.fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let mut parts = Vec::new();
    if let Some(e) = m.last("containers-stopped") {
        let total: u32 = field(&e, "total").and_then(|v| v.parse().ok()).unwrap_or(0);
        let killed: u32 = field(&e, "killed")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let names = field(&e, "killed_names").unwrap_or_default();
        parts.push(match (total, killed) {
            (0, _) => "no containers were running".to_owned(),
            (t, 0) => format!("{t} container{} stopped", plural(t)),
            (t, k) => format!(
                "{t} container{} stopped, {k} of them killed after ignoring SIGTERM for its stop timeout ({})",
                plural(t),
                names.replace(',', ", ")
            ),
        });
    }
    if let Some(e) = m.last("dockerd-stopped") {
        if field(&e, "how").is_some_and(|h| h.contains("signal_9")) {
            parts.push("dockerd did not stop in time and was killed".into());
        }
    }
    if m.last("data-disk-unmounted").is_some() {
        parts.push("data disk unmounted cleanly".into());
    } else if m.last("data-disk-readonly").is_some() {
        parts.push("data disk flushed and made read-only (something kept it busy)".into());
    }
    parts.push(format!(
        "the guest powered off after {:.1} s",
        took.as_secs_f64()
    ));
    format!("stopped in order: {}", parts.join("; "))
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, fields: &[(&str, &str)]) -> berth_proto::Event {
        berth_proto::Event {
            name: name.into(),
            uptime_ms: 1,
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn summaries_say_what_the_guest_reported() {
        let m = Milestones::default();
        m.push_for_test(ev(
            "containers-stopped",
            &[
                ("total", "2"),
                ("killed", "1"),
                ("killed_names", "stubborn"),
            ],
        ));
        m.push_for_test(ev("data-disk-unmounted", &[]));
        let s = clean_summary(&m, Duration::from_millis(12_340));
        assert_eq!(s, "stopped in order: 2 containers stopped, 1 of them killed after ignoring SIGTERM for its stop timeout (stubborn); data disk unmounted cleanly; the guest powered off after 12.3 s");
        let m = Milestones::default();
        assert_eq!(
            clean_summary(&m, Duration::from_secs(1)),
            "stopped in order: the guest powered off after 1.0 s"
        );
    }
}

//! CPU and memory of containers: a sweep over the running ones for the
//! list's columns, and one container's live samples for its chart.
//!
//! The container list itself follows Docker's event stream; usage has no
//! events, so the list's columns are sampled: one `stats?one-shot` per
//! running container a sweep, at most [`SWEEP_PARALLEL`] at once, a sweep
//! every [`SWEEP_EVERY`] or three times as long as the last one took
//! (whichever is longer), so a busy engine is not kept busier.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::{ListContainersOptionsBuilder, StatsOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;
use serde::Serialize;
use ts_rs::TS;

use super::containers::check_id;
use super::DockerError;

pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
pub const SWEEP_PARALLEL: usize = 4;
/// A sweep covers at most this many running containers.
pub const SWEEP_MAX: usize = 500;

/// A container's usage now.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct Usage {
    pub id: String,
    /// Percent of one CPU (200 = two CPUs busy); `None` until two samples
    /// were taken.
    pub cpu_percent: Option<f64>,
    /// Bytes in use, page cache that can be dropped not counted (as
    /// `docker stats` counts).
    pub mem: f64,
    pub mem_limit: f64,
}

/// One point of a container's chart.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct StatsPoint {
    /// Unix milliseconds.
    pub at: f64,
    pub cpu_percent: f64,
    pub mem: f64,
    pub mem_limit: f64,
    pub net_rx: f64,
    pub net_tx: f64,
    pub blk_read: f64,
    pub blk_write: f64,
    pub pids: f64,
}

/// CPU counters of one sample: the container's and the whole system's
/// time (ns), and the CPUs online.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CpuTimes {
    pub container: u64,
    pub system: u64,
    pub cpus: u32,
}

fn cpu_times(s: &Option<bollard::models::ContainerCpuStats>) -> Option<CpuTimes> {
    let s = s.as_ref()?;
    Some(CpuTimes {
        container: s.cpu_usage.as_ref()?.total_usage?,
        system: s.system_cpu_usage?,
        cpus: s
            .online_cpus
            .or_else(|| {
                s.cpu_usage
                    .as_ref()?
                    .percpu_usage
                    .as_ref()
                    .map(|v| v.len() as u32)
            })
            .unwrap_or(1)
            .max(1),
    })
}

/// `docker stats`' CPU figure between two samples.
pub fn cpu_percent(prev: CpuTimes, now: CpuTimes) -> Option<f64> {
    let dc = now.container.checked_sub(prev.container)?;
    let ds = now.system.checked_sub(prev.system)?;
    (ds > 0).then(|| dc as f64 / ds as f64 * now.cpus as f64 * 100.0)
}

/// Memory in use, as `docker stats` shows it: usage minus the inactive
/// page cache (cgroup v2) or the cache (v1).
fn mem_of(s: &ContainerStatsResponse) -> (f64, f64) {
    let Some(m) = &s.memory_stats else {
        return (0.0, 0.0);
    };
    let usage = m.usage.unwrap_or(0);
    let cache = m.stats.as_ref().map_or(0, |st| {
        st.get("inactive_file")
            .or_else(|| st.get("total_inactive_file"))
            .or_else(|| st.get("cache"))
            .copied()
            .unwrap_or(0)
    });
    (
        usage.saturating_sub(cache) as f64,
        m.limit.unwrap_or(0) as f64,
    )
}

async fn one_shot(docker: &Docker, id: &str) -> Option<ContainerStatsResponse> {
    let opts = StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(true)
        .build();
    docker.stats(id, Some(opts)).next().await?.ok()
}

/// Sends every running container's usage after each sweep until
/// `on_usage` returns false or the engine goes away.
pub async fn watch_usage(
    docker: &Docker,
    mut on_usage: impl FnMut(Vec<Usage>) -> bool,
) -> Result<(), DockerError> {
    let mut prev: HashMap<String, CpuTimes> = HashMap::new();
    loop {
        let began = Instant::now();
        let mut filters = HashMap::new();
        filters.insert("status", vec!["running"]);
        let opts = ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        let ids: Vec<String> = docker
            .list_containers(Some(opts))
            .await?
            .into_iter()
            .filter_map(|c| c.id)
            .take(SWEEP_MAX)
            .collect();
        let samples: Vec<(String, Option<ContainerStatsResponse>)> =
            futures_util::stream::iter(ids)
                .map(|id| async move {
                    let s = one_shot(docker, &id).await;
                    (id, s)
                })
                .buffer_unordered(SWEEP_PARALLEL)
                .collect()
                .await;
        let mut next = HashMap::new();
        let mut out = Vec::with_capacity(samples.len());
        for (id, s) in samples {
            let Some(s) = s else { continue };
            let cpu = cpu_times(&s.cpu_stats);
            let (mem, mem_limit) = mem_of(&s);
            let cpu_percent = match (prev.get(&id), cpu) {
                (Some(p), Some(n)) => cpu_percent(*p, n),
                _ => None,
            };
            if let Some(c) = cpu {
                next.insert(id.clone(), c);
            }
            out.push(Usage {
                id,
                cpu_percent,
                mem,
                mem_limit,
            });
        }
        prev = next;
        if !on_usage(out) {
            return Ok(());
        }
        tokio::time::sleep(SWEEP_EVERY.max(began.elapsed() * 3)).await;
    }
}

fn point(s: &ContainerStatsResponse) -> StatsPoint {
    let cpu = match (cpu_times(&s.precpu_stats), cpu_times(&s.cpu_stats)) {
        (Some(p), Some(n)) => cpu_percent(p, n).unwrap_or(0.0),
        _ => 0.0,
    };
    let (mem, mem_limit) = mem_of(s);
    let (mut rx, mut tx) = (0u64, 0u64);
    for n in s.networks.iter().flat_map(|m| m.values()) {
        rx += n.rx_bytes.unwrap_or(0);
        tx += n.tx_bytes.unwrap_or(0);
    }
    let (mut rd, mut wr) = (0u64, 0u64);
    for e in s
        .blkio_stats
        .iter()
        .flat_map(|b| b.io_service_bytes_recursive.iter().flatten())
    {
        match e.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("read") => rd += e.value.unwrap_or(0),
            Some("write") => wr += e.value.unwrap_or(0),
            _ => {}
        }
    }
    StatsPoint {
        at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_millis() as f64),
        cpu_percent: cpu,
        mem,
        mem_limit,
        net_rx: rx as f64,
        net_tx: tx as f64,
        blk_read: rd as f64,
        blk_write: wr as f64,
        pids: s.pids_stats.as_ref().and_then(|p| p.current).unwrap_or(0) as f64,
    }
}

/// Streams one container's samples (Docker sends one a second) until
/// `on_point` returns false or the container stops.
pub async fn stream(
    docker: &Docker,
    id: &str,
    mut on_point: impl FnMut(StatsPoint) -> bool,
) -> Result<(), DockerError> {
    check_id(id)?;
    let opts = StatsOptionsBuilder::default().stream(true).build();
    let mut s = docker.stats(id, Some(opts));
    while let Some(item) = s.next().await {
        let item = item?;
        // A stopped container's samples are empty.
        if item.read.is_none() && item.cpu_stats.is_none() {
            break;
        }
        if !on_point(point(&item)) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_a_share_of_the_cpus() {
        let a = CpuTimes {
            container: 1_000,
            system: 10_000,
            cpus: 2,
        };
        let b = CpuTimes {
            container: 2_000,
            system: 20_000,
            cpus: 2,
        };
        assert_eq!(cpu_percent(a, b), Some(20.0));
        // Counters that went backwards (a restarted container) give nothing.
        assert_eq!(cpu_percent(b, a), None);
        assert_eq!(cpu_percent(a, a), None);
    }

    #[test]
    fn memory_leaves_out_the_inactive_cache() {
        let s: ContainerStatsResponse = serde_json::from_value(serde_json::json!({
            "memory_stats": {"usage": 10_000, "limit": 50_000, "stats": {"inactive_file": 4_000}},
        }))
        .unwrap();
        assert_eq!(mem_of(&s), (6_000.0, 50_000.0));
        let p = point(&s);
        assert_eq!(p.cpu_percent, 0.0);
        assert_eq!(p.mem, 6_000.0);
    }
}

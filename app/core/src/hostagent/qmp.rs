//! A full host disk under QEMU.
//!
//! Berth's policy for `ENOSPC` on the data disk, under both drivers: the
//! guest is never told of a write error the host caused; its disk I/O
//! waits until there is room again, then carries on (nothing is lost).
//! berth-vmm does this inside its virtio-blk (the request is retried).
//! QEMU's default `werror=enospc` pauses the VM instead; this watcher
//! follows QEMU's QMP events, reports the pause in `berth status`, and
//! resumes the VM (`cont`) once the disk holding `data.img` has room.
//! A `RESUME` event, whoever paused the VM, has the guest clock checked.
//! Under berth-vmm, [`watch_vmm`] reads the same condition from its
//! `/metrics` (a virtio-blk device `stalled`) and reports it the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::Shared;

/// Free space on the host below which the VM is not resumed.
const RESUME_FREE_BYTES: u64 = 64 << 20;
/// How often free space is checked while the VM waits.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Longest QMP line taken from QEMU.
const MAX_LINE: usize = 64 << 10;

/// Free bytes on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    // data.img may be a link to another filesystem.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let dir = real.parent().unwrap_or(&real);
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Follows QEMU's QMP socket until QEMU goes away.
pub async fn watch(
    qmp: PathBuf,
    data_disk: PathBuf,
    shared: Arc<Shared>,
    clock: Arc<super::clock::Clock>,
) {
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = UnixStream::connect(&qmp).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(stream) = stream else {
        tracing::warn!(
            "QMP: cannot connect to {}; a full host disk will not be reported",
            qmp.display()
        );
        return;
    };
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    if w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .await
        .is_err()
    {
        return;
    }
    let mut waiting_for_space = false;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    let mut line = Vec::new();
    loop {
        line.clear();
        tokio::select! {
            n = read_line(&mut lines, &mut line) => {
                if n == 0 {
                    return;
                }
                let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&line) else {
                    continue;
                };
                match msg["event"].as_str() {
                    Some("BLOCK_IO_ERROR") if msg["data"]["nospace"].as_bool() == Some(true) => {
                        if !waiting_for_space {
                            let free = free_bytes(&data_disk).unwrap_or(0);
                            let text = format!(
                                "the host disk holding {} is full ({} MiB free): the VM is paused until there is room; free some space and it resumes by itself",
                                data_disk.display(),
                                free >> 20
                            );
                            tracing::error!("{text}");
                            shared.update(|s| s.warning = Some(text));
                        }
                        waiting_for_space = true;
                    }
                    Some("RESUME") => {
                        // Whoever paused it, the guest clock stood still.
                        clock.kick();
                        if waiting_for_space {
                            tracing::info!("the VM resumed: the host disk has room again");
                            waiting_for_space = false;
                            shared.update(|s| s.warning = None);
                        }
                    }
                    _ => {}
                }
            }
            _ = tick.tick(), if waiting_for_space => {
                if free_bytes(&data_disk).is_some_and(|f| f >= RESUME_FREE_BYTES)
                    && w.write_all(b"{\"execute\":\"cont\"}\n").await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (longer ones are cut);
/// 0 at EOF.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, out: &mut Vec<u8>) -> usize {
    loop {
        let buf = match r.fill_buf().await {
            Ok(b) => b,
            Err(_) => return 0,
        };
        if buf.is_empty() {
            return out.len();
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(out.len());
        out.extend_from_slice(&buf[..take.min(room)]);
        r.consume(take);
        if done {
            return out.len().max(1);
        }
    }
}

/// How often berth-vmm's metrics are read for a stalled disk.
const VMM_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Whether berth-vmm's `/metrics` show a disk waiting for host space.
pub fn vmm_disk_stalled(metrics: &serde_json::Value) -> bool {
    metrics["virtio"]
        .as_array()
        .is_some_and(|devs| devs.iter().any(|d| d["stalled"].as_u64() == Some(1)))
}

/// The bytes berth-vmm's balloon (virtio device 5) gave back.
pub fn vmm_balloon_reported(metrics: &serde_json::Value) -> Option<u64> {
    metrics["virtio"]
        .as_array()?
        .iter()
        .find(|d| d["device_type"].as_u64() == Some(5))?["reported_bytes"]
        .as_u64()
}

/// Follows berth-vmm's metrics until the task is dropped.
pub async fn watch_vmm(
    api: PathBuf,
    data_disk: PathBuf,
    shared: Arc<Shared>,
    clock: Arc<super::clock::Clock>,
) {
    tokio::join!(
        follow_vmm_resumes(&api, &clock),
        watch_vmm_metrics(&api, &data_disk, &shared)
    );
}

/// vCPUs resumed through berth-vmm's API: the clock keeper is kicked as
/// soon as berth-vmm answers the long-poll (`GET /resumes?after=N`).
async fn follow_vmm_resumes(api: &std::path::Path, clock: &super::clock::Clock) {
    let mut seen: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let path = match seen {
            None => "/status".to_owned(),
            Some(n) => format!("/resumes?after={n}"),
        };
        match crate::http::request_json(api, hyper::Method::GET, &path, None).await {
            Ok((_, v)) if v["resumes"].is_u64() => {
                failures = 0;
                let n = v["resumes"].as_u64().unwrap_or(0);
                if seen.is_some_and(|s| n > s) {
                    clock.kick();
                }
                seen = Some(n);
            }
            _ => {
                // Not up yet, or gone (then this task ends with the VM).
                seen = None;
                failures = failures.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(200) * failures.min(25)).await;
            }
        }
    }
}

async fn watch_vmm_metrics(api: &std::path::Path, data_disk: &std::path::Path, shared: &Shared) {
    let mut warned = false;
    loop {
        tokio::time::sleep(VMM_CHECK_EVERY).await;
        let Ok((_, m)) = crate::http::request_json(api, hyper::Method::GET, "/metrics", None).await
        else {
            continue;
        };
        *shared
            .balloon_reported
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = vmm_balloon_reported(&m);
        let stalled = vmm_disk_stalled(&m);
        if stalled && !warned {
            let free = free_bytes(data_disk).unwrap_or(0);
            let text = format!(
                "the host disk holding {} is full ({} MiB free): the VM's disk writes wait until there is room; free some space and they continue by themselves",
                data_disk.display(),
                free >> 20
            );
            tracing::error!("{text}");
            shared.update(|s| s.warning = Some(text));
        } else if !stalled && warned {
            tracing::info!("the host disk has room again");
            shared.update(|s| s.warning = None);
        }
        warned = stalled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_disk_is_seen_in_the_metrics() {
        let m =
            serde_json::json!({"virtio": [{"slot": 0, "stalled": 0}, {"slot": 1, "stalled": 1}]});
        assert!(vmm_disk_stalled(&m));
        let m = serde_json::json!({"virtio": [{"slot": 0, "stalled": 0}, {"slot": 2, "reads": 4}]});
        assert!(!vmm_disk_stalled(&m));
        assert!(!vmm_disk_stalled(&serde_json::json!({})));
        let m = serde_json::json!({"virtio": [{"device_type": 4}, {"device_type": 5, "reported_bytes": 4096}]});
        assert_eq!(vmm_balloon_reported(&m), Some(4096));
        assert_eq!(
            vmm_balloon_reported(&serde_json::json!({"virtio": [{"device_type": 2}]})),
            None
        );
    }
}

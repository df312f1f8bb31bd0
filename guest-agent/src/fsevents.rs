//! File events from the host: each share's backend connects to vsock port
//! [`FS_EVENTS_PORT`] and sends one line per change it saw on the host
//! (`create|modify|delete PATH`). The agent hands each event under a
//! mounted share to the guest kernel (`/sys/fs/fuse/berth_notify`, Berth's
//! kernel patch), which drops the cached name and raises the inotify events
//! a local change would raise, so watchers in containers see host edits.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use berth_proto::share::{FsEvent, ShareSpec, FS_EVENTS_PORT, MAX_EVENT_LINE, RECLAIM_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::vsock::{accept_failed, listen};

/// The kernel's entry point for events (see the kernel patch).
const NOTIFY_FILE: &str = "/sys/fs/fuse/berth_notify";
/// Events waiting for the kernel; beyond this they are dropped (counted).
const QUEUE: usize = 4096;
/// Backends connected at once (one per share is expected).
const MAX_CONNECTIONS: usize = 32;

/// Starts the listener; events for paths outside `shares` are ignored.
pub fn start(shares: Vec<ShareSpec>) {
    if shares.is_empty() {
        return;
    }
    let (tx, rx) = sync_channel::<FsEvent>(QUEUE);
    if let Err(e) = std::thread::Builder::new()
        .name("fs-events".into())
        .spawn(move || deliver(rx))
    {
        tracing::warn!("file events from the host are off: {e}");
        return;
    }
    let listener = match listen(FS_EVENTS_PORT) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("vsock port {FS_EVENTS_PORT} (file events) unavailable: {e}");
            return;
        }
    };
    let shares = Arc::new(shares);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        continue; // dropping the stream closes it
                    };
                    let (tx, shares) = (tx.clone(), shares.clone());
                    tokio::spawn(async move {
                        read_events(stream, &tx, &shares).await;
                        drop(permit);
                    });
                }
                Err(e) => accept_failed(FS_EVENTS_PORT, e).await,
            }
        }
    });
}

/// Whether `path` is strictly below one of the shares.
pub fn under_a_share(path: &str, shares: &[ShareSpec]) -> bool {
    shares.iter().any(|s| {
        path.len() > s.path.len() + 1
            && path.starts_with(&s.path)
            && path.as_bytes()[s.path.len()] == b'/'
    }) && !path.split('/').any(|c| c == "..")
}

async fn read_events<S: tokio::io::AsyncRead + Unpin>(
    stream: S,
    tx: &SyncSender<FsEvent>,
    shares: &[ShareSpec],
) {
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    let mut dropped = 0u64;
    loop {
        line.clear();
        // A line longer than the bound ends the connection.
        let mut bounded = (&mut lines).take(MAX_EVENT_LINE as u64 + 1);
        match bounded.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(n) if n > MAX_EVENT_LINE || !line.ends_with('\n') => {
                tracing::warn!("file events: a line over {MAX_EVENT_LINE} bytes; closing");
                break;
            }
            Ok(_) => {}
        }
        if line.trim_end_matches('\n') == RECLAIM_LINE {
            reclaim();
            continue;
        }
        let Some(ev) = FsEvent::parse(line.trim_end_matches('\n')) else {
            continue;
        };
        if !under_a_share(&ev.path, shares) {
            continue;
        }
        match tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::warn!("file events: {dropped} dropped (the kernel is behind)");
                }
            }
            Err(TrySendError::Disconnected(_)) => break,
        }
    }
}

/// Reclaims at most this often, however often backends ask.
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// A backend is short of descriptors: the kernel drops the dentries and
/// inodes nothing holds (`drop_caches` 2, every file system: a share's
/// cannot be chosen without a kernel change), so FORGETs reach the
/// server. Runs off the async threads; one at a time, rate-limited.
fn reclaim() {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let Ok(mut last) = LAST.lock() else { return };
        if last.is_some_and(|t| t.elapsed() < RECLAIM_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
    }
    tokio::task::spawn_blocking(|| {
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "2") {
            tracing::warn!("cannot release cached inodes for a shared folder: {e}");
        } else {
            tracing::debug!(
                "released cached inodes: a shared folder's backend was short of descriptors"
            );
        }
    });
}

/// Writes each event to the kernel, one `write` per event.
fn deliver(rx: Receiver<FsEvent>) {
    let mut file = match std::fs::OpenOptions::new().write(true).open(NOTIFY_FILE) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                "file events from the host are off: {NOTIFY_FILE}: {e} (a guest kernel without Berth's fuse patch)"
            );
            // Drain, so senders never block on a full queue.
            for _ in rx {}
            return;
        }
    };
    let mut log = berth_limits::RateLimiter::default();
    for ev in rx {
        let line = format!("{} {}\n", ev.kind.word(), ev.path);
        if let Err(e) = file.write(line.as_bytes()) {
            // ENOENT: gone again before we got to it; nothing to report.
            if e.raw_os_error() != Some(nix::errno::Errno::ENOENT as i32) {
                if let Some(s) = log.hit() {
                    tracing::debug!("file event {}: {e}{s}", line.trim_end());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_below_a_share_are_accepted() {
        let shares = vec![ShareSpec {
            tag: "share0".into(),
            path: "/Users/ada".into(),
            read_only: false,
        }];
        assert!(under_a_share("/Users/ada/app/x.js", &shares));
        assert!(!under_a_share("/Users/ada", &shares));
        assert!(!under_a_share("/Users/adam/x", &shares));
        assert!(!under_a_share("/etc/passwd", &shares));
        assert!(!under_a_share("/Users/ada/../../etc/passwd", &shares));
    }
}

//! Host file events for a share, sent to the guest agent.
//!
//! Only the directories the guest holds are watched (each directory inode
//! the FUSE server has handed out and the guest has not forgotten; a guest
//! inotify watch pins its inode, so every watched directory is among
//! them), not the whole tree: sharing a home directory with a hundred
//! thousand folders costs a watch per folder the guest has looked at.
//! Changes are sent as [`FsEvent`] lines to the agent's vsock port
//! [`FS_EVENTS_PORT`] through the VMM's vsock socket (Firecracker's
//! `CONNECT <port>` convention), reconnecting while the guest boots.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::share::{FsEvent, FsEventKind, FS_EVENTS_PORT};
use notify::event::{ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// Events waiting to be sent; beyond this they are dropped and counted.
const QUEUE: usize = 8192;
/// Events arriving within this window are sent together, duplicates once.
const COALESCE: Duration = Duration::from_millis(20);

/// What [`super::ShareFs`] tells the watcher about directories.
pub trait DirWatch: Send + Sync {
    /// The guest now holds directory `inode`, at `path` on the host.
    fn watch(&self, inode: u64, path: PathBuf);
    /// The guest forgot directory `inode`.
    fn unwatch(&self, inode: u64);
}

/// Watches the directories the guest holds and forwards their changes.
pub struct HostWatcher {
    watcher: Mutex<RecommendedWatcher>,
    dirs: Mutex<HashMap<u64, PathBuf>>,
}

impl std::fmt::Debug for HostWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWatcher").finish()
    }
}

/// Turns one notify event into the events a guest watcher expects.
pub fn translate(ev: &notify::Event) -> Vec<FsEvent> {
    let one = |kind, p: &Path| FsEvent {
        kind,
        path: p.to_string_lossy().into_owned(),
    };
    match ev.kind {
        EventKind::Create(_) => ev
            .paths
            .iter()
            .map(|p| one(FsEventKind::Create, p))
            .collect(),
        EventKind::Remove(_) => ev
            .paths
            .iter()
            .map(|p| one(FsEventKind::Delete, p))
            .collect(),
        EventKind::Modify(ModifyKind::Name(mode)) => match (mode, ev.paths.as_slice()) {
            (RenameMode::Both, [from, to]) => {
                vec![one(FsEventKind::Delete, from), one(FsEventKind::Create, to)]
            }
            (RenameMode::From, paths) => {
                paths.iter().map(|p| one(FsEventKind::Delete, p)).collect()
            }
            (_, paths) => paths.iter().map(|p| one(FsEventKind::Create, p)).collect(),
        },
        EventKind::Modify(ModifyKind::Metadata(_)) | EventKind::Access(_) => Vec::new(),
        EventKind::Modify(_) => ev
            .paths
            .iter()
            .map(|p| one(FsEventKind::Modify, p))
            .collect(),
        EventKind::Any | EventKind::Other => Vec::new(),
    }
}

impl HostWatcher {
    /// Starts watching (nothing yet) and sending to the guest's port
    /// [`FS_EVENTS_PORT`] through `vsock_uds`.
    pub fn start(vsock_uds: &Path) -> notify::Result<Arc<HostWatcher>> {
        let (tx, rx) = sync_channel::<FsEvent>(QUEUE);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handler = {
            let dropped = dropped.clone();
            move |res: notify::Result<notify::Event>| {
                let Ok(ev) = res else { return };
                for e in translate(&ev) {
                    if let Err(TrySendError::Full(_)) = tx.try_send(e) {
                        dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        };
        let watcher = notify::recommended_watcher(handler)?;
        let uds = vsock_uds.to_path_buf();
        std::thread::Builder::new()
            .name("fs-events".into())
            .spawn(move || send_loop(&uds, rx, &dropped))
            .map_err(notify::Error::io)?;
        Ok(Arc::new(HostWatcher {
            watcher: Mutex::new(watcher),
            dirs: Mutex::new(HashMap::new()),
        }))
    }

    /// Directories watched now.
    pub fn watched(&self) -> usize {
        self.dirs.lock().map(|d| d.len()).unwrap_or(0)
    }
}

impl DirWatch for HostWatcher {
    fn watch(&self, inode: u64, path: PathBuf) {
        let Ok(mut dirs) = self.dirs.lock() else {
            return;
        };
        if dirs.contains_key(&inode) {
            return;
        }
        let ok = self
            .watcher
            .lock()
            .map(|mut w| w.watch(&path, RecursiveMode::NonRecursive))
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if ok {
            dirs.insert(inode, path);
        }
    }

    fn unwatch(&self, inode: u64) {
        let Ok(mut dirs) = self.dirs.lock() else {
            return;
        };
        if let Some(path) = dirs.remove(&inode) {
            // Another inode may still hold the same path (renamed over).
            if !dirs.values().any(|p| p == &path) {
                if let Ok(mut w) = self.watcher.lock() {
                    let _ = w.unwatch(&path);
                }
            }
        }
    }
}

/// Sends events to the guest, connecting (again) as needed. Events that
/// arrive while the guest cannot be reached are dropped: they describe
/// changes the guest will see when it looks.
fn send_loop(uds: &Path, rx: Receiver<FsEvent>, dropped: &std::sync::atomic::AtomicU64) {
    let mut conn: Option<UnixStream> = None;
    let mut log = berth_limits::RateLimiter::default();
    loop {
        let first = match rx.recv() {
            Ok(e) => e,
            Err(_) => return,
        };
        let mut batch = vec![first];
        loop {
            match rx.recv_timeout(COALESCE) {
                Ok(e) if batch.len() < 1024 => batch.push(e),
                Ok(e) => {
                    batch.push(e);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let mut seen = HashSet::new();
        let mut text = String::new();
        for e in &batch {
            if seen.insert((e.kind, e.path.as_str())) {
                text.push_str(&e.encode());
            }
        }
        for attempt in 0..2 {
            if conn.is_none() {
                conn = connect(uds).ok();
            }
            let Some(c) = conn.as_mut() else { break };
            if c.write_all(text.as_bytes()).is_ok() {
                break;
            }
            conn = None;
            if attempt == 1 {
                break;
            }
        }
        if conn.is_none() {
            if let Some(s) = log.hit() {
                tracing::debug!(
                    "file events: the guest is not listening yet; {} dropped{s}",
                    batch.len() as u64 + dropped.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        }
    }
}

fn connect(uds: &Path) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {FS_EVENTS_PORT}\n").as_bytes())?;
    let mut line = String::new();
    // One byte at a time would be exact; the agent never writes on this
    // port, so nothing follows the reply.
    BufReader::new(&mut s).read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("guest port {FS_EVENTS_PORT}: {}", line.trim()),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    /// A stand-in for the VMM's vsock socket and the agent's port: accepts
    /// `CONNECT 1032`, answers OK and collects the event lines.
    fn fake_guest(uds: &Path) -> std::sync::mpsc::Receiver<String> {
        let listener = UnixListener::bind(uds).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, format!("CONNECT {FS_EVENTS_PORT}\n"));
            s.write_all(b"OK 1032\n").unwrap();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let _ = tx.send(line.trim_end().to_owned());
            }
        });
        rx
    }

    fn wait_for(rx: &std::sync::mpsc::Receiver<String>, want: &str) -> Duration {
        let t = Instant::now();
        let mut got = Vec::new();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                if l == want {
                    return t.elapsed();
                }
                got.push(l);
            }
        }
        panic!("no {want:?} within 10 s; got {got:?}");
    }

    #[test]
    fn host_changes_in_held_directories_reach_the_guest_port() {
        let dir = std::env::temp_dir().join(format!("berth-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("held")).unwrap();
        std::fs::create_dir_all(dir.join("not-held")).unwrap();
        let uds = dir.join("vsock.sock");
        let rx = fake_guest(&uds);
        let w = HostWatcher::start(&uds).unwrap();
        w.watch(7, dir.join("held"));
        assert_eq!(w.watched(), 1);
        let f = dir.join("held/app.js");
        std::fs::write(&f, "v1").unwrap();
        let p = f.display();
        wait_for(&rx, &format!("create {p}"));
        std::fs::write(&f, "v2").unwrap();
        wait_for(&rx, &format!("modify {p}"));
        std::fs::rename(&f, dir.join("held/app2.js")).unwrap();
        wait_for(&rx, &format!("delete {p}"));
        wait_for(
            &rx,
            &format!("create {}", dir.join("held/app2.js").display()),
        );
        std::fs::remove_file(dir.join("held/app2.js")).unwrap();
        wait_for(
            &rx,
            &format!("delete {}", dir.join("held/app2.js").display()),
        );
        // A directory the guest does not hold is not watched; one it let
        // go is not watched any more.
        std::fs::write(dir.join("not-held/x"), "x").unwrap();
        w.unwatch(7);
        assert_eq!(w.watched(), 0);
        std::fs::write(dir.join("held/late"), "x").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let rest: Vec<String> = rx.try_iter().collect();
        assert!(
            rest.iter()
                .all(|l| !l.contains("not-held") && !l.contains("late")),
            "{rest:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::share::{FsEvent, FS_EVENTS_PORT, RECLAIM_LINE};

use super::hostevents::{self, EventSource, OnEvent};

/// Events waiting to be sent; beyond this they are dropped and counted.
const QUEUE: usize = 8192;
/// Events arriving within this window are sent together, duplicates once.
const COALESCE: Duration = Duration::from_millis(20);
/// Host events for a path the guest itself changed this recently are its
/// own changes coming back: the guest's kernel has already told its
/// watchers, so they are dropped rather than sent again.
pub const ECHO: Duration = Duration::from_secs(1);
/// Paths remembered for [`ECHO`]; beyond this the oldest are forgotten
/// (their echoes are then sent, which costs time, not correctness).
const ECHO_PATHS: usize = 16384;

/// What [`super::ShareFs`] tells the watcher about directories.
pub trait DirWatch: Send + Sync {
    /// The guest now holds directory `inode`, at `path` on the host.
    fn watch(&self, inode: u64, path: PathBuf);
    /// The guest forgot directory `inode`.
    fn unwatch(&self, inode: u64);
    /// The guest is about to change `path` (create, write, rename, remove,
    /// attributes): the host event that follows is an echo.
    fn guest_changed(&self, path: PathBuf);
    /// The guest holds most of the inodes it may: ask it to let go of
    /// those it does not use.
    fn reclaim(&self);
}

/// What the sender thread sends.
enum Line {
    Event(FsEvent),
    Reclaim,
}

/// Paths the guest changed recently, with when.
#[derive(Default)]
struct Echoes {
    at: HashMap<PathBuf, Instant>,
}

impl Echoes {
    fn note(&mut self, path: PathBuf, now: Instant) {
        if self.at.len() >= ECHO_PATHS {
            self.at.retain(|_, t| now.duration_since(*t) < ECHO);
            if self.at.len() >= ECHO_PATHS {
                self.at.clear();
            }
        }
        self.at.insert(path, now);
    }

    /// Whether a host event for `path` now is the guest's own change.
    fn is_echo(&self, path: &Path, now: Instant) -> bool {
        self.at
            .get(path)
            .is_some_and(|t| now.duration_since(*t) < ECHO)
    }
}

/// Watches the directories the guest holds and forwards their changes.
pub struct HostWatcher {
    tx: std::sync::mpsc::SyncSender<Line>,
    /// Watch changes, applied in order by the `fs-watch` thread.
    ctl: std::sync::mpsc::SyncSender<Ctl>,
    dirs: Mutex<Dirs>,
    echoes: Arc<Mutex<Echoes>>,
    echoed: Arc<AtomicU64>,
}

/// Watch changes waiting for the `fs-watch` thread; a FUSE request that
/// finds the queue full waits for room.
const CTL_QUEUE: usize = 65536;

/// What the `fs-watch` thread is asked to do: watch changes are made off
/// the FUSE request path (with notify they were a round trip to its event
/// thread, which may be busy with a burst of host events).
enum Ctl {
    Watch(PathBuf),
    Unwatch(PathBuf),
    /// Answered once everything sent before it is applied.
    Settle(std::sync::mpsc::SyncSender<()>),
}

/// The directories the guest holds, and how many held inodes name each
/// path (a directory renamed over another leaves two).
#[derive(Default)]
struct Dirs {
    by_inode: HashMap<u64, PathBuf>,
    users: HashMap<PathBuf, usize>,
}

impl std::fmt::Debug for HostWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWatcher").finish()
    }
}

impl HostWatcher {
    /// Starts watching (nothing yet) and sending to the guest's port
    /// [`FS_EVENTS_PORT`] through `vsock_uds`.
    pub fn start(vsock_uds: &Path) -> std::io::Result<Arc<HostWatcher>> {
        Self::start_with(vsock_uds, hostevents::platform)
    }

    /// [`HostWatcher::start`] with the given event source.
    pub fn start_with(
        vsock_uds: &Path,
        source: impl FnOnce(OnEvent) -> std::io::Result<Box<dyn EventSource>>,
    ) -> std::io::Result<Arc<HostWatcher>> {
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let echoes = Arc::new(Mutex::new(Echoes::default()));
        let echoed = Arc::new(AtomicU64::new(0));
        let on_event: OnEvent = {
            let tx = tx.clone();
            let (dropped, echoes, echoed) = (dropped.clone(), echoes.clone(), echoed.clone());
            Box::new(move |e: FsEvent| {
                let echo = echoes
                    .lock()
                    .map(|x| x.is_echo(Path::new(&e.path), Instant::now()))
                    .unwrap_or(false);
                if echo {
                    echoed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if let Err(TrySendError::Full(_)) = tx.try_send(Line::Event(e)) {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let mut source = source(on_event)?;
        let (ctl, ctl_rx) = sync_channel::<Ctl>(CTL_QUEUE);
        std::thread::Builder::new()
            .name("fs-watch".into())
            .spawn(move || {
                let mut log = berth_limits::RateLimiter::default();
                for c in ctl_rx {
                    match c {
                        Ctl::Watch(p) => {
                            if let Err(e) = source.watch(&p) {
                                if let Some(s) = log.hit() {
                                    tracing::warn!(
                                        "cannot watch {} for host changes: {e}{s}",
                                        p.display()
                                    );
                                }
                            }
                        }
                        Ctl::Unwatch(p) => source.unwatch(&p),
                        Ctl::Settle(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        let uds = vsock_uds.to_path_buf();
        std::thread::Builder::new()
            .name("fs-events".into())
            .spawn(move || send_loop(&uds, rx, &dropped))?;
        Ok(Arc::new(HostWatcher {
            tx,
            ctl,
            dirs: Mutex::new(Dirs::default()),
            echoes,
            echoed,
        }))
    }

    /// Host events dropped as echoes of the guest's own changes.
    pub fn echoes_dropped(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Directories watched now (or about to be).
    pub fn watched(&self) -> usize {
        self.dirs.lock().map(|d| d.by_inode.len()).unwrap_or(0)
    }

    /// Returns once every watch change asked for so far is in place.
    pub fn settle(&self) {
        let (done, wait) = sync_channel(1);
        if self.ctl.send(Ctl::Settle(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

impl DirWatch for HostWatcher {
    fn watch(&self, inode: u64, path: PathBuf) {
        let Ok(mut dirs) = self.dirs.lock() else {
            return;
        };
        if dirs.by_inode.contains_key(&inode) {
            return;
        }
        dirs.by_inode.insert(inode, path.clone());
        *dirs.users.entry(path.clone()).or_insert(0) += 1;
        // Watched again even if another inode names the path: that one may
        // be a directory since removed on the host, its watch gone with it.
        // Sent under the lock, so changes to one path stay in order.
        let _ = self.ctl.send(Ctl::Watch(path));
    }

    fn reclaim(&self) {
        let _ = self.tx.try_send(Line::Reclaim);
    }

    fn guest_changed(&self, path: PathBuf) {
        if let Ok(mut e) = self.echoes.lock() {
            e.note(path, Instant::now());
        }
    }

    fn unwatch(&self, inode: u64) {
        let Ok(mut dirs) = self.dirs.lock() else {
            return;
        };
        let Some(path) = dirs.by_inode.remove(&inode) else {
            return;
        };
        // Another inode may still hold the same path (renamed over).
        if let Some(users) = dirs.users.get_mut(&path) {
            *users -= 1;
            if *users == 0 {
                dirs.users.remove(&path);
                let _ = self.ctl.send(Ctl::Unwatch(path));
            }
        }
    }
}

/// Sends events to the guest, connecting (again) as needed. Events that
/// arrive while the guest cannot be reached are dropped: they describe
/// changes the guest will see when it looks.
fn send_loop(uds: &Path, rx: Receiver<Line>, dropped: &AtomicU64) {
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
        let mut reclaim = false;
        for l in &batch {
            match l {
                Line::Event(e) => {
                    if seen.insert((e.kind, e.path.as_str())) {
                        text.push_str(&e.encode());
                    }
                }
                Line::Reclaim if !reclaim => {
                    reclaim = true;
                    text.push_str(RECLAIM_LINE);
                    text.push('\n');
                }
                Line::Reclaim => {}
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
                    batch.len() as u64 + dropped.load(Ordering::Relaxed)
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

    /// The lines that arrived before `want`, and when it came.
    fn lines_until(rx: &std::sync::mpsc::Receiver<String>, want: &str) -> (Vec<String>, Duration) {
        let t = Instant::now();
        let mut got = Vec::new();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                if l == want {
                    return (got, t.elapsed());
                }
                got.push(l);
            }
        }
        panic!("no {want:?} within 10 s; got {got:?}");
    }

    fn wait_for(rx: &std::sync::mpsc::Receiver<String>, want: &str) -> Duration {
        lines_until(rx, want).1
    }

    /// Each event source this platform can use.
    fn sources() -> Vec<(&'static str, hostevents::MakeSource)> {
        let mut v: Vec<(&str, hostevents::MakeSource)> =
            vec![("notify", |f| Ok(Box::new(hostevents::Notify::start(f)?)))];
        #[cfg(target_os = "linux")]
        v.push(("inotify", |f| Ok(Box::new(hostevents::Inotify::start(f)?))));
        v
    }

    #[test]
    fn host_changes_in_held_directories_reach_the_guest_port() {
        for (name, source) in sources() {
            host_changes_reach_the_guest(name, source);
        }
    }

    fn host_changes_reach_the_guest(name: &str, source: hostevents::MakeSource) {
        let dir = std::env::temp_dir().join(format!("berth-watch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("held")).unwrap();
        std::fs::create_dir_all(dir.join("not-held")).unwrap();
        let uds = dir.join("vsock.sock");
        let rx = fake_guest(&uds);
        let w = HostWatcher::start_with(&uds, source).unwrap();
        w.watch(7, dir.join("held"));
        assert_eq!(w.watched(), 1);
        w.settle();
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
        w.settle();
        std::fs::write(dir.join("held/late"), "x").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let rest: Vec<String> = rx.try_iter().collect();
        assert!(
            rest.iter()
                .all(|l| !l.contains("not-held") && !l.contains("late")),
            "{rest:?}"
        );
        // A burst of host changes arrives whole.
        w.watch(8, dir.join("not-held"));
        w.settle();
        for i in 0..300 {
            std::fs::write(dir.join(format!("not-held/b{i}")), "x").unwrap();
        }
        for i in 0..300 {
            wait_for(
                &rx,
                &format!("create {}", dir.join(format!("not-held/b{i}")).display()),
            );
        }
        // Reading a file is not a change.
        let _ = std::fs::read(dir.join("not-held/b0")).unwrap();
        std::fs::write(dir.join("not-held/last"), "x").unwrap();
        let (before, _) = lines_until(
            &rx,
            &format!("create {}", dir.join("not-held/last").display()),
        );
        assert!(
            before.iter().all(|l| !l.contains("b0")),
            "{name}: {before:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_guests_own_changes_are_not_sent_back() {
        use crate::virtio::fs::testing::Guest;
        use crate::virtio::fs::{ShareFs, ShareOptions};
        use fuse_backend_rs::abi::fuse_abi::{EntryOut, OpenOut};
        use vm_memory::ByteValued;
        let dir = std::env::temp_dir().join(format!("berth-echo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("share")).unwrap();
        let uds = dir.join("vsock.sock");
        let rx = fake_guest(&uds);
        let w = HostWatcher::start(&uds).unwrap();
        let fs = ShareFs::new(
            &dir.join("share"),
            ShareOptions {
                read_only: false,
                max_inodes: 100,
                max_handles: 100,
            },
        )
        .unwrap()
        .with_watch(w.clone());
        let mut g = Guest::with_fs(fs);
        assert_eq!(w.watched(), 1, "the share's root is watched");
        w.settle();
        // The guest creates, writes and removes 50 files: its kernel has
        // told its own watchers; none of it comes back.
        for i in 0..50 {
            let e = g.create(1, &format!("g{i}"), 0o644).ok();
            let out = EntryOut::from_slice(&e[..std::mem::size_of::<EntryOut>()])
                .copied()
                .unwrap();
            let open = OpenOut::from_slice(&e[std::mem::size_of::<EntryOut>()..])
                .copied()
                .unwrap();
            g.write(out.nodeid, open.fh, b"from the guest").ok();
            g.release(out.nodeid, open.fh).ok();
            if i % 2 == 0 {
                g.unlink(1, &format!("g{i}")).ok();
            }
        }
        // A host change right after is sent, and is the first line.
        let host = dir.join("share/from-host");
        std::fs::write(&host, "x").unwrap();
        let (mut before, _) = lines_until(&rx, &format!("create {}", host.display()));
        std::thread::sleep(Duration::from_millis(300));
        before.extend(rx.try_iter());
        assert!(before.iter().all(|l| !l.contains("/g")), "{before:?}");
        assert!(w.echoes_dropped() >= 50, "{} echoes", w.echoes_dropped());
        // Later host edits of a file the guest wrote are sent again.
        std::thread::sleep(ECHO);
        let g1 = dir.join("share/g1");
        std::fs::write(&g1, "edited on the host").unwrap();
        wait_for(&rx, &format!("modify {}", g1.display()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

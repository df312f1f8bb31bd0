//! Where host file events come from: inotify read in bursts on Linux,
//! the `notify` crate elsewhere (FSEvents on macOS, ReadDirectoryChangesW
//! on Windows), behind one small trait.
//!
//! Why not `notify` on Linux too: its inotify loop wakes for every single
//! event, watches for events nothing here uses (`IN_OPEN` for each file
//! the guest reads through the share, `IN_ATTRIB` for each `utimes` of an
//! extract, `IN_CLOSE_*`), and on each removed directory it watches scans
//! every watch for paths under it (quadratic in an `rm -rf`). Under a
//! guest's bulk work those wakeups compete with the FUSE request thread
//! and the VMM for the host's cores: a guest `rm -rf` of 10,482 entries
//! took 6.6–7.3 s with notify's watches and 5.7–6.0 s with none (QEMU TCG,
//! docs/benchmarks.md). The reader here asks only for what becomes an
//! event, and after a wakeup lets the burst gather for [`BURST`] and takes
//! it whole.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::share::{FsEvent, FsEventKind};

/// Turns host events into [`FsEvent`]s for a callback; watches single
/// directories (not recursive).
pub trait EventSource: Send {
    /// Starts watching directory `path`. Watching it again is harmless.
    fn watch(&mut self, path: &Path) -> io::Result<()>;
    /// Stops watching `path` (nothing if it is not watched).
    fn unwatch(&mut self, path: &Path);
}

/// What an [`EventSource`] calls for each event, on its own thread.
pub type OnEvent = Box<dyn FnMut(FsEvent) + Send>;

/// Starts an [`EventSource`] that reports to a callback.
pub type MakeSource = fn(OnEvent) -> io::Result<Box<dyn EventSource>>;

/// After a wakeup, how long the reader lets a burst of events gather
/// before it reads them all (well under the one second file events are
/// promised within).
pub const BURST: Duration = Duration::from_millis(10);

/// The platform's event source.
pub fn platform(on_event: OnEvent) -> io::Result<Box<dyn EventSource>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(Inotify::start(on_event)?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(Box::new(Notify::start(on_event)?))
    }
}

fn event(kind: FsEventKind, path: &Path) -> FsEvent {
    FsEvent {
        kind,
        path: path.to_string_lossy().into_owned(),
    }
}

#[cfg(target_os = "linux")]
/// Watched directories by descriptor and by path.
#[derive(Default)]
struct Wds {
    by_wd: HashMap<inotify::WatchDescriptor, PathBuf>,
    by_path: HashMap<PathBuf, inotify::WatchDescriptor>,
}

#[cfg(target_os = "linux")]
/// inotify, read in bursts by an `fs-inotify` thread.
pub struct Inotify {
    watches: inotify::Watches,
    wds: Arc<Mutex<Wds>>,
}

#[cfg(target_os = "linux")]
impl std::fmt::Debug for Inotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inotify").finish()
    }
}

#[cfg(target_os = "linux")]
impl Inotify {
    /// Exactly the events that become [`FsEvent`]s, on directories only,
    /// never through a symlink, and none for names already unlinked.
    fn mask() -> inotify::WatchMask {
        use inotify::WatchMask as M;
        M::CREATE
            | M::DELETE
            | M::MODIFY
            | M::MOVED_FROM
            | M::MOVED_TO
            | M::DELETE_SELF
            | M::ONLYDIR
            | M::DONT_FOLLOW
            | M::EXCL_UNLINK
    }

    pub fn start(on_event: OnEvent) -> io::Result<Inotify> {
        let ino = inotify::Inotify::init()?;
        let watches = ino.watches();
        let wds = Arc::new(Mutex::new(Wds::default()));
        let w = wds.clone();
        std::thread::Builder::new()
            .name("fs-inotify".into())
            .spawn(move || read_loop(ino, &w, on_event))?;
        Ok(Inotify { watches, wds })
    }
}

#[cfg(target_os = "linux")]
impl EventSource for Inotify {
    fn watch(&mut self, path: &Path) -> io::Result<()> {
        let wd = self.watches.add(path, Self::mask())?;
        if let Ok(mut w) = self.wds.lock() {
            // The same directory under a new name keeps its descriptor.
            if let Some(old) = w.by_wd.insert(wd.clone(), path.to_path_buf()) {
                w.by_path.remove(&old);
            }
            w.by_path.insert(path.to_path_buf(), wd);
        }
        Ok(())
    }

    fn unwatch(&mut self, path: &Path) {
        let wd = match self.wds.lock() {
            Ok(mut w) => match w.by_path.remove(path) {
                Some(wd) => {
                    w.by_wd.remove(&wd);
                    wd
                }
                None => return,
            },
            Err(_) => return,
        };
        // Fails if the kernel already dropped it (the directory is gone).
        let _ = self.watches.remove(wd);
    }
}

#[cfg(target_os = "linux")]
/// Reads events until the process ends: a blocking read, then the rest of
/// the burst after [`BURST`].
fn read_loop(mut ino: inotify::Inotify, wds: &Mutex<Wds>, mut on_event: OnEvent) {
    let mut buf = vec![0u8; 64 << 10];
    let mut log = berth_limits::RateLimiter::default();
    loop {
        match ino.read_events_blocking(&mut buf) {
            Ok(evs) => handle(evs, wds, &mut on_event, &mut log),
            Err(e) => {
                if let Some(s) = log.hit() {
                    tracing::warn!("reading host file events failed: {e}{s}");
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        std::thread::sleep(BURST);
        // Until `WouldBlock`: the burst is read.
        while let Ok(evs) = ino.read_events(&mut buf) {
            let mut any = false;
            handle(evs.inspect(|_| any = true), wds, &mut on_event, &mut log);
            if !any {
                break;
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn handle<'a>(
    evs: impl Iterator<Item = inotify::Event<&'a std::ffi::OsStr>>,
    wds: &Mutex<Wds>,
    on_event: &mut OnEvent,
    log: &mut berth_limits::RateLimiter,
) {
    use inotify::EventMask as E;
    let Ok(mut w) = wds.lock() else { return };
    for ev in evs {
        if ev.mask.contains(E::Q_OVERFLOW) {
            if let Some(s) = log.hit() {
                tracing::warn!(
                    "host file events overflowed the kernel's queue; the guest sees those changes after its cache timeout{s}"
                );
            }
            continue;
        }
        if ev.mask.contains(E::IGNORED) {
            // The kernel dropped the watch (the directory is gone).
            if let Some(p) = w.by_wd.remove(&ev.wd) {
                w.by_path.remove(&p);
            }
            continue;
        }
        let Some(dir) = w.by_wd.get(&ev.wd) else {
            continue;
        };
        let path = match ev.name {
            Some(n) => dir.join(n),
            None => dir.clone(),
        };
        let kind = if ev.mask.intersects(E::CREATE | E::MOVED_TO) {
            FsEventKind::Create
        } else if ev
            .mask
            .intersects(E::DELETE | E::MOVED_FROM | E::DELETE_SELF)
        {
            FsEventKind::Delete
        } else if ev.mask.contains(E::MODIFY) {
            FsEventKind::Modify
        } else {
            continue;
        };
        // The callback only filters and queues; the lock is not held long.
        on_event(event(kind, &path));
    }
}

/// The `notify` crate's watcher for the platform (used off Linux; built
/// and tested everywhere).
pub struct Notify(notify::RecommendedWatcher);

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify").finish()
    }
}

impl Notify {
    pub fn start(mut on_event: OnEvent) -> io::Result<Notify> {
        let w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                for e in translate(&ev) {
                    on_event(e);
                }
            }
        })
        .map_err(io::Error::other)?;
        Ok(Notify(w))
    }
}

impl EventSource for Notify {
    fn watch(&mut self, path: &Path) -> io::Result<()> {
        use notify::Watcher;
        self.0
            .watch(path, notify::RecursiveMode::NonRecursive)
            .map_err(io::Error::other)
    }

    fn unwatch(&mut self, path: &Path) {
        use notify::Watcher;
        let _ = self.0.unwatch(path);
    }
}

/// Turns one notify event into the events a guest watcher expects.
pub fn translate(ev: &notify::Event) -> Vec<FsEvent> {
    use notify::event::{ModifyKind, RenameMode};
    use notify::EventKind;
    let all = |kind| ev.paths.iter().map(|p| event(kind, p)).collect();
    match ev.kind {
        EventKind::Create(_) => all(FsEventKind::Create),
        EventKind::Remove(_) => all(FsEventKind::Delete),
        EventKind::Modify(ModifyKind::Name(mode)) => match (mode, ev.paths.as_slice()) {
            (RenameMode::Both, [from, to]) => vec![
                event(FsEventKind::Delete, from),
                event(FsEventKind::Create, to),
            ],
            (RenameMode::From, _) => all(FsEventKind::Delete),
            _ => all(FsEventKind::Create),
        },
        EventKind::Modify(ModifyKind::Metadata(_)) | EventKind::Access(_) => Vec::new(),
        EventKind::Modify(_) => all(FsEventKind::Modify),
        EventKind::Any | EventKind::Other => Vec::new(),
    }
}

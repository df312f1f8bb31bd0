//! One shared host folder as the guest sees it: `fuse-backend-rs`'s
//! passthrough file system behind a layer that keeps the guest inside the
//! share and keeps the guest's idea of ownership off the host.
//!
//! * **Ownership.** Every host operation runs with the server's own
//!   credentials, so whatever a container creates belongs to the host user
//!   running Berth. The owner the guest asked for (at creation, or with
//!   `chown`) is kept in the `user.berth.owner` extended attribute
//!   (`"uid:gid"`) and shown to the guest in place of the host owner; the
//!   host file's owner never changes. Where the host file system has no
//!   user xattrs (or on a symlink, which cannot carry them), the guest's
//!   view lives in memory until the share is served again.
//! * **Confinement.** Names with `/`, `.` and `..` are refused (the
//!   passthrough resolves every name with `openat(O_NOFOLLOW)` relative to
//!   its parent's descriptor, so a symlink is never followed on the host);
//!   a symlink inode is never opened or truncated; device nodes cannot be
//!   created; setuid and setgid bits never reach the host; the guest's own
//!   xattr requests are answered "not supported", so it can neither read
//!   nor forge ours (nor set file capabilities).
//! * **Bounds.** At most `max_inodes` inodes and `max_handles` open files
//!   and directories (each holds a host descriptor) at once; lookups and
//!   opens beyond fail with `ENFILE`.
//! * A read-only share refuses every change with `EROFS`.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

/// The extended attribute holding the guest's view of a file's owner.
pub const OWNER_XATTR: &str = "user.berth.owner";
const OWNER_XATTR_C: &CStr = c"user.berth.owner";

/// How long the guest may cache attributes and names. Host edits reach the
/// guest within this time (and at once for a file opened after them: the
/// `auto` cache policy drops a file's cached pages when it is opened with a
/// changed size or mtime).
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

const SUID_SGID: u32 = libc::S_ISUID | libc::S_ISGID;

/// The guest is asked to let go of the inodes it does not use once it
/// holds this share of the bound (in eighths), at most every
/// [`RECLAIM_EVERY`]; at the bound a lookup waits up to [`RECLAIM_WAIT`]
/// for its FORGETs before failing with `ENFILE`.
const RECLAIM_AT_EIGHTHS: usize = 7;
const RECLAIM_EVERY: Duration = Duration::from_millis(250);
pub const RECLAIM_WAIT: Duration = Duration::from_secs(2);

/// Directory offsets after `.` and after `..`, which come last: no host
/// file system hands out offsets this large (they are negative as `off_t`).
const DOT_OFF: u64 = u64::MAX - 1;
const DOTDOT_OFF: u64 = u64::MAX;

/// How a share is served.
#[derive(Debug, Clone)]
pub struct ShareOptions {
    pub read_only: bool,
    /// Most inodes the guest may hold at once (each costs a descriptor).
    pub max_inodes: usize,
    /// Most files and directories the guest may have open at once (each
    /// costs a descriptor).
    pub max_handles: usize,
}

impl ShareOptions {
    /// Splits `fds` descriptors between inodes (seven eighths) and open
    /// handles (an eighth: a guest rarely holds thousands of files open,
    /// while a `node_modules` tree is cached inode by inode).
    pub fn within_fds(read_only: bool, fds: usize) -> ShareOptions {
        let handles = (fds / 8).max(16);
        ShareOptions {
            read_only,
            max_inodes: fds.saturating_sub(handles).max(16),
            max_handles: handles,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Node {
    /// `S_IFMT` bits of the host file.
    kind: u32,
    /// The guest's view of the owner, if it differs from the host's.
    owner: Option<(u32, u32)>,
    /// Lookups the guest has not forgotten yet.
    refs: u64,
}

/// A shared folder, ready for a FUSE server.
pub struct ShareFs {
    inner: PassthroughFs<()>,
    root: std::path::PathBuf,
    watch: Option<std::sync::Arc<dyn super::watch::DirWatch>>,
    opts: ShareOptions,
    nodes: Mutex<HashMap<u64, Node>>,
    /// Signalled when the guest forgets an inode and [`Self::waiting`]
    /// says someone waits for it.
    freed: std::sync::Condvar,
    /// Requests waiting on [`Self::freed`]; changed and read only with
    /// `nodes` locked, so a wakeup is never missed, and a FORGET with no
    /// one waiting makes no system call (it made a futex wake per
    /// forgotten inode).
    waiting: std::sync::atomic::AtomicUsize,
    /// When the guest was last asked to let go of inodes.
    last_reclaim: Mutex<Option<std::time::Instant>>,
    /// Handles the guest holds open (released only once each).
    handles: Mutex<std::collections::HashSet<u64>>,
    log: Mutex<berth_limits::RateLimiter>,
}

impl std::fmt::Debug for ShareFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFs").field("opts", &self.opts).finish()
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The context every host operation runs with: the server's own
/// credentials (uid/gid 0 tells the passthrough not to switch).
fn host_ctx(ctx: &Context) -> Context {
    Context {
        uid: 0,
        gid: 0,
        pid: ctx.pid,
    }
}

/// Refuses a name that is not one plain path component.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(err(libc::EINVAL));
    }
    Ok(())
}

fn parse_owner(v: &[u8]) -> Option<(u32, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (u, g) = s.trim().split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

impl ShareFs {
    /// Serves the folder `root` (which must exist and be a directory).
    pub fn new(root: &Path, opts: ShareOptions) -> io::Result<ShareFs> {
        let meta = std::fs::metadata(root)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        let cfg = Config {
            root_dir: root.to_string_lossy().into_owned(),
            cache_policy: CachePolicy::Auto,
            attr_timeout: CACHE_TIMEOUT,
            entry_timeout: CACHE_TIMEOUT,
            // Needed for our own owner attribute; the guest's xattr
            // requests are refused before they get here.
            xattr: true,
            writeback: false,
            do_import: true,
            ..Default::default()
        };
        Ok(ShareFs {
            inner: PassthroughFs::new(cfg)?,
            root: root.to_path_buf(),
            watch: None,
            opts,
            nodes: Mutex::new(HashMap::new()),
            freed: std::sync::Condvar::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            last_reclaim: Mutex::new(None),
            handles: Mutex::new(std::collections::HashSet::new()),
            log: Mutex::new(berth_limits::RateLimiter::default()),
        })
    }

    /// Reports the directories the guest holds to `watch` (host file
    /// events).
    pub fn with_watch(mut self, watch: std::sync::Arc<dyn super::watch::DirWatch>) -> ShareFs {
        self.watch = Some(watch);
        self
    }

    /// How many inodes the guest holds now.
    /// (The share's root is not counted: it is held while mounted.)
    pub fn inodes(&self) -> usize {
        self.nodes
            .lock()
            .map(|n| n.len() - usize::from(n.contains_key(&ROOT_ID)))
            .unwrap_or(0)
    }

    /// How many files and directories the guest has open now.
    pub fn handles(&self) -> usize {
        self.handles.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Before opening: refuses when the guest holds the most handles.
    fn may_open(&self) -> io::Result<()> {
        if self.handles() >= self.opts.max_handles {
            self.warn(format_args!(
                "the guest holds {} open files, the most allowed: refusing more (ENFILE)",
                self.opts.max_handles
            ));
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    /// Counts a handle the passthrough just gave the guest.
    fn opened(&self, handle: Option<u64>) {
        if let (Some(h), Ok(mut set)) = (handle, self.handles.lock()) {
            set.insert(h);
        }
    }

    /// Whether `handle` is one the guest holds; forgets it.
    fn closing(&self, handle: u64) -> bool {
        self.handles
            .lock()
            .map(|mut s| s.remove(&handle))
            .unwrap_or(false)
    }

    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(s) = l.hit() {
                tracing::warn!("virtio-fs: {what}{s}");
            }
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.opts.read_only {
            return Err(err(libc::EROFS));
        }
        Ok(())
    }

    fn kind(&self, inode: u64) -> Option<u32> {
        self.nodes.lock().ok()?.get(&inode).map(|n| n.kind)
    }

    /// Reads the owner attribute of a file or directory.
    fn read_owner(&self, inode: u64, kind: u32) -> Option<(u32, u32)> {
        if kind == libc::S_IFLNK {
            return None;
        }
        match self
            .inner
            .getxattr(&Context::new(), inode, OWNER_XATTR_C, 64)
        {
            Ok(GetxattrReply::Value(v)) => parse_owner(&v),
            _ => None,
        }
    }

    /// Records the guest's view of `inode`'s owner: in the xattr where the
    /// host allows it, in memory in any case.
    fn write_owner(&self, inode: u64, kind: u32, owner: (u32, u32)) {
        if kind != libc::S_IFLNK {
            let v = format!("{}:{}", owner.0, owner.1);
            if let Err(e) =
                self.inner
                    .setxattr(&Context::new(), inode, OWNER_XATTR_C, v.as_bytes(), 0)
            {
                self.warn(format_args!(
                    "cannot keep the guest's owner {v} in {OWNER_XATTR} ({e}); it lasts until the share is served again"
                ));
            }
        }
        if let Ok(mut nodes) = self.nodes.lock() {
            if let Some(n) = nodes.get_mut(&inode) {
                n.owner = Some(owner);
            }
        }
    }

    /// The guest's view of an attribute block.
    fn show(attr: &mut stat64, owner: Option<(u32, u32)>) {
        if let Some((u, g)) = owner {
            attr.st_uid = u;
            attr.st_gid = g;
        }
    }

    /// The node an entry names, loaded if new, without taking a reference.
    fn peek(&self, entry: &Entry) -> io::Result<Node> {
        let known = self
            .nodes
            .lock()
            .map_err(|_| err(libc::EIO))?
            .get(&entry.inode)
            .copied();
        if let Some(n) = known {
            return Ok(n);
        }
        let kind = entry.attr.st_mode & libc::S_IFMT;
        Ok(Node {
            kind,
            owner: self.read_owner(entry.inode, kind),
            refs: 0,
        })
    }

    /// Counts one more guest reference to the entry's inode; a directory
    /// the guest did not hold yet is watched from now on.
    fn hold(&self, entry: &Entry, node: Node) {
        let new = match self.nodes.lock() {
            Ok(mut nodes) => {
                let n = nodes.entry(entry.inode).or_insert(Node { refs: 0, ..node });
                n.refs += 1;
                n.refs == 1
            }
            Err(_) => false,
        };
        if new && node.kind == libc::S_IFDIR {
            if let Some(w) = &self.watch {
                if let Ok(path) = self.inner.readlinkat_proc_file(entry.inode) {
                    w.watch(entry.inode, path);
                }
            }
        }
    }

    /// A new entry for the guest: bounded, shown with the guest's owner,
    /// and counted.
    fn admit(&self, mut entry: Entry) -> io::Result<Entry> {
        if entry.inode == 0 {
            return Ok(entry);
        }
        let node = self.peek(&entry)?;
        if node.refs == 0 {
            if let Err(e) = self.make_room() {
                // Undo the passthrough's own lookup count.
                self.inner.forget(&Context::new(), entry.inode, 1);
                return Err(e);
            }
        }
        Self::show(&mut entry.attr, node.owner);
        self.hold(&entry, node);
        Ok(entry)
    }

    /// Room for one more inode: past seven eighths of the bound the
    /// guest is asked to let go of those it does not use; at the bound this
    /// waits for its FORGETs (served on the other queue) for up to
    /// [`RECLAIM_WAIT`].
    fn make_room(&self) -> io::Result<()> {
        let max = self.opts.max_inodes;
        let held = self.inodes();
        if held < max / 8 * RECLAIM_AT_EIGHTHS {
            return Ok(());
        }
        self.ask_reclaim();
        if held < max {
            return Ok(());
        }
        if self.watch.is_none() {
            // Nobody can ask the guest to let go.
            return Err(self.full());
        }
        let nodes = self.nodes.lock().map_err(|_| err(libc::EIO))?;
        let count = |n: &HashMap<u64, Node>| n.len() - usize::from(n.contains_key(&ROOT_ID));
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waited = self
            .freed
            .wait_timeout_while(nodes, RECLAIM_WAIT, |n| count(n) >= max);
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let (nodes, _) = waited.map_err(|_| err(libc::EIO))?;
        if count(&nodes) >= max {
            drop(nodes);
            return Err(self.full());
        }
        Ok(())
    }

    fn ask_reclaim(&self) {
        let Some(w) = &self.watch else { return };
        if let Ok(mut last) = self.last_reclaim.lock() {
            if last.is_some_and(|t| t.elapsed() < RECLAIM_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        w.reclaim();
    }

    fn full(&self) -> io::Error {
        self.warn(format_args!(
            "the guest holds {} inodes, the most allowed: refusing more (ENFILE)",
            self.opts.max_inodes
        ));
        err(libc::ENFILE)
    }

    fn release_refs(&self, inode: u64, count: u64) {
        if inode == ROOT_ID {
            return;
        }
        let gone_dir = match self.nodes.lock() {
            Ok(mut nodes) => match nodes.get_mut(&inode) {
                Some(n) => {
                    n.refs = n.refs.saturating_sub(count);
                    let gone = n.refs == 0;
                    let dir = n.kind == libc::S_IFDIR;
                    if gone {
                        nodes.remove(&inode);
                        if self.waiting.load(Ordering::Relaxed) > 0 {
                            self.freed.notify_all();
                        }
                    }
                    gone && dir
                }
                None => false,
            },
            Err(_) => false,
        };
        if gone_dir {
            if let Some(w) = &self.watch {
                w.unwatch(inode);
            }
        }
    }

    fn forget_all(&self) {
        let dirs: Vec<u64> = match self.nodes.lock() {
            Ok(mut nodes) => nodes
                .drain()
                .filter(|(_, n)| n.kind == libc::S_IFDIR)
                .map(|(i, _)| i)
                .collect(),
            Err(_) => Vec::new(),
        };
        self.freed.notify_all();
        if let Some(w) = &self.watch {
            for d in dirs {
                w.unwatch(d);
            }
            w.unwatch(ROOT_ID);
        }
        if let Ok(mut h) = self.handles.lock() {
            h.clear();
        }
    }

    /// After creating `entry` for a guest caller: keep the caller's
    /// identity as the guest's view of the owner.
    fn created(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        let entry = self.admit(entry)?;
        let kind = entry.attr.st_mode & libc::S_IFMT;
        let mut entry = entry;
        if (ctx.uid, ctx.gid) != (entry.attr.st_uid, entry.attr.st_gid) {
            self.write_owner(entry.inode, kind, (ctx.uid, ctx.gid));
            Self::show(&mut entry.attr, Some((ctx.uid, ctx.gid)));
        }
        Ok(entry)
    }

    fn owner_of(&self, inode: u64) -> Option<(u32, u32)> {
        self.nodes.lock().ok()?.get(&inode).and_then(|n| n.owner)
    }

    /// Tells the watcher the guest is about to change `inode` (or the entry
    /// `name` in directory `inode`), so the host event that follows is not
    /// sent back to the guest.
    fn changing(&self, inode: u64, name: Option<&CStr>) -> Option<PathBuf> {
        let w = self.watch.as_ref()?;
        let mut path = self.inner.readlinkat_proc_file(inode).ok()?;
        if let Some(n) = name {
            path.push(std::ffi::OsStr::from_bytes(n.to_bytes()));
        }
        w.guest_changed(path.clone());
        Some(path)
    }

    /// `.` and `..`, which the passthrough leaves out, listed after the
    /// directory's last entry (at offsets no host directory uses) from
    /// `offset` on: a listing from a host offset that brings no entry has
    /// reached the end.
    fn dots(&self, inode: u64, offset: u64) -> Vec<DirEntry<'static>> {
        use std::os::unix::fs::MetadataExt;
        let own = self
            .inner
            .getattr(&Context::new(), inode, None)
            .map(|(a, _)| a.st_ino)
            .unwrap_or(inode);
        let parent = if inode == ROOT_ID {
            own
        } else {
            self.inner
                .readlinkat_proc_file(inode)
                .ok()
                .and_then(|p| std::fs::symlink_metadata(p.parent()?).ok())
                .map_or(own, |m| m.ino())
        };
        let dir = |ino, offset, name: &'static [u8]| DirEntry {
            ino,
            offset,
            type_: u32::from(libc::DT_DIR),
            name,
        };
        match offset {
            DOTDOT_OFF => Vec::new(),
            DOT_OFF => vec![dir(parent, DOTDOT_OFF, b"..")],
            _ => vec![dir(own, DOT_OFF, b"."), dir(parent, DOTDOT_OFF, b"..")],
        }
    }

    /// Refuses to open a symlink inode: the guest resolves symlinks
    /// itself, and opening one on the host could follow it.
    fn not_symlink(&self, inode: u64) -> io::Result<()> {
        if self.kind(inode) == Some(libc::S_IFLNK) {
            return Err(err(libc::ELOOP));
        }
        Ok(())
    }
}

/// The host read for a listing: at least a page, so a host read that
/// brings nothing but `.` and `..` means the directory has ended (the
/// guest's own `size` still bounds the reply).
fn chunk(size: u32) -> u32 {
    size.max(4096)
}

/// What one host read of a listing added to the guest's reply.
struct ListingRead {
    calls: usize,
    full: bool,
    last: u64,
}

impl ListingRead {
    /// Notes an entry at `offset` the reply took `n` bytes of (0: full).
    fn added(&mut self, offset: u64, n: usize) -> usize {
        self.calls += 1;
        if n == 0 {
            self.full = true;
        } else {
            self.last = offset;
        }
        n
    }
}

/// Fills one reply from host reads of a listing, `read(from, tracker)`
/// each: it reads on until the reply is full (`None`: done) or the
/// directory has ended (a read of at least a page that brought nothing but
/// `.` and `..`): `Some(offset)` from which `.` and `..` follow. Reading on,
/// with the dots appended at the end, saves the guest a request per
/// directory listed: under TCG about 0.3 s in a walk of 1,500 directories.
/// An error after entries were added ends the reply with them (the guest
/// asks again from the last one; each was counted once it was added).
fn fill_listing(
    offset: u64,
    mut read: impl FnMut(u64, &mut ListingRead) -> io::Result<()>,
) -> io::Result<Option<u64>> {
    let mut next = offset;
    let mut rounds = 0;
    while next < DOT_OFF {
        let mut p = ListingRead {
            calls: 0,
            full: false,
            last: next,
        };
        rounds += 1;
        match read(next, &mut p) {
            Ok(()) => {}
            Err(e) if rounds == 1 => return Err(e),
            Err(_) => return Ok(None),
        }
        if p.full {
            return Ok(None);
        }
        if p.calls == 0 {
            break;
        }
        next = p.last;
    }
    Ok(Some(next))
}

fn wants_write(flags: u32) -> bool {
    let f = flags as i32;
    (f & libc::O_ACCMODE) != libc::O_RDONLY || f & libc::O_TRUNC != 0
}

impl FileSystem for ShareFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.forget_all();
        // The passthrough asks only for readdirplus; without big writes
        // and max pages the guest sends at most 8 KiB per WRITE and 128 KiB
        // per READ (a 1 GiB write took 110 s under TCG). None of these
        // changes what the guest sees: sizes, parallel requests, O_TRUNC in
        // OPEN, and dropping cached pages when a file's mtime changes.
        let more = FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ASYNC_READ
            | FsOptions::ASYNC_DIO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::AUTO_INVAL_DATA;
        let opts = self.inner.init(capable)? | (capable & more);
        // The root is held for as long as the share is mounted.
        let root = Node {
            kind: libc::S_IFDIR,
            owner: self.read_owner(ROOT_ID, libc::S_IFDIR),
            refs: 1,
        };
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.insert(ROOT_ID, root);
        }
        if let Some(w) = &self.watch {
            w.watch(ROOT_ID, self.root.clone());
        }
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy();
        self.forget_all();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        match self.inner.lookup(&host_ctx(ctx), parent, name) {
            Ok(entry) => self.admit(entry),
            // A name that is not there is cached as such for the cache
            // timeout (node id 0), as for names that are: module
            // resolvers probe many missing paths. A host create of it is
            // seen at once through file events, or after the timeout.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let (attr, _) = self.inner.getattr(&Context::new(), parent, None)?;
                Ok(Entry {
                    inode: 0,
                    generation: 0,
                    attr,
                    attr_flags: 0,
                    attr_timeout: CACHE_TIMEOUT,
                    entry_timeout: CACHE_TIMEOUT,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.release_refs(inode, count);
        self.inner.forget(&host_ctx(ctx), inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in &requests {
            self.release_refs(*inode, *count);
        }
        self.inner.batch_forget(&host_ctx(ctx), requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let (mut attr, t) = self.inner.getattr(&host_ctx(ctx), inode, handle)?;
        Self::show(&mut attr, self.owner_of(inode));
        Ok((attr, t))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        mut valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        let kind = self.kind(inode);
        if kind == Some(libc::S_IFLNK) && valid.intersects(SetattrValid::SIZE | SetattrValid::MODE)
        {
            return Err(err(libc::EOPNOTSUPP));
        }
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            let (mut cur, _) = self.getattr(ctx, inode, handle)?;
            if valid.contains(SetattrValid::UID) {
                cur.st_uid = attr.st_uid;
            }
            if valid.contains(SetattrValid::GID) {
                cur.st_gid = attr.st_gid;
            }
            let kind = kind.unwrap_or(cur.st_mode & libc::S_IFMT);
            self.write_owner(inode, kind, (cur.st_uid, cur.st_gid));
            valid.remove(SetattrValid::UID | SetattrValid::GID);
        }
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode &= !SUID_SGID;
        }
        if !valid.is_empty() {
            self.changing(inode, None);
        }
        let (mut out, t) = if valid.is_empty() {
            self.inner.getattr(&host_ctx(ctx), inode, handle)?
        } else {
            self.inner
                .setattr(&host_ctx(ctx), inode, attr, handle, valid)?
        };
        Self::show(&mut out, self.owner_of(inode));
        Ok((out, t))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(&host_ctx(ctx), inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        self.changing(parent, Some(name));
        let e = self.inner.symlink(&host_ctx(ctx), linkname, parent, name)?;
        self.created(ctx, e)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(err(libc::EPERM)),
        }
        self.changing(parent, Some(name));
        let e = self
            .inner
            .mknod(&host_ctx(ctx), parent, name, mode & !SUID_SGID, rdev, umask)?;
        self.created(ctx, e)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        self.changing(parent, Some(name));
        let e = self
            .inner
            .mkdir(&host_ctx(ctx), parent, name, mode & !SUID_SGID, umask)?;
        self.created(ctx, e)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.changing(parent, Some(name));
        self.inner.unlink(&host_ctx(ctx), parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.changing(parent, Some(name));
        self.inner.rmdir(&host_ctx(ctx), parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_name(oldname)?;
        check_name(newname)?;
        // RENAME_WHITEOUT creates a device node.
        if flags & libc::RENAME_WHITEOUT != 0 {
            return Err(err(libc::EPERM));
        }
        self.changing(olddir, Some(oldname));
        self.changing(newdir, Some(newname));
        self.inner
            .rename(&host_ctx(ctx), olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_name(newname)?;
        self.changing(newparent, Some(newname));
        let e = self.inner.link(&host_ctx(ctx), inode, newparent, newname)?;
        self.admit(e)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.not_symlink(inode)?;
        if wants_write(flags) {
            self.writable()?;
        }
        self.may_open()?;
        if flags as i32 & libc::O_TRUNC != 0 {
            self.changing(inode, None);
        }
        let r = self.inner.open(&host_ctx(ctx), inode, flags, fuse_flags)?;
        self.opened(r.0);
        Ok(r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        check_name(name)?;
        args.mode &= !SUID_SGID;
        self.may_open()?;
        self.changing(parent, Some(name));
        let (e, h, o, p) = self.inner.create(&host_ctx(ctx), parent, name, args)?;
        match self.created(ctx, e) {
            Ok(e) => {
                self.opened(h);
                Ok((e, h, o, p))
            }
            Err(x) => {
                if let Some(h) = h {
                    let _ = self
                        .inner
                        .release(&host_ctx(ctx), e.inode, 0, h, false, false, None);
                }
                Err(x)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(
            &host_ctx(ctx),
            inode,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.changing(inode, None);
        self.inner.write(
            &host_ctx(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(&host_ctx(ctx), inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(&host_ctx(ctx), inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.changing(inode, None);
        self.inner
            .fallocate(&host_ctx(ctx), inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        if !self.closing(handle) {
            return Err(err(libc::EBADF));
        }
        self.inner.release(
            &host_ctx(ctx),
            inode,
            flags,
            handle,
            flush,
            flock_release,
            lock_owner,
        )
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(&host_ctx(ctx), inode)
    }

    // The guest's own extended attributes are not supported: the kernel
    // stops asking after the first ENOSYS, and the owner attribute (and
    // file capabilities) stay out of its reach.
    fn setxattr(&self, _: &Context, _: u64, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn getxattr(&self, _: &Context, _: u64, _: &CStr, _: u32) -> io::Result<GetxattrReply> {
        Err(err(libc::ENOSYS))
    }

    fn listxattr(&self, _: &Context, _: u64, _: u32) -> io::Result<ListxattrReply> {
        Err(err(libc::ENOSYS))
    }

    fn removexattr(&self, _: &Context, _: u64, _: &CStr) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.not_symlink(inode)?;
        self.may_open()?;
        let r = self.inner.opendir(&host_ctx(ctx), inode, flags)?;
        self.opened(r.0);
        Ok(r)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let Some(next) = fill_listing(offset, |next, p| {
            let mut add = |d: DirEntry| {
                let off = d.offset;
                let n = add_entry(d)?;
                Ok(p.added(off, n))
            };
            self.inner
                .readdir(&host_ctx(ctx), inode, handle, chunk(size), next, &mut add)
        })?
        else {
            return Ok(());
        };
        for d in self.dots(inode, next) {
            if add_entry(d)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let Some(next) = fill_listing(offset, |next, p| {
            let mut add = |d: DirEntry, mut e: Entry| -> io::Result<usize> {
                let off = d.offset;
                if e.inode == 0 {
                    let n = add_entry(d, e)?;
                    return Ok(p.added(off, n));
                }
                let node = self.peek(&e)?;
                if node.refs == 0 {
                    if let Err(x) = self.make_room() {
                        // An error leaves the passthrough's own count to us.
                        self.inner.forget(&Context::new(), e.inode, 1);
                        return Err(x);
                    }
                }
                Self::show(&mut e.attr, node.owner);
                let n = add_entry(d, e)?;
                if n > 0 {
                    self.hold(&e, node);
                }
                Ok(p.added(off, n))
            };
            self.inner
                .readdirplus(&host_ctx(ctx), inode, handle, chunk(size), next, &mut add)
        })?
        else {
            return Ok(());
        };
        let (attr, _) = self.inner.getattr(&Context::new(), inode, None)?;
        for d in self.dots(inode, next) {
            // No node id: the guest kernel takes no entry for `.` and `..`.
            let e = Entry {
                inode: 0,
                generation: 0,
                attr,
                attr_flags: 0,
                attr_timeout: Duration::ZERO,
                entry_timeout: Duration::ZERO,
            };
            if add_entry(d, e)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(&host_ctx(ctx), inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        if !self.closing(handle) {
            return Err(err(libc::EBADF));
        }
        self.inner.releasedir(&host_ctx(ctx), inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(&host_ctx(ctx), inode, mask)
    }

    // Locks are not forwarded (getlk/setlk stay ENOSYS and INIT does not
    // offer POSIX locks): the guest kernel keeps flock and fcntl locks
    // itself, between the guest's processes, as on a local disk.

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner
            .lseek(&host_ctx(ctx), inode, handle, offset, whence)
    }
}

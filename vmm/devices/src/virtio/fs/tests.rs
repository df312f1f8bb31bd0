//! The FUSE server driven in-process through a test queue, as a hostile
//! guest would drive it: every test checks that nothing outside the
//! scratch share was read or written.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, MkdirIn, MknodIn, OpenOut, SetattrIn};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::testing::*;
use super::*;

/// A scratch directory: `share/` is served, `outside/` must stay as it was.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("berth-fs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("share/sub")).unwrap();
        fs::create_dir_all(dir.join("outside")).unwrap();
        fs::write(dir.join("outside/secret"), b"host secret").unwrap();
        fs::write(dir.join("share/hello"), b"hello from the host").unwrap();
        std::os::unix::fs::symlink(dir.join("outside"), dir.join("share/abs")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", dir.join("share/rel")).unwrap();
        Scratch { dir }
    }

    fn share(&self) -> PathBuf {
        self.dir.join("share")
    }

    /// Names, sizes, modes and contents under `outside/`.
    fn outside(&self) -> Vec<(String, u64, u32, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(self.dir.join("outside"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = fs::symlink_metadata(e.path()).unwrap();
                let data = if m.is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.mode(),
                    data,
                )
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn opts() -> ShareOptions {
    ShareOptions {
        read_only: false,
        max_inodes: 1000,
        max_handles: 1000,
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[test]
fn files_created_by_a_guest_user_belong_to_the_host_user_on_the_host() {
    let s = Scratch::new("owner");
    let before = s.outside();
    let mut g = Guest::new(&s.share(), opts());
    g.uid = 999;
    g.gid = 998;
    let r = g.create(1, "made-in-guest", 0o640);
    let b = r.ok();
    let e = *EntryOut::from_slice(&b[..std::mem::size_of::<EntryOut>()]).unwrap();
    let fh = OpenOut::from_slice(&b[std::mem::size_of::<EntryOut>()..][..16])
        .unwrap()
        .fh;
    assert_eq!(
        (e.attr.uid, e.attr.gid),
        (999, 998),
        "the guest sees its owner"
    );
    assert_eq!(g.write(e.nodeid, fh, b"written in the guest").errno(), 0);
    g.release(e.nodeid, fh).ok();
    let host = s.share().join("made-in-guest");
    let m = fs::metadata(&host).unwrap();
    assert_eq!(
        m.uid(),
        euid(),
        "the host file belongs to the server's user"
    );
    assert_eq!(fs::read(&host).unwrap(), b"written in the guest");
    // The guest's view survives the inode being forgotten and looked up
    // again (it is kept in the xattr).
    g.forget(e.nodeid, 1);
    let again = g.lookup(1, "made-in-guest").entry();
    assert_eq!((again.attr.uid, again.attr.gid), (999, 998));
    assert_eq!(s.outside(), before);
}

#[test]
fn chown_and_chmod_change_the_guest_view_not_the_host_owner() {
    let s = Scratch::new("chown");
    let mut g = Guest::new(&s.share(), opts());
    let host = s.share().join("hello");
    let host_before = fs::metadata(&host).unwrap();
    let e = g.lookup(1, "hello").entry();
    let a = g
        .setattr(
            e.nodeid,
            SetattrIn {
                valid: FATTR_UID | FATTR_GID,
                uid: 70,
                gid: 71,
                ..Default::default()
            },
        )
        .attr();
    assert_eq!((a.uid, a.gid), (70, 71));
    assert_eq!(g.getattr(e.nodeid).attr().uid, 70);
    let after = fs::metadata(&host).unwrap();
    assert_eq!(
        (after.uid(), after.gid()),
        (host_before.uid(), host_before.gid())
    );
    // chmod reaches the host, but never a setuid or setgid bit.
    let a = g
        .setattr(
            e.nodeid,
            SetattrIn {
                valid: FATTR_MODE,
                mode: libc::S_IFREG | 0o6755,
                ..Default::default()
            },
        )
        .attr();
    assert_eq!(a.mode & 0o7777, 0o755);
    assert_eq!(
        fs::metadata(&host).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    // Directories too: a database entrypoint chowns its data directory.
    let d = g.lookup(1, "sub").entry();
    let a = g
        .setattr(
            d.nodeid,
            SetattrIn {
                valid: FATTR_UID | FATTR_GID,
                uid: 999,
                gid: 999,
                ..Default::default()
            },
        )
        .attr();
    assert_eq!(a.uid, 999);
    assert_eq!(fs::metadata(s.share().join("sub")).unwrap().uid(), euid());
    // The share's root too (`-v $HOME:/data` and a chown of /data).
    g.setattr(
        1,
        SetattrIn {
            valid: FATTR_UID | FATTR_GID,
            uid: 5,
            gid: 6,
            ..Default::default()
        },
    )
    .ok();
    assert_eq!(g.getattr(1).attr().uid, 5);
    assert_eq!(fs::metadata(s.share()).unwrap().uid(), euid());
}

#[test]
fn names_that_are_not_one_component_are_refused() {
    let s = Scratch::new("names");
    let before = s.outside();
    let mut g = Guest::new(&s.share(), opts());
    for bad in ["..", ".", "../outside", "sub/../../outside", ""] {
        let r = g.lookup(1, bad);
        assert_ne!(r.errno(), 0, "lookup of {bad:?} must fail");
    }
    // `..` below the root is refused as well, so no walk climbs out.
    let sub = g.lookup(1, "sub").entry();
    assert_eq!(g.lookup(sub.nodeid, "..").errno(), libc::EINVAL);
    // A name with a NUL inside ends at the NUL: "hello\0../x" is "hello".
    let r = g.call(LOOKUP, 1, b"hello\0../outside/secret\0");
    assert_eq!(r.entry().attr.size, 19);
    assert_eq!(g.create(1, "../escape", 0o644).errno(), libc::EINVAL);
    assert_eq!(
        g.call(
            MKDIR,
            1,
            &cat(&[
                MkdirIn {
                    mode: 0o755,
                    umask: 0
                }
                .as_slice(),
                &name("a/b")
            ])
        )
        .errno(),
        libc::EINVAL
    );
    assert_eq!(s.outside(), before);
}

#[test]
fn symlinks_pointing_out_are_never_followed_on_the_host() {
    let s = Scratch::new("symlink");
    let before = s.outside();
    let mut g = Guest::new(&s.share(), opts());
    for link in ["abs", "rel"] {
        let e = g.lookup(1, link).entry();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        // The guest gets the link's text and resolves it in its own tree.
        let target = g.call(READLINK, e.nodeid, &[]).ok();
        assert!(!target.is_empty());
        assert_eq!(g.open(e.nodeid, libc::O_RDONLY).errno(), libc::ELOOP);
        assert_eq!(
            g.open(e.nodeid, libc::O_RDWR | libc::O_TRUNC).errno(),
            libc::ELOOP
        );
        let r = g.setattr(
            e.nodeid,
            SetattrIn {
                valid: FATTR_SIZE,
                size: 0,
                ..Default::default()
            },
        );
        assert_ne!(r.errno(), 0);
        // Used as a directory, the link leads nowhere.
        assert_ne!(g.lookup(e.nodeid, "secret").errno(), 0);
        assert_ne!(g.create(e.nodeid, "planted", 0o644).errno(), 0);
    }
    assert_eq!(s.outside(), before);
}

#[test]
fn a_directory_swapped_for_a_symlink_after_lookup_does_not_lead_out() {
    let s = Scratch::new("swap");
    let before = s.outside();
    let mut g = Guest::new(&s.share(), opts());
    let sub = g.lookup(1, "sub").entry();
    // Another process on the host swaps the directory for a link out.
    fs::rename(s.share().join("sub"), s.share().join("sub.old")).unwrap();
    std::os::unix::fs::symlink(s.dir.join("outside"), s.share().join("sub")).unwrap();
    // The guest's inode is still the directory it looked up.
    let r = g.create(sub.nodeid, "after-swap", 0o644);
    assert_eq!(r.errno(), 0);
    assert!(s.share().join("sub.old/after-swap").exists());
    // A fresh lookup sees the link, which is not a directory to the server.
    let l = g.lookup(1, "sub").entry();
    assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_ne!(g.create(l.nodeid, "planted", 0o644).errno(), 0);
    assert_eq!(s.outside(), before);
}

#[test]
fn forged_and_released_ids_are_refused() {
    let s = Scratch::new("forged");
    let mut g = Guest::new(&s.share(), opts());
    for forged in [2u64, 77, 0xdead_beef, u64::MAX] {
        assert_ne!(g.getattr(forged).errno(), 0, "node {forged}");
        assert_ne!(g.lookup(forged, "secret").errno(), 0);
        assert_ne!(g.open(forged, libc::O_RDONLY).errno(), 0);
    }
    let e = g.lookup(1, "hello").entry();
    let fh = Guest::fh(g.open(e.nodeid, libc::O_RDONLY));
    assert_eq!(&g.read(e.nodeid, fh, 64).ok()[..], b"hello from the host");
    assert_ne!(g.read(e.nodeid, fh + 1000, 64).errno(), 0, "forged handle");
    g.release(e.nodeid, fh).ok();
    assert_ne!(g.read(e.nodeid, fh, 64).errno(), 0, "handle after release");
    g.forget(e.nodeid, 1);
    assert_ne!(g.getattr(e.nodeid).errno(), 0, "node after forget");
}

#[test]
fn device_nodes_and_guest_xattrs_are_refused() {
    let s = Scratch::new("mknod");
    let mut g = Guest::new(&s.share(), opts());
    let mk = |mode: u32, n: &str| {
        let m = MknodIn {
            mode,
            rdev: 0x0103, // /dev/null's numbers
            umask: 0,
            padding: 0,
        };
        cat(&[m.as_slice(), &name(n)])
    };
    assert_eq!(
        g.call(MKNOD, 1, &mk(libc::S_IFCHR | 0o666, "null")).errno(),
        libc::EPERM
    );
    assert_eq!(
        g.call(MKNOD, 1, &mk(libc::S_IFBLK | 0o666, "disk")).errno(),
        libc::EPERM
    );
    assert!(!s.share().join("null").exists());
    assert_eq!(
        g.call(MKNOD, 1, &mk(libc::S_IFIFO | 0o644, "fifo")).errno(),
        0
    );
    let e = g.lookup(1, "hello").entry();
    let forged = cat(&[
        &[3u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat(),
        &name(OWNER_XATTR),
        b"0:0",
    ]);
    assert_eq!(g.call(SETXATTR, e.nodeid, &forged).errno(), libc::ENOSYS);
    let get = cat(&[
        &[64u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat(),
        &name(OWNER_XATTR),
    ]);
    assert_eq!(g.call(GETXATTR, e.nodeid, &get).errno(), libc::ENOSYS);
}

#[test]
fn a_read_only_share_refuses_every_change_with_erofs() {
    let s = Scratch::new("ro");
    let mut g = Guest::new(
        &s.share(),
        ShareOptions {
            read_only: true,
            max_inodes: 1000,
            max_handles: 1000,
        },
    );
    assert_eq!(g.create(1, "new", 0o644).errno(), libc::EROFS);
    let e = g.lookup(1, "hello").entry();
    assert_eq!(g.open(e.nodeid, libc::O_WRONLY).errno(), libc::EROFS);
    assert_eq!(
        g.open(e.nodeid, libc::O_RDONLY | libc::O_TRUNC).errno(),
        libc::EROFS
    );
    let r = g.setattr(
        e.nodeid,
        SetattrIn {
            valid: FATTR_SIZE,
            ..Default::default()
        },
    );
    assert_eq!(r.errno(), libc::EROFS);
    let fh = Guest::fh(g.open(e.nodeid, libc::O_RDONLY));
    assert_eq!(g.write(e.nodeid, fh, b"x").errno(), libc::EROFS);
    assert_eq!(
        fs::read(s.share().join("hello")).unwrap(),
        b"hello from the host"
    );
}

#[test]
fn the_guest_cannot_hold_more_inodes_than_the_bound() {
    let s = Scratch::new("bound");
    for i in 0..6 {
        fs::write(s.share().join(format!("f{i}")), b"x").unwrap();
    }
    let mut g = Guest::new(
        &s.share(),
        ShareOptions {
            read_only: false,
            max_inodes: 4,
            max_handles: 1000,
        },
    );
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(g.lookup(1, &format!("f{i}")).entry().nodeid);
    }
    assert_eq!(g.lookup(1, "f4").errno(), libc::ENFILE);
    // A second lookup of a held inode is not a new one.
    assert_eq!(g.lookup(1, "f0").errno(), 0);
    g.forget(held[1], 1);
    assert_eq!(g.lookup(1, "f4").errno(), 0);
}

#[test]
fn malformed_chains_are_completed_and_counted() {
    let s = Scratch::new("malformed");
    let mut g = Guest::new(&s.share(), opts());
    // A header claiming far more than the chain holds.
    let hdr = InHeader {
        len: u32::MAX,
        opcode: LOOKUP,
        unique: 9,
        nodeid: 1,
        ..Default::default()
    };
    g.mem
        .write_slice(hdr.as_slice(), GuestAddress(REQ))
        .unwrap();
    g.raw(&[(REQ, 40, 0), (REPLY, 4096, WRITE)]);
    // A truncated header, no reply buffer, and a buffer outside memory.
    g.raw(&[(REQ, 7, 0), (REPLY, 4096, WRITE)]);
    g.raw(&[(REQ, 40, 0)]);
    g.raw(&[(REQ, 40, 0), (64 << 20, 4096, WRITE)]);
    // An unknown opcode.
    assert_ne!(g.call(4242, 1, &[]).errno(), 0);
    let c = &g.counters;
    let bad = c.errors.load(Ordering::Relaxed) + c.malformed.load(Ordering::Relaxed);
    assert!(bad >= 3, "{bad} bad chains counted");
    // The server still works.
    assert_eq!(g.lookup(1, "hello").entry().attr.size, 19);
}

#[test]
fn the_guest_cannot_hold_more_open_files_than_the_bound() {
    let s = Scratch::new("handles");
    let mut g = Guest::new(
        &s.share(),
        ShareOptions {
            read_only: false,
            max_inodes: 1000,
            max_handles: 3,
        },
    );
    let node = g.lookup(1, "hello").entry().nodeid;
    let fhs: Vec<u64> = (0..3)
        .map(|_| Guest::fh(g.open(node, libc::O_RDONLY)))
        .collect();
    assert_eq!(g.open(node, libc::O_RDONLY).errno(), libc::ENFILE);
    assert_eq!(g.create(1, "new", 0o644).errno(), libc::ENFILE);
    // A forged handle frees nothing; a real one frees one, once.
    assert_eq!(g.release(node, 4242).errno(), libc::EBADF);
    assert_eq!(g.open(node, libc::O_RDONLY).errno(), libc::ENFILE);
    g.release(node, fhs[0]).ok();
    assert_eq!(g.release(node, fhs[0]).errno(), libc::EBADF);
    let again = Guest::fh(g.open(node, libc::O_RDONLY));
    assert_eq!(g.open(node, libc::O_RDONLY).errno(), libc::ENFILE);
    for fh in [again, fhs[1], fhs[2]] {
        g.release(node, fh).ok();
    }
    assert_eq!(g.create(1, "new", 0o644).errno(), 0);
    assert!(!s.dir.join("outside/new").exists());
}

#[test]
fn listings_have_dot_and_dotdot_once_at_any_buffer_size() {
    let s = Scratch::new("dots");
    for i in 0..40 {
        fs::write(s.share().join(format!("file-{i:02}")), b"x").unwrap();
    }
    let mut g = Guest::new(&s.share(), opts());
    let sub = g.lookup(1, "sub").entry();
    let root_ino = fs::metadata(s.share()).unwrap().ino();
    // The smallest sizes hold one entry each (a READDIRPLUS entry carries
    // a 128-byte entry_out).
    for (plus, sizes) in [(false, [4096, 200, 32]), (true, [4096, 400, 160])] {
        for size in sizes {
            let got = g.list(1, plus, size);
            let mut names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            names.sort();
            let mut want: Vec<String> = (0..40).map(|i| format!("file-{i:02}")).collect();
            want.extend([".", "..", "abs", "hello", "rel", "sub"].map(String::from));
            want.sort();
            assert_eq!(names, want, "plus {plus}, {size}-byte buffers");
            let dot = got.iter().find(|(n, _)| n == ".").unwrap();
            assert_eq!(dot.1, root_ino);
            // In a subdirectory, `..` is the share's root.
            let got = g.list(sub.nodeid, plus, size);
            assert_eq!(
                got,
                vec![(".".to_owned(), sub.attr.ino), ("..".to_owned(), root_ino)]
            );
        }
    }
}

/// A listing that fits the guest's buffer comes in one reply, `.` and `..`
/// included: each extra request is a guest round trip (about 0.3 s in a
/// walk of 1,500 directories under TCG).
#[test]
fn a_listing_that_fits_comes_in_one_reply() {
    let s = Scratch::new("onereply");
    for i in 0..40 {
        fs::write(s.share().join(format!("file-{i:02}")), b"x").unwrap();
    }
    let mut g = Guest::new(&s.share(), opts());
    let sub = g.lookup(1, "sub").entry();
    for plus in [false, true] {
        // 46 entries: about 1.6 KiB as READDIR entries, 7.5 KiB with
        // READDIRPLUS's entry_out each.
        let size = if plus { 16384 } else { 4096 };
        let (got, replies) = g.listing(1, plus, size, 1);
        assert_eq!((got.len(), replies), (46, 1), "plus {plus}: {got:?}");
        let (got, replies) = g.listing(sub.nodeid, plus, 4096, 1);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!((names, replies), (vec![".", ".."], 1), "plus {plus}");
    }
}

/// Stands in for the host watcher and the guest kernel: when asked to
/// reclaim, a cooperative guest forgets the inodes it was told it holds
/// (as the agent's `drop_caches` makes the kernel do).
struct ReclaimingGuest {
    fs: std::sync::Mutex<Option<std::sync::Arc<ShareFs>>>,
    unused: std::sync::Mutex<Vec<u64>>,
    cooperative: bool,
    asked: std::sync::atomic::AtomicUsize,
}

impl watch::DirWatch for ReclaimingGuest {
    fn watch(&self, _: u64, _: PathBuf) {}
    fn unwatch(&self, _: u64) {}
    fn guest_changed(&self, _: PathBuf) {}
    fn reclaim(&self) {
        use fuse_backend_rs::api::filesystem::{Context, FileSystem};
        self.asked.fetch_add(1, Ordering::Relaxed);
        if !self.cooperative {
            return;
        }
        let fs = self.fs.lock().unwrap().clone().unwrap();
        let unused: Vec<u64> = std::mem::take(&mut *self.unused.lock().unwrap());
        // FORGETs come on the other queue, from another thread.
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            for n in unused {
                fs.forget(&Context::new(), n, 1);
            }
        });
    }
}

#[test]
fn at_the_inode_bound_the_guest_is_asked_to_let_go_and_the_lookup_waits() {
    let s = Scratch::new("reclaim");
    for i in 0..10 {
        fs::write(s.share().join(format!("f{i}")), b"x").unwrap();
    }
    for cooperative in [true, false] {
        let w = std::sync::Arc::new(ReclaimingGuest {
            fs: std::sync::Mutex::new(None),
            unused: std::sync::Mutex::new(Vec::new()),
            cooperative,
            asked: std::sync::atomic::AtomicUsize::new(0),
        });
        let share = std::sync::Arc::new(
            ShareFs::new(
                &s.share(),
                ShareOptions {
                    read_only: false,
                    max_inodes: 8,
                    max_handles: 100,
                },
            )
            .unwrap()
            .with_watch(w.clone()),
        );
        *w.fs.lock().unwrap() = Some(share.clone());
        let mut g = Guest::with_shared(share.clone());
        // Below seven eighths of the bound nobody is asked.
        let held: Vec<u64> = (0..6)
            .map(|i| g.lookup(1, &format!("f{i}")).entry().nodeid)
            .collect();
        assert_eq!(w.asked.load(Ordering::Relaxed), 0);
        // From there on the guest is asked (at most every 250 ms).
        g.lookup(1, "f6").entry();
        g.lookup(1, "f7").entry();
        assert_eq!(w.asked.load(Ordering::Relaxed), 1);
        // At the bound: a cooperative guest lets go and the lookup goes
        // on; one that holds on gets ENFILE after the wait.
        // (Only now has the guest closed the first six.)
        w.unused.lock().unwrap().extend(held);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let t = std::time::Instant::now();
        let r = g.lookup(1, "f8");
        if cooperative {
            assert_eq!(r.errno(), 0);
            // The lookup went on at the first FORGET; the rest follow.
            let t = std::time::Instant::now();
            while share.inodes() > 3 && t.elapsed() < std::time::Duration::from_secs(5) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(share.inodes() <= 3, "{} held", share.inodes());
        } else {
            assert_eq!(r.errno(), libc::ENFILE);
            assert!(t.elapsed() >= RECLAIM_WAIT);
            assert_eq!(share.inodes(), 8);
        }
        assert_eq!(w.asked.load(Ordering::Relaxed), 2);
    }
}

#[test]
fn init_offers_big_requests_and_missing_names_are_cached_as_missing() {
    use fuse_backend_rs::abi::fuse_abi::{InitIn, InitOut};
    let s = Scratch::new("init");
    let mut g = Guest::new(&s.share(), opts());
    // What Linux 6.1's virtio-fs offers, among others: big writes and
    // max pages (flags2 carries nothing we need).
    let big_writes = 0x20;
    let max_pages = 0x40_0000;
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 1 << 17,
        flags: big_writes | max_pages,
    };
    let b = g.call(INIT, 0, &obj(init)).ok();
    let out = *InitOut::from_slice(&b[..std::mem::size_of::<InitOut>()]).unwrap();
    assert_eq!(out.max_write, 1 << 20, "flags {:#x}", out.flags);
    assert_eq!(out.max_pages, 256);
    // A missing name: node id 0 with the cache timeout, not ENOENT.
    let e = g.lookup(1, "not-here").entry();
    assert_eq!(e.nodeid, 0);
    assert_eq!(e.entry_valid, CACHE_TIMEOUT.as_secs());
    // Once there, it is found.
    fs::write(s.share().join("not-here"), b"x").unwrap();
    assert_ne!(g.lookup(1, "not-here").entry().nodeid, 0);
}

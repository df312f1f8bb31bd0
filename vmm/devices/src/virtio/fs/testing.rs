//! A FUSE client for tests and benchmarks (feature `test-utils`): builds
//! requests as a guest's FUSE driver does, puts them on a test virtqueue
//! and runs them through [`FsEngine`], the way both transports do.

use std::ffi::CString;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    Attr, AttrOut, CreateIn, EntryOut, ForgetIn, InHeader, InitIn, OpenIn, OpenOut, OutHeader,
    ReadIn, ReleaseIn, SetattrIn, WriteIn,
};
use fuse_backend_rs::api::server::Server;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::{FsCounters, FsEngine, ShareFs, ShareOptions};
use crate::virtio::testing::TestQueue;

pub const REQ: u64 = 0x10000;
pub const REPLY: u64 = 0x100000;
pub const REPLY_LEN: u32 = 0x40000;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE_OP: u32 = 16;
pub const RELEASE: u32 = 18;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const CREATE: u32 = 35;
pub const READDIRPLUS: u32 = 44;

pub const FATTR_MODE: u32 = 1;
pub const FATTR_UID: u32 = 2;
pub const FATTR_GID: u32 = 4;
pub const FATTR_SIZE: u32 = 8;

/// A guest: a request queue and the server's engine.
#[allow(missing_debug_implementations)]
pub struct Guest {
    pub mem: GuestMemoryMmap,
    vq: TestQueue,
    queue: Queue,
    engine: FsEngine,
    pub counters: Arc<FsCounters>,
    unique: u64,
    pub uid: u32,
    pub gid: u32,
}

/// A reply: the error (negative errno, 0 for success) and the body.
#[derive(Debug)]
pub struct Reply {
    pub error: i32,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(self) -> Vec<u8> {
        assert_eq!(self.error, 0, "request failed: errno {}", -self.error);
        self.body
    }

    pub fn errno(&self) -> i32 {
        -self.error
    }

    pub fn entry(self) -> EntryOut {
        let b = self.ok();
        *EntryOut::from_slice(&b[..std::mem::size_of::<EntryOut>()]).unwrap()
    }

    pub fn attr(self) -> Attr {
        let b = self.ok();
        AttrOut::from_slice(&b[..std::mem::size_of::<AttrOut>()])
            .unwrap()
            .attr
    }
}

pub fn obj<T: ByteValued>(v: T) -> Vec<u8> {
    v.as_slice().to_vec()
}

pub fn name(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

impl Guest {
    pub fn new(share: &Path, opts: ShareOptions) -> Guest {
        Guest::with_fs(ShareFs::new(share, opts).unwrap())
    }

    /// A guest of an already built share (e.g. one with a watcher).
    pub fn with_fs(fs: ShareFs) -> Guest {
        Guest::with_shared(Arc::new(fs))
    }

    /// A guest of a share the test also drives directly.
    pub fn with_shared(fs: Arc<ShareFs>) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = TestQueue::new(&mem, GuestAddress(0), 16);
        let queue = vq.queue();
        let counters = Arc::new(FsCounters::default());
        let engine = FsEngine::new(Arc::new(Server::new(fs)), counters.clone());
        let mut g = Guest {
            mem,
            vq,
            queue,
            engine,
            counters,
            unique: 0,
            uid: 0,
            gid: 0,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 17,
            flags: 0,
        };
        g.call(INIT, 0, &obj(init)).ok();
        g
    }

    pub fn serve(&mut self) {
        let mem = self.mem.clone();
        self.engine.process(&mut self.queue, &mem);
    }

    /// Sends a raw chain: `descs` are (addr, len, flags) with NEXT links.
    pub fn raw(&mut self, descs: &[(u64, u32, u16)]) -> (u16, u32) {
        let before = self.vq.used_idx(&self.mem);
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() { i as u16 + 1 } else { 0 };
            let f = if i + 1 < descs.len() {
                flags | NEXT
            } else {
                *flags
            };
            self.vq.set_desc(
                &self.mem,
                i as u16,
                RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                    *addr, *len, f, next,
                )),
            );
        }
        self.vq.offer(&self.mem, 0);
        self.serve();
        let after = self.vq.used_idx(&self.mem);
        assert_eq!(after, before.wrapping_add(1), "the chain was not completed");
        let (head, len) = self.vq.used_elem(&self.mem, before);
        (head as u16, len)
    }

    pub fn call_as(&mut self, uid: u32, gid: u32, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.unique += 1;
        let hdr = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid,
            gid,
            pid: 1,
            ..Default::default()
        };
        let req = cat(&[hdr.as_slice(), body]);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let (_, len) = self.raw(&[(REQ, req.len() as u32, 0), (REPLY, REPLY_LEN, WRITE)]);
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
        if opcode == FORGET {
            return Reply {
                error: 0,
                body: Vec::new(),
            };
        }
        let oh = *OutHeader::from_slice(&out[..16]).unwrap();
        assert_eq!(oh.unique, self.unique);
        Reply {
            error: oh.error,
            body: out[16..].to_vec(),
        }
    }

    pub fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.call_as(self.uid, self.gid, opcode, nodeid, body)
    }

    pub fn lookup(&mut self, parent: u64, n: &str) -> Reply {
        self.call(LOOKUP, parent, &name(n))
    }

    pub fn forget(&mut self, node: u64, n: u64) {
        self.call(FORGET, node, &obj(ForgetIn { nlookup: n }));
    }

    pub fn getattr(&mut self, node: u64) -> Reply {
        self.call(GETATTR, node, &[0u8; 16])
    }

    pub fn setattr(&mut self, node: u64, s: SetattrIn) -> Reply {
        self.call(SETATTR, node, &obj(s))
    }

    pub fn open(&mut self, node: u64, flags: i32) -> Reply {
        self.call(
            OPEN,
            node,
            &obj(OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            }),
        )
    }

    pub fn fh(r: Reply) -> u64 {
        let b = r.ok();
        OpenOut::from_slice(&b[..std::mem::size_of::<OpenOut>()])
            .unwrap()
            .fh
    }

    pub fn create(&mut self, parent: u64, n: &str, mode: u32) -> Reply {
        let c = CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        self.call(CREATE, parent, &cat(&[c.as_slice(), &name(n)]))
    }

    pub fn read(&mut self, node: u64, fh: u64, size: u32) -> Reply {
        let r = ReadIn {
            fh,
            offset: 0,
            size,
            ..Default::default()
        };
        self.call(READ, node, &obj(r))
    }

    pub fn write(&mut self, node: u64, fh: u64, data: &[u8]) -> Reply {
        let w = WriteIn {
            fh,
            offset: 0,
            size: data.len() as u32,
            ..Default::default()
        };
        self.call(WRITE_OP, node, &cat(&[w.as_slice(), data]))
    }

    pub fn unlink(&mut self, parent: u64, n: &str) -> Reply {
        self.call(UNLINK, parent, &name(n))
    }

    pub fn release(&mut self, node: u64, fh: u64) -> Reply {
        let r = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(RELEASE, node, &obj(r))
    }

    /// Lists directory `node` as the guest kernel does: OPENDIR, then
    /// READDIR (or READDIRPLUS) of `size` bytes from each last offset until
    /// an empty reply, then RELEASEDIR. Names and inode numbers, in order.
    pub fn list(&mut self, node: u64, plus: bool, size: u32) -> Vec<(String, u64)> {
        self.listing(node, plus, size, 10_000).0
    }

    /// Lists directory `node` in at most `requests` requests of `size`
    /// bytes: the entries (name, inode) and the requests that brought any.
    pub fn listing(
        &mut self,
        node: u64,
        plus: bool,
        size: u32,
        requests: usize,
    ) -> (Vec<(String, u64)>, usize) {
        let fh = Guest::fh(self.call(OPENDIR, node, &obj(OpenIn::default())));
        let mut out = Vec::new();
        let mut offset = 0;
        let mut replies = 0;
        for _ in 0..requests {
            let r = ReadIn {
                fh,
                offset,
                size,
                ..Default::default()
            };
            let body = self
                .call(if plus { READDIRPLUS } else { READDIR }, node, &obj(r))
                .ok();
            if body.is_empty() {
                break;
            }
            replies += 1;
            let mut b = &body[..];
            while !b.is_empty() {
                if plus {
                    b = &b[std::mem::size_of::<EntryOut>()..];
                }
                let ino = u64::from_le_bytes(b[0..8].try_into().unwrap());
                offset = u64::from_le_bytes(b[8..16].try_into().unwrap());
                let len = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
                out.push((String::from_utf8_lossy(&b[24..24 + len]).into_owned(), ino));
                b = &b[(24 + len).div_ceil(8) * 8..];
            }
        }
        let rel = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(RELEASEDIR, node, &obj(rel)).ok();
        (out, replies)
    }
}

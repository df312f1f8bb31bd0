//! The stream backend: frames over a unix stream socket, each preceded by
//! its length as a big-endian `u32`. passt speaks it (`--fd` or its own
//! socket), as do QEMU's `-netdev stream` and gvproxy's `-listen-qemu`.
//!
//! The backend listens on a path and serves one peer at a time: a new
//! connection replaces the old one, so a restarted passt (or gvproxy) takes
//! over the link without the VM noticing more than lost frames. It owns an
//! epoll instance that the VMM's event loop polls as one descriptor.
//!
//! Bounded: at most [`OUTBOX`] bytes queued for the peer (the device
//! stops taking TX chains beyond it) and a fixed read buffer.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{NetBackend, Sent, MAX_FRAME, MIN_FRAME};

/// Bytes queued for the peer at most.
pub const OUTBOX: usize = 1 << 20;
/// Read buffer: at least one largest frame with its length.
const INBOX: usize = 256 * 1024;
const LISTENER: u64 = 1;
const PEER: u64 = 2;

/// Counters of the link to the peer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LinkStats {
    pub peers: u64,
    /// Peers dropped for sending a length outside the frame limits.
    pub protocol_errors: u64,
}

/// Frames to and from one peer on a unix stream socket.
#[derive(Debug)]
pub struct StreamBackend {
    listener: Option<UnixListener>,
    peer: Option<UnixStream>,
    epoll: Epoll,
    inbox: Vec<u8>,
    /// Unparsed bytes are `inbox[in_start..in_end]`.
    in_start: usize,
    in_end: usize,
    pub(super) outbox: Vec<u8>,
    /// Bytes of `outbox` already written.
    pub(super) out_pos: usize,
    /// Whether the peer is registered for writability.
    want_out: bool,
    pub stats: LinkStats,
}

impl StreamBackend {
    fn empty() -> std::io::Result<StreamBackend> {
        Ok(StreamBackend {
            listener: None,
            peer: None,
            epoll: Epoll::new()?,
            inbox: vec![0; INBOX],
            in_start: 0,
            in_end: 0,
            outbox: Vec::with_capacity(64 * 1024),
            out_pos: 0,
            want_out: false,
            stats: LinkStats::default(),
        })
    }

    /// Listens on `path` (replacing a stale socket file) for peers.
    pub fn listen(path: &Path) -> std::io::Result<StreamBackend> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)?;
        l.set_nonblocking(true)?;
        let b = StreamBackend::empty()?;
        b.epoll.ctl(
            ControlOperation::Add,
            l.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(StreamBackend {
            listener: Some(l),
            ..b
        })
    }

    /// Uses an already connected socket (e.g. one end of a socket pair
    /// whose other end was given to passt's `--fd`); no new peers come.
    pub fn connected(stream: UnixStream) -> std::io::Result<StreamBackend> {
        let mut b = StreamBackend::empty()?;
        b.set_peer(stream)?;
        Ok(b)
    }

    pub fn has_peer(&self) -> bool {
        self.peer.is_some()
    }

    fn set_peer(&mut self, s: UnixStream) -> std::io::Result<()> {
        self.drop_peer();
        s.set_nonblocking(true)?;
        self.epoll.ctl(
            ControlOperation::Add,
            s.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, PEER),
        )?;
        self.peer = Some(s);
        self.stats.peers += 1;
        Ok(())
    }

    /// Forgets the peer and whatever was in flight with it.
    fn drop_peer(&mut self) {
        if let Some(p) = self.peer.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.in_start = 0;
        self.in_end = 0;
        self.outbox.clear();
        self.out_pos = 0;
        self.want_out = false;
    }

    /// Registers for writability only while something waits to be written.
    fn update_interest(&mut self) {
        let want = self.out_pos < self.outbox.len();
        if want == self.want_out {
            return;
        }
        if let Some(p) = &self.peer {
            let mut ev = EventSet::IN | EventSet::READ_HANG_UP;
            if want {
                ev |= EventSet::OUT;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                p.as_raw_fd(),
                EpollEvent::new(ev, PEER),
            );
        }
        self.want_out = want;
    }

    /// Writes as much of the outbox as the socket takes.
    fn flush(&mut self) {
        let Some(p) = self.peer.as_mut() else {
            return;
        };
        while self.out_pos < self.outbox.len() {
            match p.write(&self.outbox[self.out_pos..]) {
                Ok(0) => {
                    self.drop_peer();
                    return;
                }
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_peer();
                    return;
                }
            }
        }
        if self.out_pos == self.outbox.len() {
            self.outbox.clear();
            self.out_pos = 0;
        } else if self.out_pos > OUTBOX / 2 {
            self.outbox.drain(..self.out_pos);
            self.out_pos = 0;
        }
        self.update_interest();
    }

    /// Accepts every waiting connection; the last one becomes the peer.
    fn accept(&mut self) {
        loop {
            let Some(l) = &self.listener else { return };
            match l.accept() {
                Ok((s, _)) => {
                    if self.set_peer(s).is_err() {
                        self.drop_peer();
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // WouldBlock, or out of descriptors: the next readiness
                // tries again (the peer count stays what it was).
                Err(_) => return,
            }
        }
    }

    /// The next complete frame in the inbox, if one is there; a length out
    /// of bounds drops the peer.
    fn parse(&mut self) -> Option<Vec<u8>> {
        let have = self.in_end - self.in_start;
        if have < 4 {
            return None;
        }
        let b = &self.inbox[self.in_start..self.in_start + 4];
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
            self.stats.protocol_errors += 1;
            self.drop_peer();
            return None;
        }
        if have < 4 + len {
            return None;
        }
        let start = self.in_start + 4;
        let frame = self.inbox[start..start + len].to_vec();
        self.in_start = start + len;
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
        Some(frame)
    }
}

impl NetBackend for StreamBackend {
    fn send(&mut self, frame: &[u8]) -> Sent {
        if self.peer.is_none() {
            return Sent::NoPeer;
        }
        if self.outbox.len() - self.out_pos + 4 + frame.len() > OUTBOX {
            self.flush();
            if self.peer.is_none() {
                return Sent::NoPeer;
            }
            if self.outbox.len() - self.out_pos + 4 + frame.len() > OUTBOX {
                return Sent::Full;
            }
        }
        self.outbox
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.outbox.extend_from_slice(frame);
        self.flush();
        Sent::Taken
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(f) = self.parse() {
                return Some(f);
            }
            let p = self.peer.as_mut()?;
            // Make room: move what is unparsed to the front.
            if self.in_start > 0 {
                self.inbox.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            match p.read(&mut self.inbox[self.in_end..]) {
                Ok(0) => {
                    self.drop_peer();
                    return None;
                }
                Ok(n) => self.in_end += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(_) => {
                    self.drop_peer();
                    return None;
                }
            }
        }
    }

    fn ready(&mut self) -> bool {
        let mut events = [EpollEvent::default(); 4];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => self.accept(),
                PEER if ev.event_set().contains(EventSet::OUT) => self.flush(),
                _ => {}
            }
        }
        self.flush();
        self.outbox.len() - self.out_pos < OUTBOX / 2
    }

    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("peers", self.stats.peers),
            ("peer_protocol_errors", self.stats.protocol_errors),
            ("peer_connected", self.peer.is_some() as u64),
        ]
    }
}

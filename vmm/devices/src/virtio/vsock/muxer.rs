//! The host side: the listening socket, host connections, and the table of
//! vsock streams, with one epoll instance of its own that the transport
//! polls as a single file descriptor.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{Conn, ConnKey, HostRead, State};
use super::{
    op, VsockError, CONN_BUF, HOST_CID, MAX_CONNS, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::ratelimit::LogLimiter;

/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// RSTs owed for packets without a connection, beyond which more are dropped.
const MAX_STRAY_RSTS: usize = 1024;
const LISTENER_TOKEN: u64 = u64::MAX;

/// Per-device counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub host_connects: u64,
    pub guest_connects: u64,
    pub conns_open: u64,
    pub bytes_to_guest: u64,
    pub bytes_to_host: u64,
    pub rst_sent: u64,
    pub bad_packets: u64,
}

/// A host connection that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
pub struct Muxer {
    pub guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pub epoll: Epoll,
    pending: HashMap<RawFd, Pending>,
    conns: HashMap<ConnKey, Conn>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections that may have something for the guest.
    rx_work: VecDeque<ConnKey>,
    /// RSTs for guest packets that matched no connection.
    stray_rsts: VecDeque<ConnKey>,
    next_local_port: u32,
    metrics: Metrics,
    bad_log: LogLimiter,
}

/// A fully described packet header to write into a guest RX buffer.
struct Header {
    key: ConnKey,
    op: u16,
    flags: u32,
    len: u32,
    fwd_cnt: u32,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, VsockError> {
        let shown = uds_path.display().to_string();
        // A socket file left by an earlier run would make bind fail.
        if std::fs::symlink_metadata(uds_path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener =
            UnixListener::bind(uds_path).map_err(|e| VsockError::Listen(shown.clone(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Listen(shown, e))?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            rx_work: VecDeque::new(),
            stray_rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics: Metrics::default(),
            bad_log: LogLimiter::default(),
        })
    }

    pub fn metrics(&self) -> Metrics {
        let mut m = self.metrics.clone();
        m.conns_open = self.conns.len() as u64;
        m
    }

    pub fn bad_packet(&mut self, why: &str) {
        self.metrics.bad_packets += 1;
        if self.bad_log.hit() {
            tracing::warn!("vsock: {why} ({} so far)", self.bad_log.count());
        }
    }

    pub fn has_rx_work(&self) -> bool {
        !self.stray_rsts.is_empty() || !self.rx_work.is_empty()
    }

    // ---- guest → host ----

    /// Handles one packet the guest sent.
    pub fn guest_packet<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if pkt.src_cid() != self.guest_cid
            || pkt.dst_cid() != HOST_CID
            || pkt.type_() != TYPE_STREAM
        {
            self.bad_packet("packet with a wrong CID or type");
            if pkt.op() != op::RST {
                self.stray_rst(key);
            }
            return;
        }
        match pkt.op() {
            op::REQUEST => self.guest_connect(key, pkt.buf_alloc(), pkt.fwd_cnt()),
            op::RST => self.remove(key),
            operation => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    self.stray_rst(key);
                    return;
                };
                conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
                match operation {
                    op::RESPONSE if conn.state == State::Connecting => {
                        conn.state = State::Established;
                        let ok = format!("OK {}\n", key.local_port);
                        // The line goes ahead of any data and is tiny: a
                        // fresh socket always has room for it.
                        if std::io::Write::write_all(&mut conn.stream, ok.as_bytes()).is_err() {
                            conn.owed.rst = true;
                        }
                    }
                    op::RW
                        if conn.state == State::Established
                            && conn.peer_shut & SHUTDOWN_SEND == 0 =>
                    {
                        let ok = match pkt.data_slice() {
                            Some(data) => {
                                self.metrics.bytes_to_host += data.len() as u64;
                                conn.write_host(data).is_ok()
                            }
                            None => true,
                        };
                        if !ok {
                            conn.owed.rst = true;
                        }
                    }
                    op::SHUTDOWN => {
                        conn.peer_shut |= pkt.flags() & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                        if conn.settle_shutdown() {
                            conn.owed.rst = true;
                        }
                    }
                    op::CREDIT_UPDATE => {}
                    op::CREDIT_REQUEST => conn.owed.credit_update = true,
                    _ => {
                        conn.owed.rst = true;
                        self.bad_log.hit();
                        self.metrics.bad_packets += 1;
                    }
                }
                self.refresh(key);
            }
        }
    }

    /// A guest connection to host port `key.local_port`.
    fn guest_connect(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
            self.stray_rst(key);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream =
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("vsock: guest connection to {path} refused: {e}");
                    self.stray_rst(key);
                    return;
                }
            };
        let mut conn = Conn::new(stream, key, State::Established);
        conn.update_peer_credit(buf_alloc, fwd_cnt);
        conn.owed.response = true;
        self.metrics.guest_connects += 1;
        self.insert(conn);
    }

    fn stray_rst(&mut self, key: ConnKey) {
        if self.stray_rsts.len() < MAX_STRAY_RSTS {
            self.stray_rsts.push_back(key);
        }
    }

    // ---- host → guest ----

    /// Writes the next packet owed to the guest into `pkt`. Returns the
    /// bytes used, or None if there turned out to be nothing to send.
    pub fn fill_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        if let Some(key) = self.stray_rsts.pop_front() {
            self.metrics.rst_sent += 1;
            return Some(self.write_header(
                pkt,
                Header {
                    key,
                    op: op::RST,
                    flags: 0,
                    len: 0,
                    fwd_cnt: 0,
                },
            ));
        }
        while let Some(key) = self.rx_work.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let fwd_cnt = conn.fwd_cnt.0;
            let header = |op, flags, len| Header {
                key,
                op,
                flags,
                len,
                fwd_cnt,
            };
            let h = if conn.owed.rst {
                self.metrics.rst_sent += 1;
                let h = header(op::RST, 0, 0);
                let used = self.write_header(pkt, h);
                self.remove(key);
                return Some(used);
            } else if conn.owed.request {
                conn.owed.request = false;
                header(op::REQUEST, 0, 0)
            } else if conn.owed.response {
                conn.owed.response = false;
                header(op::RESPONSE, 0, 0)
            } else if conn.can_send_data() {
                let room = pkt
                    .data_slice()
                    .map_or(0, |d| (d.len() as u32).min(conn.peer_credit()) as usize);
                let buf = pkt.data_slice().and_then(|d| d.subslice(0, room).ok());
                let Some(mut buf) = buf.filter(|_| room > 0) else {
                    // A buffer with no room for data: use it up empty.
                    self.requeue(key);
                    self.bad_packet("RX buffer without room for data");
                    return Some(0);
                };
                match conn.read_host(&mut buf) {
                    HostRead::Data(n) => {
                        conn.rx_cnt += Wrapping(n as u32);
                        self.metrics.bytes_to_guest += n as u64;
                        header(op::RW, 0, n as u32)
                    }
                    HostRead::WouldBlock => {
                        conn.readable = false;
                        self.refresh(key);
                        continue;
                    }
                    HostRead::Eof => {
                        conn.readable = false;
                        conn.host_eof = true;
                        if conn.settle_shutdown() {
                            conn.owed.rst = true;
                        }
                        header(op::SHUTDOWN, SHUTDOWN_SEND, 0)
                    }
                }
            } else if conn.owed.shutdown != 0 {
                let flags = std::mem::take(&mut conn.owed.shutdown);
                header(op::SHUTDOWN, flags, 0)
            } else if conn.owed.credit_update {
                header(op::CREDIT_UPDATE, 0, 0)
            } else {
                self.refresh(key);
                continue;
            };
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.owed.credit_update = false;
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
            }
            let used = self.write_header(pkt, h);
            self.refresh(key);
            return Some(used);
        }
        None
    }

    fn write_header<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>, h: Header) -> u32 {
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(h.key.local_port)
            .set_dst_port(h.key.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(h.op)
            .set_flags(h.flags)
            .set_len(h.len)
            .set_buf_alloc(CONN_BUF)
            .set_fwd_cnt(h.fwd_cnt);
        pkt.header_slice().len() as u32 + h.len
    }

    // ---- host sockets ----

    /// Drains the epoll instance without blocking.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let (token, set) = (ev.data(), ev.event_set());
                if token == LISTENER_TOKEN {
                    self.accept_all();
                } else {
                    self.host_socket_event(token as RawFd, set);
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropping it closes it
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            fd,
                            Pending {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    fn host_socket_event(&mut self, fd: RawFd, set: EventSet) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            conn.readable = true;
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !conn.hup {
            // Reported whatever the interest: take the socket out of epoll,
            // or it would wake us forever. Reads now return EOF and writes
            // fail, which ends the connection in order.
            conn.hup = true;
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if set.contains(EventSet::OUT) || set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            let failed = conn.flush_host().is_err();
            if failed || (conn.peer_shut != 0 && conn.settle_shutdown()) {
                conn.owed.rst = true;
            }
        }
        self.refresh(key);
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let n = match p
            .stream
            .read(&mut buf[..MAX_CONNECT_LINE - p.line.len().min(MAX_CONNECT_LINE - 1)])
        {
            Ok(0) => return self.drop_pending(fd),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(_) => return self.drop_pending(fd),
        };
        p.line.extend_from_slice(&buf[..n]);
        let Some(nl) = p.line.iter().position(|&b| b == b'\n') else {
            if p.line.len() >= MAX_CONNECT_LINE {
                self.drop_pending(fd);
            }
            return;
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let port = parse_connect(&p.line[..nl]);
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(peer_port) = port else {
            return; // not a CONNECT line: dropping the stream closes it
        };
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let mut conn = Conn::new(p.stream, key, State::Connecting);
        conn.early_rx = p.line[nl + 1..].to_vec();
        conn.owed.request = true;
        self.metrics.host_connects += 1;
        self.insert(conn);
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if self.pending.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..MAX_CONNS * 2 {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&ConnKey {
                local_port: p,
                peer_port,
            }) {
                return Some(p);
            }
        }
        None
    }

    // ---- the table ----

    fn insert(&mut self, conn: Conn) {
        let key = conn.key;
        let fd = conn.stream.as_raw_fd();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), fd as u64),
            )
            .is_err()
        {
            self.stray_rst(key);
            return;
        }
        let mut conn = conn;
        conn.interest = 0;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
        }
    }

    fn requeue(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued {
                conn.queued = true;
                self.rx_work.push_back(key);
            }
        }
    }

    /// Re-derives a connection's epoll interest and RX queueing.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.wanted_interest();
        if want != conn.interest && !conn.hup {
            let fd = conn.stream.as_raw_fd();
            let ev = EpollEvent::new(EventSet::from_bits_truncate(want), fd as u64);
            if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_ok() {
                conn.interest = want;
            }
        }
        if conn.wants_rx() && !conn.queued {
            conn.queued = true;
            self.rx_work.push_back(key);
        }
    }
}

/// `CONNECT <port>` (without the newline) → port.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

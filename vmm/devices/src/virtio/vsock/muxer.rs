//! The host side: the listening socket, host connections, and the table of
//! vsock streams, with one epoll instance of its own that the transport
//! polls as a single file descriptor.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::num::Wrapping;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_limits::RateLimiter;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{Conn, ConnKey, HostRead, State};
use super::{op, VsockError, CONN_BUF, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// RSTs owed for packets without a connection, beyond which more are dropped.
const MAX_STRAY_RSTS: usize = 1024;
/// Listen backlog of the host socket: connections beyond the cap, or
/// arriving while accepting is paused, wait here.
const BACKLOG: i32 = 1024;
const LISTENER_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// Epoll rounds per call to [`Muxer::handle_host_events`], so one busy
/// host socket cannot keep the caller from the queues.
const MAX_ROUNDS: usize = 16;

/// How long things may wait, and how the timer ticks while they do.
pub mod timeouts {
    use std::time::Duration;
    /// A host connection that has not sent its `CONNECT` line.
    pub const CONNECT_LINE: Duration = Duration::from_secs(10);
    /// A host-initiated connection the guest has not answered.
    pub const GUEST_ANSWER: Duration = Duration::from_secs(10);
    /// A guest connection to a host listener whose backlog is full.
    pub const HOST_LISTENER: Duration = Duration::from_secs(2);
    /// A connection whose host side is gone, for the guest to finish it.
    pub const CLOSE: Duration = Duration::from_secs(10);
    /// First pause of accepting after `accept` failed (out of descriptors,
    /// most likely); doubles while it keeps failing.
    pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
    pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);
    /// The timer's period while anything waits; it is off otherwise.
    pub const TICK: Duration = Duration::from_millis(100);
}

/// Per-device counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub host_connects: u64,
    pub guest_connects: u64,
    pub conns_open: u64,
    /// Host connections that have not sent their `CONNECT` line yet.
    pub handshakes: u64,
    pub bytes_to_guest: u64,
    pub bytes_to_host: u64,
    pub rst_sent: u64,
    pub bad_packets: u64,
    /// Handshakes and closes that took too long and were abandoned.
    pub timeouts: u64,
    /// `accept` failures (each pauses accepting for a while).
    pub accept_errors: u64,
    /// Host connections closed unanswered because the cap was reached.
    pub refused_at_cap: u64,
}

/// A host connection that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// A guest connection whose host listener's backlog was full.
#[derive(Debug)]
struct Waiting {
    path: PathBuf,
    buf_alloc: u32,
    fwd_cnt: u32,
    deadline: Instant,
}

#[derive(Debug)]
pub struct Muxer {
    pub guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pub epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    max_conns: usize,
    /// Accepting is paused until then (after `accept` failed).
    accept_paused_until: Option<Instant>,
    accept_backoff: Duration,
    pending: HashMap<RawFd, Pending>,
    waiting: HashMap<ConnKey, Waiting>,
    conns: HashMap<ConnKey, Conn>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections with a deadline: host-initiated ones the guest has not
    /// answered, and ones whose host side is gone.
    deadlines: HashMap<ConnKey, Instant>,
    /// Connections that may have something for the guest.
    rx_work: VecDeque<ConnKey>,
    /// RSTs for guest packets that matched no connection.
    stray_rsts: VecDeque<ConnKey>,
    next_local_port: u32,
    metrics: Metrics,
    bad_log: RateLimiter,
    accept_log: RateLimiter,
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
    /// Listens on `uds_path`; at most `max_conns` connections (each one
    /// host descriptor) are open at once.
    pub fn new(guest_cid: u64, uds_path: &Path, max_conns: usize) -> Result<Muxer, VsockError> {
        let shown = uds_path.display().to_string();
        // A socket file left by an earlier run would make bind fail.
        if std::fs::symlink_metadata(uds_path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = listen(uds_path).map_err(|e| VsockError::Listen(shown, e))?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| VsockError::Epoll(e.into()))?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER_TOKEN),
            (timer.as_fd().as_raw_fd(), TIMER_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VsockError::Epoll)?;
        }
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            max_conns: max_conns.max(1),
            accept_paused_until: None,
            accept_backoff: timeouts::ACCEPT_BACKOFF,
            pending: HashMap::new(),
            waiting: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            deadlines: HashMap::new(),
            rx_work: VecDeque::new(),
            stray_rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics: Metrics::default(),
            bad_log: RateLimiter::default(),
            accept_log: RateLimiter::default(),
        })
    }

    pub fn max_conns(&self) -> usize {
        self.max_conns
    }

    /// Connections and handshakes holding a host descriptor.
    fn open_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    pub fn metrics(&self) -> Metrics {
        let mut m = self.metrics.clone();
        m.conns_open = self.conns.len() as u64;
        m.handshakes = self.pending.len() as u64;
        m
    }

    pub fn bad_packet(&mut self, why: &str) {
        self.metrics.bad_packets += 1;
        if let Some(s) = self.bad_log.hit() {
            tracing::warn!(
                "vsock: {why} ({} bad packets so far){s}",
                self.metrics.bad_packets
            );
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
                        self.deadlines.remove(&key);
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
                    other => {
                        conn.owed.rst = true;
                        self.bad_packet(&format!("unexpected operation {other}"));
                    }
                }
                self.refresh(key);
                self.update_timer();
            }
        }
    }

    /// A guest connection to host port `key.local_port`: joined to a new
    /// connection to `<uds_path>_<port>`, made without blocking. A listener
    /// whose backlog is full is tried again for a while.
    fn guest_connect(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.conns.contains_key(&key)
            || self.waiting.contains_key(&key)
            || self.open_count() + self.waiting.len() >= self.max_conns
        {
            self.stray_rst(key);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.local_port));
        let w = Waiting {
            path,
            buf_alloc,
            fwd_cnt,
            deadline: Instant::now() + timeouts::HOST_LISTENER,
        };
        self.try_guest_connect(key, w, Instant::now());
    }

    fn try_guest_connect(&mut self, key: ConnKey, w: Waiting, now: Instant) {
        match connect_nonblocking(&w.path) {
            Ok(stream) => {
                let mut conn = Conn::new(stream, key, State::Established);
                conn.update_peer_credit(w.buf_alloc, w.fwd_cnt);
                conn.owed.response = true;
                self.metrics.guest_connects += 1;
                self.insert(conn);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && now < w.deadline => {
                self.waiting.insert(key, w);
                self.update_timer();
            }
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to {} refused: {e}",
                    w.path.display()
                );
                self.stray_rst(key);
            }
        }
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
                        // A host side that hung up takes nothing more
                        // either: say so, and the guest finishes the
                        // connection at once instead of holding it open.
                        let flags = if conn.hup {
                            SHUTDOWN_SEND | SHUTDOWN_RCV
                        } else {
                            SHUTDOWN_SEND
                        };
                        header(op::SHUTDOWN, flags, 0)
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

    /// Serves what the epoll instance reports, without blocking and for a
    /// bounded number of rounds (the instance stays readable if more is
    /// left, so the caller comes back).
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..MAX_ROUNDS {
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
                match ev.data() {
                    LISTENER_TOKEN => self.accept_all(),
                    TIMER_TOKEN => {
                        let _ = self.timer.wait();
                        self.timer_armed = false;
                        self.sweep(Instant::now());
                    }
                    token => self.host_socket_event(token as RawFd, ev.event_set()),
                }
            }
        }
    }

    fn accept_all(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.accept_backoff = timeouts::ACCEPT_BACKOFF;
                    if self.open_count() >= self.max_conns {
                        // Refused: the client sees its connection closed
                        // before the `OK` line.
                        self.metrics.refused_at_cap += 1;
                        if let Some(s) = self.accept_log.hit() {
                            tracing::warn!(
                                "vsock: {} connections open, the most this process can hold; refusing more{s}",
                                self.max_conns
                            );
                        }
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
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
                                deadline: Instant::now() + timeouts::CONNECT_LINE,
                            },
                        );
                        self.update_timer();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => return self.pause_accepting(e),
            }
        }
    }

    /// `accept` failed (out of descriptors, most likely): the listener
    /// would stay readable and wake us forever, so it leaves the epoll
    /// set until the backoff has passed. New clients wait in the backlog.
    fn pause_accepting(&mut self, e: std::io::Error) {
        self.metrics.accept_errors += 1;
        let backoff = self.accept_backoff;
        self.accept_backoff = (backoff * 2).min(timeouts::ACCEPT_BACKOFF_MAX);
        if let Some(s) = self.accept_log.hit() {
            tracing::warn!(
                "vsock: accept on {} failed: {e}; pausing new connections for {} ms ({} open){s}",
                self.uds_path.display(),
                backoff.as_millis(),
                self.open_count()
            );
        }
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), LISTENER_TOKEN),
        );
        self.accept_paused_until = Some(Instant::now() + backoff);
        self.update_timer();
    }

    fn resume_accepting(&mut self) {
        self.accept_paused_until = None;
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        );
    }

    // ---- time ----

    /// Whether anything waits on the clock.
    fn needs_timer(&self) -> bool {
        self.accept_paused_until.is_some()
            || !self.pending.is_empty()
            || !self.waiting.is_empty()
            || !self.deadlines.is_empty()
    }

    /// Arms the periodic timer while anything waits, and disarms it once
    /// nothing does: an idle device takes no wakeups.
    fn update_timer(&mut self) {
        let want = self.needs_timer();
        if want == self.timer_armed {
            return;
        }
        let r = if want {
            let tick = TimeSpec::from_duration(timeouts::TICK);
            self.timer
                .set(Expiration::Interval(tick), TimerSetTimeFlags::empty())
        } else {
            self.timer.unset()
        };
        match r {
            Ok(()) => self.timer_armed = want,
            Err(e) => tracing::error!("vsock: cannot set the timer: {e}"),
        }
    }

    /// Ends what waited too long, retries what may now succeed.
    pub fn sweep(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.resume_accepting();
            self.accept_all();
        }
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            self.metrics.timeouts += 1;
            self.drop_pending(fd);
        }
        let late: Vec<ConnKey> = self
            .deadlines
            .iter()
            .filter(|(_, &t)| now >= t)
            .map(|(&k, _)| k)
            .collect();
        for key in late {
            self.metrics.timeouts += 1;
            // The host side is closed now; the guest learns with an RST
            // whenever it next takes a buffer.
            self.remove(key);
            self.stray_rst(key);
        }
        let waiting: Vec<ConnKey> = self.waiting.keys().copied().collect();
        for key in waiting {
            if let Some(w) = self.waiting.remove(&key) {
                self.try_guest_connect(key, w, now);
            }
        }
        self.update_timer();
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
            // Whatever the guest does now, the connection is gone soon.
            self.deadlines
                .entry(key)
                .or_insert_with(|| Instant::now() + timeouts::CLOSE);
            self.update_timer();
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
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
        self.deadlines
            .insert(key, Instant::now() + timeouts::GUEST_ANSWER);
        self.insert(conn);
        self.update_timer();
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if self.pending.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.update_timer();
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..self.max_conns * 2 {
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
            self.deadlines.remove(&key);
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
        if self.deadlines.remove(&key).is_some() {
            self.update_timer();
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

/// A non-blocking, close-on-exec unix stream socket and `path`'s address.
fn unix_socket(path: &Path) -> std::io::Result<(OwnedFd, nix::sys::socket::UnixAddr)> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    Ok((fd, UnixAddr::new(path)?))
}

/// Binds the host socket with a deep backlog (the standard library's is
/// 128), non-blocking.
fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use nix::sys::socket::{self, Backlog};
    let (fd, addr) = unix_socket(path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(UnixListener::from(fd))
}

/// Connects to a unix socket without blocking. A listener whose backlog is
/// full fails with `WouldBlock` instead of stalling the device.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::errno::Errno;
    let (fd, addr) = unix_socket(path)?;
    match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(UnixStream::from(fd)),
        // Linux says EAGAIN for a full backlog; other systems may say the
        // connect is in progress. Either way: not now.
        Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Err(ErrorKind::WouldBlock.into()),
        Err(e) => Err(e.into()),
    }
}

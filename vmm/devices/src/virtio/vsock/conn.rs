//! One vsock stream between a guest port and a host unix socket.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::{CONN_BUF, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// (host port, guest port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for RESPONSE.
    Connecting,
    Established,
}

/// Control packets owed to the guest.
#[derive(Debug, Default, Clone, Copy)]
pub struct Owed {
    pub request: bool,
    pub response: bool,
    pub shutdown: u32,
    pub credit_update: bool,
    pub rst: bool,
}

/// What reading host data for the guest produced.
#[derive(Debug)]
pub enum HostRead {
    Data(usize),
    WouldBlock,
    Eof,
}

#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub key: ConnKey,
    pub state: State,
    pub owed: Owed,
    /// Guest data not yet accepted by the host socket.
    tx_buf: VecDeque<u8>,
    /// Bytes of guest data passed to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes of host data sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Shutdown flags received from the guest.
    pub peer_shut: u32,
    /// The host side sent EOF.
    pub host_eof: bool,
    /// The host socket may have data (EPOLLIN seen, no WouldBlock since).
    pub readable: bool,
    /// Host bytes read before the connection was established.
    pub early_rx: Vec<u8>,
    /// Interest currently registered with epoll.
    pub interest: u32,
    /// In the muxer's RX work queue.
    pub queued: bool,
    /// The host socket hung up or failed: it is out of epoll for good.
    pub hup: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, key: ConnKey, state: State) -> Conn {
        Conn {
            stream,
            key,
            state,
            owed: Owed::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shut: 0,
            host_eof: false,
            readable: false,
            early_rx: Vec::new(),
            interest: u32::MAX,
            queued: false,
            hup: false,
        }
    }

    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the guest has room for.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether there is a reason to look at this connection when filling
    /// RX buffers.
    pub fn wants_rx(&self) -> bool {
        let o = &self.owed;
        o.rst
            || o.request
            || o.response
            || o.shutdown != 0
            || o.credit_update
            || self.can_send_data()
    }

    pub fn can_send_data(&self) -> bool {
        self.state == State::Established
            && (self.readable || !self.early_rx.is_empty())
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Reads host data into `buf` (a guest RX buffer).
    pub fn read_host<B: BitmapSlice>(&mut self, buf: &mut VolatileSlice<B>) -> HostRead {
        if !self.early_rx.is_empty() {
            let n = buf.len().min(self.early_rx.len());
            buf.copy_from(&self.early_rx[..n]);
            self.early_rx.drain(..n);
            return HostRead::Data(n);
        }
        match self.stream.read_volatile(buf) {
            Ok(0) => HostRead::Eof,
            Ok(n) => HostRead::Data(n),
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                HostRead::WouldBlock
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {
                HostRead::WouldBlock
            }
            Err(_) => HostRead::Eof,
        }
    }

    /// Passes guest data to the host socket, buffering what it won't take
    /// yet. Errs if the guest overran its credit or the host socket is gone;
    /// the caller resets the connection.
    pub fn write_host<B: BitmapSlice>(&mut self, data: &VolatileSlice<B>) -> Result<(), ()> {
        if self.tx_buf.len() + data.len() > CONN_BUF as usize {
            return Err(());
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => return Err(()),
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        if written < data.len() {
            let rest = data.offset(written).map_err(|_| ())?;
            let mut tmp = vec![0u8; rest.len()];
            rest.copy_to(&mut tmp[..]);
            self.tx_buf.extend(tmp);
        }
        self.note_forwarded();
        Ok(())
    }

    /// Writes buffered guest data; errs if the host socket is gone.
    pub fn flush_host(&mut self) -> Result<(), ()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        self.note_forwarded();
        Ok(())
    }

    /// After forwarding, tell the guest about freed space once a quarter of
    /// the buffer has been consumed, or when everything has been.
    fn note_forwarded(&mut self) {
        let unreported = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        if unreported >= CONN_BUF / 4
            || (unreported > 0 && self.tx_buf.is_empty() && unreported >= CONN_BUF / 16)
        {
            self.owed.credit_update = true;
        }
    }

    /// Applies the guest's shutdown flags once its data has been flushed:
    /// half-close the host socket's write side, or finish the connection.
    /// Returns true when the connection is fully closed and should go.
    pub fn settle_shutdown(&mut self) -> bool {
        if !self.tx_buf.is_empty() {
            return false;
        }
        if self.peer_shut & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        let guest_done = self.peer_shut & SHUTDOWN_SEND != 0;
        let host_done = self.host_eof || self.peer_shut & SHUTDOWN_RCV != 0;
        guest_done && host_done
    }

    /// The epoll interest this connection needs now.
    pub fn wanted_interest(&self) -> u32 {
        let mut ev = 0;
        let want_read = self.state == State::Established
            && !self.readable
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0;
        if want_read {
            ev |= libc::EPOLLIN as u32;
        }
        if !self.tx_buf.is_empty() {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }
}

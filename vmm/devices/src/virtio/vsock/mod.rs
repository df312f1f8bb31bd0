//! virtio-vsock with the host side in userspace.
//!
//! Host convention (Firecracker's): the host side of the device is a unix
//! socket, `uds_path`. A host process connects to it, writes
//! `CONNECT <port>\n`, reads `OK <host-port>\n` and then has a byte stream to
//! guest port `<port>`. A guest connection to host port `P` is joined to a
//! new connection to the unix socket `<uds_path>_P`.
//!
//! Flow control is virtio-vsock's credit scheme: each side advertises its
//! receive buffer (`buf_alloc`) and how much it has consumed (`fwd_cnt`), and
//! never sends more than the peer has room for. We read from a host socket
//! only into a buffer the guest has posted and only as much as the guest has
//! credit for, and we buffer guest data for a host socket only up to the
//! `buf_alloc` we advertised, so memory stays bounded however slow either
//! side is.

mod conn;
mod muxer;
mod virtio;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::virtio::queue::Pass;
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

use muxer::Muxer;
pub use muxer::{timeouts, Metrics};
pub use virtio::VsockDevice;

/// The host's CID, fixed by the virtio spec.
pub const HOST_CID: u64 = 2;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;
/// Largest payload in one packet, either way.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Receive buffer each connection advertises to the guest.
pub const CONN_BUF: u32 = 256 * 1024;
/// The most connections open at once; a process with fewer descriptors
/// to spare gets a lower cap (see `berth_limits::fds::connection_cap`).
pub const MAX_CONNS: usize = 4096;
/// Queue size, the same for both transports (QEMU's vhost-user front end
/// asks for more than 256 entries).
pub const QUEUE_SIZE: u16 = 1024;
/// The features the device offers, whatever the transport. QEMU's
/// vhost-user front end acks NOTIFY_ON_EMPTY (a legacy transport bit that
/// means nothing to a modern driver), so it is offered too.
pub const FEATURES: u64 = (1 << virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << virtio_bindings::bindings::virtio_config::VIRTIO_F_NOTIFY_ON_EMPTY)
    | (1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    | (1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);

pub const TYPE_STREAM: u16 = 1;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The guest memory type the device works on.
pub type Mem = GuestMemoryMmap;

/// Failure to set the device up. Nothing the guest does produces one.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("cannot create the epoll instance: {0}")]
    Epoll(std::io::Error),
    #[error("guest CID {0} is reserved (use 3 or more)")]
    Cid(u64),
}

/// The vsock device's logic.
#[derive(Debug)]
pub struct Vsock {
    muxer: Muxer,
}

impl Vsock {
    /// Listens on `uds_path` (replacing a stale socket file there); at
    /// most `max_conns` connections are open at once.
    pub fn new(guest_cid: u64, uds_path: &Path, max_conns: usize) -> Result<Vsock, VsockError> {
        if guest_cid < 3 || guest_cid > u32::MAX as u64 {
            return Err(VsockError::Cid(guest_cid));
        }
        Ok(Vsock {
            muxer: Muxer::new(guest_cid, uds_path, max_conns.min(MAX_CONNS))?,
        })
    }

    pub fn max_conns(&self) -> usize {
        self.muxer.max_conns()
    }

    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid
    }

    /// The device config space: `le64 guest_cid`.
    pub fn config(&self) -> [u8; 8] {
        self.muxer.guest_cid.to_le_bytes()
    }

    /// A file descriptor that becomes readable when host sockets need
    /// attention; the transport polls it and then calls
    /// [`Vsock::handle_host_events`] and [`Vsock::process_rx`].
    pub fn host_fd(&self) -> RawFd {
        self.muxer.epoll.as_raw_fd()
    }

    /// Takes every packet the guest queued on the TX queue.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &Mem) -> Pass {
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.muxer.guest_packet(&pkt),
                Err(e) => self
                    .muxer
                    .bad_packet(&format!("malformed TX descriptor chain: {e}")),
            }
            if queue.add_used(mem, head, 0).is_err() {
                self.muxer.bad_packet("TX used ring is not writable");
                break;
            }
            used = true;
        }
        Pass {
            used,
            drained: true,
        }
    }

    /// Fills guest RX buffers with whatever the host side has for the
    /// guest; buffers it has nothing for stay available.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &Mem) -> Pass {
        let mut used = false;
        while self.muxer.has_rx_work() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => pkt,
                Err(e) => {
                    self.muxer
                        .bad_packet(&format!("malformed RX descriptor chain: {e}"));
                    let _ = queue.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            match self.muxer.fill_rx(&mut pkt) {
                Some(len) => {
                    if queue.add_used(mem, head, len).is_err() {
                        self.muxer.bad_packet("RX used ring is not writable");
                        break;
                    }
                    used = true;
                }
                // Nothing to send after all (a socket had no data): give the
                // buffer back to the available ring.
                None => queue.go_to_previous_position(),
            }
        }
        Pass {
            used,
            drained: false,
        }
    }

    /// Accepts host connections and notes readable and writable sockets.
    pub fn handle_host_events(&mut self) {
        self.muxer.handle_host_events();
    }

    pub fn metrics(&self) -> Metrics {
        self.muxer.metrics()
    }

    /// Ends what waited too long and retries what may now succeed, as of
    /// `now`. The device's timer does this by itself while anything
    /// waits; tests call it to move time on.
    pub fn sweep(&mut self, now: std::time::Instant) {
        self.muxer.sweep(now);
    }
}

#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

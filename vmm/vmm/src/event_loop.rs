//! The VMM's event loop: one thread, `vmm-events`, serves everything that
//! is not a vCPU. Its sources are the virtio queue notifiers (eventfds the
//! hypervisor signals when the driver writes QueueNotify), the vsock
//! device's host sockets and the control API.
//!
//! It is a tokio current-thread runtime driven by that thread alone: each
//! watched file descriptor is a task over [`AsyncFd`], and the API's hyper
//! server runs as tasks on the same runtime. Work is done inline (virtio-blk
//! does synchronous file I/O here), so a handler must not wait on a vCPU.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use berth_devices::virtio::net::{NetDevice, StreamBackend};
use berth_devices::virtio::vsock::VsockDevice;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::EventFd;

/// Something with a file descriptor the event loop can watch.
///
/// # Safety
///
/// `raw_fd` must return the same open descriptor for as long as the value
/// lives: the loop's reactor holds it registered until it drops the value.
pub unsafe trait Source: Send + Sync + 'static {
    fn raw_fd(&self) -> RawFd;
}

// SAFETY: an EventFd owns its descriptor and closes it only when dropped.
unsafe impl Source for EventFd {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

// SAFETY: the host descriptor is the device's epoll instance, created with
// it and closed when its last handle (this one among them) is dropped.
unsafe impl Source for VsockDevice {
    fn raw_fd(&self) -> RawFd {
        self.host_fd()
    }
}

// SAFETY: the backend's descriptor is its epoll instance, created with it
// and closed when the device's last handle (this one among them) drops.
unsafe impl Source for NetDevice<StreamBackend> {
    fn raw_fd(&self) -> RawFd {
        self.backend_fd()
    }
}

/// A [`Source`] as tokio sees it.
struct Watched<T>(T);

impl<T: Source> AsRawFd for Watched<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.raw_fd()
    }
}

/// The running event loop. Dropping it (or [`EventLoop::stop`]) ends the
/// thread and closes every watched source.
#[derive(Debug)]
pub struct EventLoop {
    runtime: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the `vmm-events` thread, with no sources yet.
    pub fn start() -> io::Result<EventLoop> {
        let rt = Builder::new_current_thread().enable_all().build()?;
        let runtime = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                rt.block_on(async {
                    // A dropped sender ends the loop as well.
                    let _ = stopped.await;
                });
                // Dropping the runtime drops every task and its sources.
                drop(rt);
            })?;
        Ok(EventLoop {
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The runtime the loop drives, for serving more than file
    /// descriptors (the control API).
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    /// Calls `on_ready` on the loop's thread whenever `source` is readable,
    /// until it returns an error other than `WouldBlock` (logged as
    /// `what`) or the loop stops. `on_ready` must consume what made the
    /// source readable (read the eventfd, drain the sockets).
    pub fn watch<T, F>(&self, what: &'static str, source: T, mut on_ready: F) -> io::Result<()>
    where
        T: Source,
        F: FnMut(&T) -> io::Result<()> + Send + 'static,
    {
        let fd = {
            let _rt = self.runtime.enter();
            // SAFETY: `Source` promises the descriptor stays open and the
            // same while `source` lives, and the AsyncFd owns `source`, so
            // it deregisters the descriptor before it can be closed.
            unsafe { AsyncFd::register_with_interest(Watched(source), Interest::READABLE) }
                .map_err(io::Error::from)?
        };
        self.runtime.spawn(async move {
            loop {
                let mut ready = match fd.readable().await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("event loop: {what}: cannot wait: {e}");
                        return;
                    }
                };
                let r = on_ready(&ready.get_inner().0);
                // Race-free: readiness that arrived since `readable` is kept.
                ready.clear_ready();
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::error!("event loop: {what}: {e}; no longer served");
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Ends the loop and waits for its thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shut_down();
    }
}

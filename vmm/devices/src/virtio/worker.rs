//! The thread a queue's requests run on. The transport only kicks it, so a
//! slow host disk or file system holds up neither the notifying vCPU nor
//! the event loop.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::virtio::device::QueueInterrupt;
use crate::virtio::queue::{serve, Pass};

/// How often an engine that could not finish (a full host disk) is retried.
const STALL_RETRY: Duration = Duration::from_secs(1);

/// The work done on one queue: what a [`Worker`] runs.
pub trait QueueEngine: Send + 'static {
    /// One pass over the available chains.
    fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Pass;
    /// The last pass left requests it must retry later.
    fn stalled(&self) -> bool {
        false
    }
}

enum Msg {
    Notify,
    Stop,
}

/// A running worker; [`Worker::stop`] gives the engine back.
#[derive(Debug)]
pub struct Worker<E> {
    tx: mpsc::Sender<Msg>,
    thread: JoinHandle<Option<E>>,
}

impl<E: QueueEngine> Worker<E> {
    /// Starts thread `name` serving `queue` with `engine`.
    pub fn start(
        name: &str,
        engine: E,
        mem: GuestMemoryMmap,
        queue: Queue,
        irq: QueueInterrupt,
    ) -> Result<Worker<E>, (Option<E>, std::io::Error)> {
        let (tx, rx) = mpsc::channel();
        // The thread takes the engine from a slot, so that if it cannot be
        // created the engine is still here to give back.
        let slot = Arc::new(Mutex::new(Some(engine)));
        let for_thread = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let engine = for_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
                engine.map(|e| run(e, mem, queue, irq, rx))
            });
        match spawned {
            Ok(thread) => Ok(Worker { tx, thread }),
            Err(e) => Err((slot.lock().unwrap_or_else(|e| e.into_inner()).take(), e)),
        }
    }

    /// The driver added requests.
    pub fn notify(&self) {
        let _ = self.tx.send(Msg::Notify);
    }

    /// Ends the thread after the request in progress; `None` if it died.
    pub fn stop(self) -> Option<E> {
        let _ = self.tx.send(Msg::Stop);
        self.thread.join().ok().flatten()
    }
}

fn run<E: QueueEngine>(
    mut engine: E,
    mem: GuestMemoryMmap,
    mut queue: Queue,
    irq: QueueInterrupt,
    rx: mpsc::Receiver<Msg>,
) -> E {
    loop {
        match rx.recv() {
            Ok(Msg::Notify) => {}
            Ok(Msg::Stop) | Err(_) => return engine,
        }
        // Notifications that arrived meanwhile are covered by this pass.
        loop {
            match rx.try_recv() {
                Ok(Msg::Notify) => continue,
                Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => return engine,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        loop {
            if serve(&mut queue, &mem, |q| engine.process(q, &mem)) {
                irq.signal_used();
            }
            if !engine.stalled() {
                break;
            }
            match rx.recv_timeout(STALL_RETRY) {
                Ok(Msg::Notify) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return engine,
            }
        }
    }
}

//! Pushes milestones to the host: the agent connects to host vsock port
//! `EVENTS_PORT` when there is something to say and something listens, and
//! sends each milestone as a frame, earlier ones first.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use berth_proto::{write_frame, Event, EVENTS_PORT};
use tokio::sync::{mpsc, oneshot};
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// Milestones kept for a host that connects late.
const BACKLOG: usize = 64;

enum Msg {
    Event(Event),
    /// Send what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

struct Channel {
    tx: mpsc::Sender<Msg>,
    rx: Mutex<Option<mpsc::Receiver<Msg>>>,
}

static CHANNEL: OnceLock<Channel> = OnceLock::new();

fn channel() -> &'static Channel {
    CHANNEL.get_or_init(|| {
        let (tx, rx) = mpsc::channel(BACKLOG);
        Channel {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    })
}

/// Queues an event; drops it if the pusher is far behind. Usable before the
/// runtime starts.
pub fn publish(event: Event) {
    let _ = channel().tx.try_send(Msg::Event(event));
}

/// Waits (at most `limit`) until every milestone published so far has been
/// sent to the host, if one listens: the last ones of a shutdown must get
/// out before the power goes.
pub async fn flush(limit: std::time::Duration) {
    let (tx, rx) = oneshot::channel();
    if channel().tx.send(Msg::Flush(tx)).await.is_ok() {
        let _ = tokio::time::timeout(limit, rx).await;
    }
}

/// Starts the pusher task (once).
pub fn start() {
    let rx = channel()
        .rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let Some(mut rx) = rx else { return };
    tokio::spawn(async move {
        let mut backlog: VecDeque<Event> = VecDeque::new();
        let mut stream: Option<VsockStream> = None;
        while let Some(msg) = rx.recv().await {
            let done = match msg {
                Msg::Event(ev) => {
                    if backlog.len() == BACKLOG {
                        backlog.pop_front();
                    }
                    backlog.push_back(ev);
                    None
                }
                Msg::Flush(done) => Some(done),
            };
            if stream.is_none() {
                stream = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, EVENTS_PORT))
                    .await
                    .ok();
            }
            if let Some(s) = stream.as_mut() {
                while let Some(ev) = backlog.front() {
                    if write_frame(s, ev).await.is_err() {
                        stream = None;
                        break;
                    }
                    backlog.pop_front();
                }
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
    });
}

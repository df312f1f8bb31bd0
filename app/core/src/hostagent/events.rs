//! The guest agent's milestones: it connects to host vsock port
//! [`berth_proto::EVENTS_PORT`] (`vsock.sock_1025` here) and pushes one
//! frame per milestone. The host agent keeps the latest ones, to say what
//! the guest was doing (e.g. how a shutdown went).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use berth_limits::RateLimiter;
use berth_proto::{read_frame, Event, FrameError};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// Milestones kept.
const KEEP: usize = 64;
/// Guest connections served at once (the agent uses one).
const MAX_CONNECTIONS: usize = 4;

/// The latest milestones, oldest first.
#[derive(Debug, Default)]
pub struct Milestones(Mutex<VecDeque<Event>>);

impl Milestones {
    fn push(&self, e: Event) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back(e);
    }

    #[cfg(test)]
    pub fn push_for_test(&self, e: Event) {
        self.push(e);
    }

    /// The last milestone with this name, if any.
    pub fn last(&self, name: &str) -> Option<Event> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().rev().find(|e| e.name == name).cloned()
    }

    /// The name of the newest milestone.
    pub fn newest(&self) -> Option<String> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.back().map(|e| e.name.clone())
    }
}

/// Serves guest connections on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, milestones: Arc<Milestones>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut log = RateLimiter::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                if let Some(s) = log.hit() {
                    tracing::warn!("guest events: accept failed: {e}{s}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let milestones = milestones.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            loop {
                match read_frame::<Event, _>(&mut stream).await {
                    Ok(e) => {
                        tracing::debug!("guest milestone: {} {:?}", e.name, e.fields);
                        milestones.push(e);
                    }
                    Err(FrameError::Closed) => return,
                    Err(e) => {
                        tracing::debug!("guest events: {e}; closing");
                        return;
                    }
                }
            }
        });
    }
}

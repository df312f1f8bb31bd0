//! The agent's shared state, watched by the vsock servers.

use std::sync::{Arc, Mutex};

use berth_proto::{AgentState, DataDiskState, Phase};
use tokio::sync::{watch, Notify};

use crate::console::uptime_ms;
use crate::daemons::Supervised;

/// Why the agent is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    Request,
    Signal,
    SelfTest,
}

/// State shared by the agent's tasks.
#[derive(Debug)]
pub struct Shared {
    state: watch::Sender<AgentState>,
    shutdown: Notify,
    cause: Mutex<Option<ShutdownCause>>,
    daemons: Mutex<Vec<Supervised>>,
    /// Published ports, for `watch_ports` and forwarded connections.
    pub ports: Arc<crate::ports::Table>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        let (state, _) = watch::channel(AgentState {
            phase: Phase::Booting,
            uptime_ms: 0,
            docker_ready_uptime_ms: None,
            data_disk: DataDiskState::Pending,
            error: None,
            restarts: Vec::new(),
        });
        Arc::new(Shared {
            state,
            shutdown: Notify::new(),
            cause: Mutex::new(None),
            daemons: Mutex::new(Vec::new()),
            ports: crate::ports::Table::new(),
        })
    }

    /// A snapshot with current uptime and restart counts.
    pub fn snapshot(&self) -> AgentState {
        let mut s = self.state.borrow().clone();
        s.uptime_ms = uptime_ms();
        s.restarts = self
            .daemons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| (d.name.to_owned(), d.restarts()))
            .collect();
        s
    }

    pub fn update(&self, f: impl FnOnce(&mut AgentState)) {
        self.state.send_modify(f);
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    pub fn watch(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    pub fn add_daemon(&self, d: Supervised) {
        self.daemons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(d);
    }

    pub fn daemons(&self) -> Vec<Supervised> {
        self.daemons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks for an orderly shutdown; the first cause wins.
    pub fn request_shutdown(&self, cause: ShutdownCause) {
        let mut c = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            *c = Some(cause);
        }
        self.shutdown.notify_one();
    }

    /// Waits for [`Shared::request_shutdown`] and returns its cause.
    pub async fn shutdown_requested(&self) -> ShutdownCause {
        self.shutdown.notified().await;
        self.cause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(ShutdownCause::Request)
    }
}

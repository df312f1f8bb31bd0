//! What the app keeps between commands: the VM's state directory, the
//! Docker client, and the streams and terminals the UI has open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use berth_core::docker::terminal::Terminal;
use berth_core::docker::DockerError;
use berth_core::paths::StateDir;
use berth_core::uierror::UiError;
use bollard::Docker;

/// Open log streams and terminals are bounded: a UI that leaks them (or a
/// script calling the commands) cannot exhaust the socket's connections.
pub const MAX_STREAMS: usize = 32;

#[derive(Debug)]
pub struct AppState {
    pub state_dir: StateDir,
    docker: tokio::sync::Mutex<Option<Docker>>,
    /// The current container-list watch; an older one stops when it sees
    /// this change.
    pub watch_gen: AtomicU64,
    next_id: AtomicU64,
    /// The current usage sweep (same rule as `watch_gen`).
    pub usage_gen: AtomicU64,
    /// Log and stats streams by id, each with its stop flag.
    pub streams: std::sync::Mutex<HashMap<u64, Arc<AtomicBool>>>,
    pub terminals: tokio::sync::Mutex<HashMap<u64, Arc<Terminal>>>,
}

impl AppState {
    pub fn new(state_dir: StateDir) -> AppState {
        AppState {
            state_dir,
            docker: tokio::sync::Mutex::new(None),
            watch_gen: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            usage_gen: AtomicU64::new(0),
            streams: std::sync::Mutex::new(HashMap::new()),
            terminals: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new stream (bounded by [`MAX_STREAMS`]); returns its id
    /// and the flag that stops it.
    pub fn open_stream(&self, what: &str) -> Result<(u64, Arc<AtomicBool>), UiError> {
        let mut open = self
            .streams
            .lock()
            .map_err(|_| UiError::new("io", "internal lock"))?;
        if open.len() >= MAX_STREAMS {
            return Err(UiError::new(
                "too_many",
                format!("{MAX_STREAMS} {what} are open already; close one"),
            ));
        }
        let id = self.next_id();
        let stop = Arc::new(AtomicBool::new(false));
        open.insert(id, stop.clone());
        Ok((id, stop))
    }

    /// Stops a stream and forgets it.
    pub fn close_stream(&self, id: u64) {
        if let Ok(mut open) = self.streams.lock() {
            if let Some(stop) = open.remove(&id) {
                stop.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The Docker client, connected on first use (and again after the
    /// engine restarted).
    pub async fn docker(&self) -> Result<Docker, UiError> {
        let mut d = self.docker.lock().await;
        if let Some(c) = d.as_ref() {
            return Ok(c.clone());
        }
        let c = berth_core::docker::connect(&self.state_dir).await?;
        *d = Some(c.clone());
        Ok(c)
    }

    /// Forgets the client after an error that means the engine went away.
    pub async fn docker_failed(&self, e: &DockerError) {
        if matches!(e, DockerError::EngineStopped) {
            *self.docker.lock().await = None;
        }
    }

    /// Runs `f` with the client; a connection error drops the client.
    pub async fn with_docker<T, F, Fut>(&self, f: F) -> Result<T, UiError>
    where
        F: FnOnce(Docker) -> Fut,
        Fut: std::future::Future<Output = Result<T, DockerError>>,
    {
        let d = self.docker().await?;
        match f(d).await {
            Ok(v) => Ok(v),
            Err(e) => {
                self.docker_failed(&e).await;
                Err(e.into())
            }
        }
    }
}

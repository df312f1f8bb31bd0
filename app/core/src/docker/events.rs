//! The container list kept current by Docker's event stream: listed once,
//! then listed again only when a container event arrives (events that come
//! together are answered with one listing). No polling.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::EventsOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;

use super::containers::{list, ContainerRow};
use super::DockerError;

/// Events arriving within this window after the first are answered with
/// one listing (a `compose up` of 20 services is a burst of ~100 events).
pub const COALESCE: Duration = Duration::from_millis(50);

/// Calls `on_list` with every container now, then after each burst of
/// container events, until the event stream ends (the engine stopped) or
/// `on_list` returns false. Returns why the stream ended.
pub async fn watch_containers(
    docker: &Docker,
    mut on_list: impl FnMut(Vec<ContainerRow>) -> bool,
) -> Result<(), DockerError> {
    let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
    let opts = EventsOptionsBuilder::default().filters(&filters).build();
    // Subscribed before the first listing, so nothing between the two is
    // missed.
    let mut events = Box::pin(docker.events(Some(opts)));
    if !on_list(list(docker).await?) {
        return Ok(());
    }
    loop {
        match events.next().await {
            None => return Err(DockerError::EngineStopped),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(_)) => {}
        }
        // Take the rest of the burst.
        let deadline = tokio::time::Instant::now() + COALESCE;
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Err(_) => break,
                Ok(None) => return Err(DockerError::EngineStopped),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(Some(Ok(_))) => {}
            }
        }
        if !on_list(list(docker).await?) {
            return Ok(());
        }
    }
}

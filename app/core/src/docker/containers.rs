//! The container list and the actions on a container, shaped for the UI.

use std::collections::HashMap;

use bollard::models::{ContainerInspectResponse, ContainerSummary, PortSummary};
use bollard::query_parameters::{
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use ts_rs::TS;

use super::DockerError;

/// The compose project label; containers that carry it are grouped.
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// The compose service label.
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// One row of the container list.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct ContainerRow {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub image: String,
    /// `created`, `running`, `paused`, `restarting`, `removing`, `exited`
    /// or `dead`.
    pub state: String,
    /// Docker's own summary ("Up 3 minutes (healthy)").
    pub status: String,
    /// `healthy`, `unhealthy` or `starting` for containers with a health
    /// check.
    pub health: Option<String>,
    pub ports: Vec<PortLink>,
    /// Unix seconds.
    pub created: f64,
    /// The compose project, if compose made it.
    pub project: Option<String>,
    pub service: Option<String>,
    pub command: String,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct PortLink {
    pub container_port: u16,
    pub host_port: Option<u16>,
    pub host_ip: Option<String>,
    /// `tcp`, `udp` or `sctp`.
    pub proto: String,
    /// Where a browser reaches it on the host (`http://localhost:8080`),
    /// for published TCP ports.
    pub url: Option<String>,
}

/// What can be done to a container from the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum ContainerAction {
    Start,
    Stop,
    Restart,
    Pause,
    Unpause,
    /// Refused for a running container unless forced.
    Remove,
    /// Remove, killing it first if it runs.
    ForceRemove,
}

fn port_link(p: &PortSummary) -> PortLink {
    let proto = p
        .typ
        .map(|t| t.to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "tcp".into());
    let host_ip = p.ip.clone().filter(|s| !s.is_empty());
    let url = match (p.public_port, proto.as_str()) {
        (Some(port), "tcp") => {
            let host = match host_ip.as_deref() {
                None | Some("0.0.0.0") | Some("::") | Some("127.0.0.1") => "localhost".to_owned(),
                Some(ip) if ip.contains(':') => format!("[{ip}]"),
                Some(ip) => ip.to_owned(),
            };
            Some(format!("http://{host}:{port}"))
        }
        _ => None,
    };
    PortLink {
        container_port: p.private_port,
        host_port: p.public_port,
        host_ip,
        proto,
        url,
    }
}

/// The health part of Docker's status line, if any.
fn health_of(status: &str) -> Option<String> {
    let inner = status.rsplit_once('(')?.1.strip_suffix(')')?;
    let word = inner.strip_prefix("health: ").unwrap_or(inner);
    ["healthy", "unhealthy", "starting"]
        .contains(&word)
        .then(|| word.to_owned())
}

/// A summary from `GET /containers/json` as a row.
pub fn row(c: &ContainerSummary) -> ContainerRow {
    let labels = c.labels.clone().unwrap_or_default();
    let status = c.status.clone().unwrap_or_default();
    let mut ports: Vec<PortLink> = c.ports.iter().flatten().map(port_link).collect();
    // Docker lists a port once per host address (IPv4 and IPv6): one link
    // each is enough.
    ports.sort_by(|a, b| {
        (a.container_port, &a.proto, a.host_port).cmp(&(b.container_port, &b.proto, b.host_port))
    });
    ports.dedup_by(|a, b| {
        a.container_port == b.container_port && a.proto == b.proto && a.host_port == b.host_port
    });
    ContainerRow {
        id: c.id.clone().unwrap_or_default(),
        name: c
            .names
            .iter()
            .flatten()
            .next()
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        image: c.image.clone().unwrap_or_default(),
        state: c.state.map(|s| s.to_string()).unwrap_or_default(),
        health: health_of(&status),
        status,
        ports,
        created: c.created.unwrap_or(0) as f64,
        project: labels.get(COMPOSE_PROJECT).cloned(),
        service: labels.get(COMPOSE_SERVICE).cloned(),
        command: c.command.clone().unwrap_or_default(),
    }
}

/// Every container, running or not, newest first.
pub async fn list(docker: &Docker) -> Result<Vec<ContainerRow>, DockerError> {
    let opts = ListContainersOptionsBuilder::default().all(true).build();
    let mut rows: Vec<ContainerRow> = docker
        .list_containers(Some(opts))
        .await?
        .iter()
        .map(row)
        .collect();
    rows.sort_by(|a, b| b.created.total_cmp(&a.created).then(a.name.cmp(&b.name)));
    Ok(rows)
}

/// Does `action` to container `id`.
pub async fn act(docker: &Docker, id: &str, action: ContainerAction) -> Result<(), DockerError> {
    check_id(id)?;
    match action {
        ContainerAction::Start => docker.start_container(id, None).await?,
        ContainerAction::Stop => {
            let opts = StopContainerOptionsBuilder::default().build();
            docker.stop_container(id, Some(opts)).await?
        }
        ContainerAction::Restart => docker.restart_container(id, None).await?,
        ContainerAction::Pause => docker.pause_container(id).await?,
        ContainerAction::Unpause => docker.unpause_container(id).await?,
        ContainerAction::Remove | ContainerAction::ForceRemove => {
            let force = action == ContainerAction::ForceRemove;
            let opts = RemoveContainerOptionsBuilder::default()
                .force(force)
                .v(false)
                .build();
            docker.remove_container(id, Some(opts)).await.map_err(|e| {
                match DockerError::from(e) {
                    DockerError::Conflict(m) if !force => DockerError::Conflict(format!(
                        "{m}. Stop it first, or remove it with Force."
                    )),
                    other => other,
                }
            })?
        }
    }
    Ok(())
}

/// Container ids and names are `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; anything
/// else would be spliced into a URL path.
pub fn check_id(id: &str) -> Result<(), DockerError> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(DockerError::Invalid(format!(
            "{id:?} is not a container name or id"
        )))
    }
}

/// What the detail view shows besides logs, stats and the terminal.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct ContainerDetail {
    pub id: String,
    pub name: String,
    pub image: String,
    pub state: String,
    pub health: Option<String>,
    /// When it started, RFC 3339, if it runs.
    pub started_at: Option<String>,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub mounts: Vec<MountRow>,
    pub networks: Vec<NetworkRow>,
    pub labels: Vec<(String, String)>,
    pub ports: Vec<PortLink>,
    pub tty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct MountRow {
    /// `bind`, `volume`, `tmpfs`, …
    pub kind: String,
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct NetworkRow {
    pub name: String,
    pub ip: String,
    pub gateway: String,
}

/// `GET /containers/{id}/json`, shaped.
pub async fn inspect(docker: &Docker, id: &str) -> Result<ContainerDetail, DockerError> {
    check_id(id)?;
    Ok(detail(&docker.inspect_container(id, None).await?))
}

fn detail(c: &ContainerInspectResponse) -> ContainerDetail {
    let cfg = c.config.clone().unwrap_or_default();
    let state = c.state.clone().unwrap_or_default();
    let mut labels: Vec<(String, String)> =
        cfg.labels.clone().unwrap_or_default().into_iter().collect();
    labels.sort();
    let mut command: Vec<String> = c.path.iter().cloned().collect();
    command.extend(c.args.iter().flatten().cloned());
    let mut networks: Vec<NetworkRow> = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, n)| NetworkRow {
            name,
            ip: n.ip_address.unwrap_or_default(),
            gateway: n.gateway.unwrap_or_default(),
        })
        .collect();
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    let ports = c
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.clone())
        .unwrap_or_default();
    let mut ports: Vec<PortLink> = ports_of(&ports);
    ports.sort_by_key(|p| (p.container_port, p.host_port));
    let running = state.running.unwrap_or(false);
    let status = state.status.map(|s| s.to_string()).unwrap_or_default();
    ContainerDetail {
        id: c.id.clone().unwrap_or_default(),
        name: c
            .name
            .clone()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: cfg.image.clone().unwrap_or_default(),
        state: status,
        health: state
            .health
            .and_then(|h| h.status)
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty() && s != "none"),
        started_at: state.started_at.filter(|_| running),
        command,
        env: cfg.env.clone().unwrap_or_default(),
        mounts: c
            .mounts
            .iter()
            .flatten()
            .map(|m| MountRow {
                kind: m.typ.as_ref().map(|t| t.to_string()).unwrap_or_default(),
                source: m
                    .source
                    .clone()
                    .or_else(|| m.name.clone())
                    .unwrap_or_default(),
                destination: m.destination.clone().unwrap_or_default(),
                read_only: !m.rw.unwrap_or(true),
            })
            .collect(),
        networks,
        labels,
        ports,
        tty: cfg.tty.unwrap_or(false),
    }
}

fn ports_of(map: &HashMap<String, Option<Vec<bollard::models::PortBinding>>>) -> Vec<PortLink> {
    let mut out = Vec::new();
    for (key, bindings) in map {
        let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        let summary = |ip: Option<String>, public: Option<u16>| PortSummary {
            ip,
            private_port: port,
            public_port: public,
            typ: proto.parse().ok(),
        };
        match bindings {
            Some(b) if !b.is_empty() => {
                for pb in b {
                    let public = pb.host_port.as_deref().and_then(|p| p.parse().ok());
                    out.push(port_link(&summary(pb.host_ip.clone(), public)));
                }
            }
            _ => out.push(port_link(&summary(None, None))),
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerSummaryStateEnum, PortSummaryTypeEnum};

    #[test]
    fn a_summary_becomes_a_row_with_links_health_and_project() {
        let c = ContainerSummary {
            id: Some("abc".into()),
            names: Some(vec!["/web-1".into()]),
            image: Some("nginx".into()),
            state: Some(ContainerSummaryStateEnum::RUNNING),
            status: Some("Up 3 minutes (healthy)".into()),
            created: Some(1_700_000_000),
            labels: Some(HashMap::from([
                (COMPOSE_PROJECT.to_owned(), "shop".to_owned()),
                (COMPOSE_SERVICE.to_owned(), "web".to_owned()),
            ])),
            ports: Some(vec![
                PortSummary {
                    ip: Some("0.0.0.0".into()),
                    private_port: 80,
                    public_port: Some(8080),
                    typ: Some(PortSummaryTypeEnum::TCP),
                },
                PortSummary {
                    ip: Some("::".into()),
                    private_port: 80,
                    public_port: Some(8080),
                    typ: Some(PortSummaryTypeEnum::TCP),
                },
                PortSummary {
                    ip: None,
                    private_port: 53,
                    public_port: None,
                    typ: Some(PortSummaryTypeEnum::UDP),
                },
            ]),
            ..Default::default()
        };
        let r = row(&c);
        assert_eq!(r.name, "web-1");
        assert_eq!(r.state, "running");
        assert_eq!(r.health.as_deref(), Some("healthy"));
        assert_eq!(r.project.as_deref(), Some("shop"));
        assert_eq!(r.service.as_deref(), Some("web"));
        assert_eq!(r.ports.len(), 2, "{:?}", r.ports);
        assert_eq!(r.ports[0].container_port, 53);
        assert_eq!(r.ports[0].url, None);
        assert_eq!(r.ports[1].url.as_deref(), Some("http://localhost:8080"));
    }

    #[test]
    fn health_comes_from_the_status_line_only_when_there_is_one() {
        assert_eq!(
            health_of("Up 2 seconds (health: starting)").as_deref(),
            Some("starting")
        );
        assert_eq!(
            health_of("Up 1 hour (unhealthy)").as_deref(),
            Some("unhealthy")
        );
        assert_eq!(health_of("Up 1 hour"), None);
        assert_eq!(health_of("Exited (0) 3 seconds ago"), None);
    }

    #[test]
    fn ids_that_could_leave_the_url_path_are_refused() {
        for ok in ["abc123", "my_app-1.web", "a"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../images", "a/b", "a?b", "-x", "a b", &"x".repeat(300)] {
            let e = check_id(bad).unwrap_err();
            assert_eq!(e.code(), "invalid", "{bad}");
        }
    }
}

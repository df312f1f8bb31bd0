//! Images for the UI: the list with what uses each one, removal that says
//! why it is refused, pruning, history, pulling with per-layer progress,
//! and running an image from a form.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, PruneImagesOptionsBuilder, RemoveImageOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use ts_rs::TS;

use super::containers::check_id;
use super::DockerError;

/// One row of the image list: an image with each of its tags (an untagged
/// one has none and is "dangling").
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct ImageRow {
    /// `sha256:…`
    pub id: String,
    /// `repository:tag`, possibly several.
    pub tags: Vec<String>,
    pub size: f64,
    /// Unix seconds.
    pub created: f64,
    /// Names of the containers (running or not) made from it.
    pub used_by: Vec<String>,
    pub dangling: bool,
}

/// What removing or pruning freed.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct Removed {
    /// Tags untagged and image/volume ids or names deleted.
    pub items: Vec<String>,
    pub reclaimed: f64,
}

/// One layer of an image's history.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct HistoryRow {
    /// The layer's image id, or `<missing>` for layers pulled without one.
    pub id: String,
    pub created: f64,
    pub created_by: String,
    pub size: f64,
    pub tags: Vec<String>,
    pub comment: String,
}

/// A pull's progress: every layer seen so far and the last overall line.
#[derive(Debug, Clone, PartialEq, Default, Serialize, TS)]
pub struct PullProgress {
    pub layers: Vec<LayerProgress>,
    /// The latest status not tied to a layer ("Digest: …", "Status: …").
    pub status: String,
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct LayerProgress {
    pub id: String,
    /// Docker's words: "Waiting", "Downloading", "Extracting",
    /// "Pull complete", "Already exists"…
    pub status: String,
    pub current: f64,
    pub total: f64,
}

/// A container to run from the images view.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, TS)]
pub struct RunSpec {
    pub image: String,
    /// Empty: Docker picks a name.
    pub name: String,
    pub ports: Vec<RunPort>,
    pub volumes: Vec<RunVolume>,
    /// `KEY=value`.
    pub env: Vec<String>,
    /// Overrides the image's command; split at whitespace. Empty: the
    /// image's own.
    #[serde(default)]
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct RunPort {
    pub host: u16,
    pub container: u16,
    /// `tcp` or `udp`.
    pub proto: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct RunVolume {
    /// A host path (absolute) or a volume name.
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    pub read_only: bool,
}

/// Longest image reference accepted (Docker's own limit is 255 for the
/// name part).
const MAX_REFERENCE: usize = 512;
/// Progress is sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// A pull that reports more layers than this is a broken registry.
const MAX_LAYERS: usize = 1024;

/// Every image, newest first, with the containers that use it.
pub async fn list(docker: &Docker) -> Result<Vec<ImageRow>, DockerError> {
    let images = docker
        .list_images(Some(ListImagesOptionsBuilder::default().build()))
        .await?;
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default().all(true).build(),
        ))
        .await?;
    let mut users: HashMap<String, Vec<String>> = HashMap::new();
    for c in &containers {
        if let Some(img) = &c.image_id {
            let name = c
                .names
                .iter()
                .flatten()
                .next()
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            users.entry(img.clone()).or_default().push(name);
        }
    }
    let mut rows: Vec<ImageRow> = images
        .into_iter()
        .map(|i| {
            let tags: Vec<String> = i
                .repo_tags
                .into_iter()
                .filter(|t| t != "<none>:<none>")
                .collect();
            let mut used_by = users.remove(&i.id).unwrap_or_default();
            used_by.sort();
            ImageRow {
                dangling: tags.is_empty(),
                id: i.id,
                tags,
                size: i.size as f64,
                created: i.created as f64,
                used_by,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.created.total_cmp(&a.created).then(a.id.cmp(&b.id)));
    Ok(rows)
}

/// Checks an image reference or id before it goes into a URL path.
pub fn check_reference(r: &str) -> Result<(), DockerError> {
    let ok = !r.is_empty()
        && r.len() <= MAX_REFERENCE
        && r.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-:/@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(DockerError::Invalid(format!(
            "{r:?} is not an image reference (like registry:5000/name:tag)"
        )))
    }
}

/// Removes an image (one tag of it, when `reference` is a tag). An image
/// containers use is refused with their names unless `force`; Docker itself
/// still refuses a running container's image.
pub async fn remove(docker: &Docker, reference: &str, force: bool) -> Result<Removed, DockerError> {
    check_reference(reference)?;
    if !force {
        let img = docker.inspect_image(reference).await?;
        if let Some(id) = img.id {
            let used: Vec<String> = list(docker)
                .await?
                .into_iter()
                .filter(|r| r.id == id)
                .flat_map(|r| r.used_by)
                .collect();
            if !used.is_empty() {
                return Err(DockerError::Conflict(format!(
                    "{reference} is used by {}: remove {} first, or force the removal",
                    used.join(", "),
                    if used.len() == 1 { "it" } else { "them" }
                )));
            }
        }
    }
    let opts = RemoveImageOptionsBuilder::default().force(force).build();
    let out = docker.remove_image(reference, Some(opts), None).await?;
    Ok(Removed {
        items: out
            .into_iter()
            .filter_map(|i| i.deleted.or(i.untagged))
            .collect(),
        reclaimed: 0.0,
    })
}

/// Removes dangling (untagged, unused) images.
pub async fn prune(docker: &Docker) -> Result<Removed, DockerError> {
    let mut filters = HashMap::new();
    filters.insert("dangling", vec!["true"]);
    let opts = PruneImagesOptionsBuilder::default()
        .filters(&filters)
        .build();
    let r = docker.prune_images(Some(opts)).await?;
    Ok(Removed {
        items: r
            .images_deleted
            .into_iter()
            .flatten()
            .filter_map(|i| i.deleted.or(i.untagged))
            .collect(),
        reclaimed: r.space_reclaimed.unwrap_or(0) as f64,
    })
}

/// The layers of an image, newest first.
pub async fn history(docker: &Docker, reference: &str) -> Result<Vec<HistoryRow>, DockerError> {
    check_reference(reference)?;
    Ok(docker
        .image_history(reference)
        .await?
        .into_iter()
        .map(|h| HistoryRow {
            id: h.id,
            created: h.created as f64,
            created_by: h.created_by,
            size: h.size as f64,
            tags: h.tags,
            comment: h.comment,
        })
        .collect())
}

/// Splits `name[:tag]` (a port in the registry part is not a tag) and
/// adds `latest` when no tag or digest is given.
pub fn split_reference(r: &str) -> (String, String) {
    if let Some((name, digest)) = r.split_once('@') {
        return (name.to_owned(), digest.to_owned());
    }
    let last_slash = r.rfind('/').map_or(0, |i| i + 1);
    match r[last_slash..].rfind(':') {
        Some(i) => (
            r[..last_slash + i].to_owned(),
            r[last_slash + i + 1..].to_owned(),
        ),
        None => (r.to_owned(), "latest".to_owned()),
    }
}

/// Applies one message of Docker's pull stream to the progress.
pub fn apply(p: &mut PullProgress, id: Option<&str>, status: &str, current: i64, total: i64) {
    // Layer ids are 12 hex digits; other ids ("latest", a tag) carry
    // overall lines.
    let is_layer = id.is_some_and(|i| i.len() == 12 && i.bytes().all(|b| b.is_ascii_hexdigit()));
    match id {
        Some(id) if is_layer => {
            if let Some(l) = p.layers.iter_mut().find(|l| l.id == id) {
                l.status = status.to_owned();
                if total > 0 {
                    l.total = total as f64;
                }
                if current > 0 || status != l.status {
                    l.current = current.max(0) as f64;
                }
                if matches!(
                    status,
                    "Pull complete" | "Already exists" | "Download complete"
                ) {
                    l.current = l.total;
                }
            } else if p.layers.len() < MAX_LAYERS {
                p.layers.push(LayerProgress {
                    id: id.to_owned(),
                    status: status.to_owned(),
                    current: current.max(0) as f64,
                    total: total.max(0) as f64,
                });
            }
        }
        _ => p.status = status.to_owned(),
    }
}

/// Pulls `reference`, calling `on_progress` at most every 100 ms and once
/// at the end; returns the final progress. Fails with Docker's own message
/// (unknown image, registry unreachable, not authorized).
pub async fn pull(
    docker: &Docker,
    reference: &str,
    mut on_progress: impl FnMut(PullProgress) -> bool,
) -> Result<PullProgress, DockerError> {
    check_reference(reference)?;
    let (name, tag) = split_reference(reference);
    let opts = CreateImageOptionsBuilder::default()
        .from_image(&name)
        .tag(&tag)
        .build();
    let mut stream = docker.create_image(Some(opts), None, None);
    let mut p = PullProgress::default();
    let mut last = Instant::now();
    while let Some(msg) = stream.next().await {
        let m = msg?;
        if let Some(e) = m.error_detail.and_then(|e| e.message) {
            return Err(DockerError::Api(e));
        }
        let (cur, tot) = m
            .progress_detail
            .map_or((0, 0), |d| (d.current.unwrap_or(0), d.total.unwrap_or(0)));
        apply(
            &mut p,
            m.id.as_deref(),
            m.status.as_deref().unwrap_or(""),
            cur,
            tot,
        );
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            if !on_progress(p.clone()) {
                return Ok(p);
            }
        }
    }
    p.done = true;
    on_progress(p.clone());
    Ok(p)
}

fn check_spec(s: &RunSpec) -> Result<(), DockerError> {
    check_reference(&s.image)?;
    if !s.name.is_empty() {
        check_id(&s.name)?;
    }
    for p in &s.ports {
        if p.host == 0 || p.container == 0 {
            return Err(DockerError::Invalid("ports are 1 to 65535".into()));
        }
        if p.proto != "tcp" && p.proto != "udp" {
            return Err(DockerError::Invalid(format!(
                "{:?} is not a protocol: tcp or udp",
                p.proto
            )));
        }
    }
    for v in &s.volumes {
        if !v.target.starts_with('/') {
            return Err(DockerError::Invalid(format!(
                "{:?}: the path in the container must be absolute",
                v.target
            )));
        }
        if v.source.is_empty() || v.source.contains(':') || v.target.contains(':') {
            return Err(DockerError::Invalid(format!(
                "{:?} → {:?}: a volume needs a host path or volume name and no ':'",
                v.source, v.target
            )));
        }
    }
    for e in &s.env {
        let key = e.split_once('=').map(|(k, _)| k).unwrap_or("");
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(DockerError::Invalid(format!("{e:?} is not KEY=value")));
        }
    }
    Ok(())
}

/// Creates and starts a container from the run dialog; returns its id.
pub async fn run(docker: &Docker, s: &RunSpec) -> Result<String, DockerError> {
    check_spec(s)?;
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    let mut exposed = Vec::new();
    for p in &s.ports {
        let key = format!("{}/{}", p.container, p.proto);
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: None,
                host_port: Some(p.host.to_string()),
            });
    }
    let binds: Vec<String> = s
        .volumes
        .iter()
        .map(|v| {
            format!(
                "{}:{}{}",
                v.source,
                v.target,
                if v.read_only { ":ro" } else { "" }
            )
        })
        .collect();
    let cmd: Vec<String> = s.command.split_whitespace().map(str::to_owned).collect();
    let body = ContainerCreateBody {
        image: Some(s.image.clone()),
        cmd: Some(cmd).filter(|c| !c.is_empty()),
        env: Some(s.env.clone()).filter(|e| !e.is_empty()),
        exposed_ports: Some(exposed).filter(|e| !e.is_empty()),
        host_config: Some(HostConfig {
            port_bindings: Some(bindings).filter(|b| !b.is_empty()),
            binds: Some(binds).filter(|b| !b.is_empty()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut opts = CreateContainerOptionsBuilder::default();
    if !s.name.is_empty() {
        opts = opts.name(&s.name);
    }
    let created = docker.create_container(Some(opts.build()), body).await?;
    if let Err(e) = docker.start_container(&created.id, None).await {
        // Leave nothing half-made behind.
        let _ = super::containers::act(
            docker,
            &created.id,
            super::containers::ContainerAction::ForceRemove,
        )
        .await;
        return Err(e.into());
    }
    Ok(created.id)
}

/// Sizes of everything Docker keeps, from `GET /system/df`: images,
/// containers' writable layers, volumes, build cache (bytes).
#[derive(Debug, Clone, PartialEq, Default, Serialize, TS)]
pub struct DiskUse {
    pub images: f64,
    pub containers: f64,
    pub volumes: f64,
    pub build_cache: f64,
    /// Volume name → bytes.
    #[ts(skip)]
    #[serde(skip)]
    pub volume_sizes: BTreeMap<String, i64>,
}

/// Reads `/system/df` (both its pre-1.44 shape, which the guest's dockerd
/// answers, and the newer one).
pub fn parse_df(v: &serde_json::Value) -> DiskUse {
    let num = |v: &serde_json::Value| v.as_i64().unwrap_or(0).max(0);
    let mut d = DiskUse {
        images: num(&v["LayersSize"]) as f64,
        ..Default::default()
    };
    let containers = v["Containers"].as_array().cloned().unwrap_or_default();
    d.containers = containers.iter().map(|c| num(&c["SizeRw"])).sum::<i64>() as f64;
    let volumes = v["Volumes"]
        .as_array()
        .or_else(|| v["VolumeUsage"]["Items"].as_array())
        .cloned()
        .unwrap_or_default();
    for vol in volumes {
        if let Some(name) = vol["Name"].as_str() {
            let size = vol["UsageData"]["Size"].as_i64().unwrap_or(-1);
            d.volume_sizes.insert(name.to_owned(), size);
            d.volumes += size.max(0) as f64;
        }
    }
    let cache = v["BuildCache"].as_array().cloned().unwrap_or_default();
    d.build_cache = cache.iter().map(|c| num(&c["Size"])).sum::<i64>() as f64;
    if d.images == 0.0 {
        d.images = num(&v["ImageUsage"]["TotalSize"]) as f64;
    }
    d
}

/// Docker's disk use, through the forwarded socket (bollard's model only
/// knows the newest shape of this answer).
///
/// dockerd runs one `system df` at a time and refuses a second while the
/// first is under way ("a disk usage operation is already running"): two
/// views asking at once (the volume list and the engine view, say) got an
/// error and showed no sizes until the next change. Such a refusal is
/// retried for up to 30 s.
pub async fn disk_use(docker_sock: &std::path::Path) -> Result<DiskUse, DockerError> {
    let mut tries = 0u32;
    let (status, v) = loop {
        let (status, v) =
            crate::http::request_json(docker_sock, hyper::Method::GET, "/system/df", None)
                .await
                .map_err(|_| DockerError::EngineStopped)?;
        let busy = !status.is_success()
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("already running"));
        if !busy || tries >= 100 {
            break (status, v);
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    if !status.is_success() {
        return Err(DockerError::Api(format!(
            "system df: {}",
            v["message"].as_str().unwrap_or(status.as_str())
        )));
    }
    Ok(parse_df(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked_and_split() {
        assert!(check_reference("127.0.0.1:5000/team/app:v1").is_ok());
        assert!(check_reference("busybox@sha256:abc").is_ok());
        assert!(check_reference("").is_err());
        assert!(check_reference("../x").is_err());
        assert!(check_reference("a b").is_err());
        assert!(check_reference("a?x=1").is_err());
        assert_eq!(
            split_reference("host.docker.internal:5000/app"),
            ("host.docker.internal:5000/app".into(), "latest".into())
        );
        assert_eq!(
            split_reference("registry:5000/app:v2"),
            ("registry:5000/app".into(), "v2".into())
        );
        assert_eq!(
            split_reference("app@sha256:1"),
            ("app".into(), "sha256:1".into())
        );
    }

    #[test]
    fn pull_progress_follows_layers() {
        let mut p = PullProgress::default();
        apply(&mut p, Some("latest"), "Pulling from app", 0, 0);
        apply(&mut p, Some("0123456789ab"), "Pulling fs layer", 0, 0);
        apply(&mut p, Some("0123456789ab"), "Downloading", 500, 1000);
        apply(&mut p, Some("ba9876543210"), "Already exists", 0, 0);
        assert_eq!(p.status, "Pulling from app");
        assert_eq!(p.layers.len(), 2);
        assert_eq!((p.layers[0].current, p.layers[0].total), (500.0, 1000.0));
        apply(&mut p, Some("0123456789ab"), "Pull complete", 0, 0);
        assert_eq!(p.layers[0].current, 1000.0);
        assert_eq!(p.layers[0].status, "Pull complete");
        apply(&mut p, None, "Status: Downloaded newer image", 0, 0);
        assert_eq!(p.status, "Status: Downloaded newer image");
        // A registry cannot grow the list without bound.
        for i in 0..2000u32 {
            apply(&mut p, Some(&format!("{i:012x}")), "Waiting", 0, 0);
        }
        assert_eq!(p.layers.len(), MAX_LAYERS);
    }

    #[test]
    fn run_specs_are_validated() {
        let ok = RunSpec {
            image: "app:1".into(),
            name: "web".into(),
            ports: vec![RunPort {
                host: 8080,
                container: 80,
                proto: "tcp".into(),
            }],
            volumes: vec![RunVolume {
                source: "/home/me/site".into(),
                target: "/usr/share/site".into(),
                read_only: true,
            }],
            env: vec!["A=1".into(), "EMPTY=".into()],
            command: "sleep 60".into(),
        };
        assert!(check_spec(&ok).is_ok());
        let bad = |f: &dyn Fn(&mut RunSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            check_spec(&s).unwrap_err().to_string()
        };
        assert!(bad(&|s| s.env.push("NOVALUE".into())).contains("KEY=value"));
        assert!(bad(&|s| s.volumes[0].target = "rel".into()).contains("absolute"));
        assert!(bad(&|s| s.ports[0].proto = "icmp".into()).contains("tcp or udp"));
        assert!(bad(&|s| s.ports[0].host = 0).contains("1 to 65535"));
        assert!(bad(&|s| s.name = "bad name".into()).contains("not a container name"));
    }

    #[test]
    fn df_is_read_in_both_shapes() {
        let old = serde_json::json!({
            "LayersSize": 1000,
            "Containers": [{"SizeRw": 10}, {"SizeRw": 5}],
            "Volumes": [{"Name": "db", "UsageData": {"Size": 300, "RefCount": 1}},
                        {"Name": "tmp", "UsageData": {"Size": -1, "RefCount": 0}}],
            "BuildCache": [{"Size": 7}]
        });
        let d = parse_df(&old);
        assert_eq!(
            (d.images, d.containers, d.volumes, d.build_cache),
            (1000.0, 15.0, 300.0, 7.0)
        );
        assert_eq!(d.volume_sizes["tmp"], -1);
        let new = serde_json::json!({
            "ImageUsage": {"TotalSize": 50},
            "VolumeUsage": {"Items": [{"Name": "db", "UsageData": {"Size": 3}}]}
        });
        let d = parse_df(&new);
        assert_eq!((d.images, d.volumes), (50.0, 3.0));
    }
}

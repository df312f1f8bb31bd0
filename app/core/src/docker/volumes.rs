//! Volumes for the UI: the list with sizes and users, create, remove,
//! prune, and a read-only look at a volume's files (listed in the guest by
//! the agent, confined to the volume).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{
    ListContainersOptionsBuilder, PruneVolumesOptionsBuilder, RemoveVolumeOptionsBuilder,
};
use bollard::Docker;
use serde::Serialize;
use ts_rs::TS;

use super::images::Removed;
use super::DockerError;

/// One row of the volume list.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct VolumeRow {
    pub name: String,
    pub driver: String,
    /// Where it lives in the VM.
    pub mountpoint: String,
    /// RFC 3339.
    pub created: String,
    /// Bytes; -1 when Docker has not measured it.
    pub size: f64,
    /// Names of the containers (running or not) that mount it.
    pub used_by: Vec<String>,
    /// The compose project that made it, if any.
    pub project: Option<String>,
    /// Made by Docker for a container's anonymous volume (a 64-hex name).
    pub anonymous: bool,
}

/// One entry of a volume directory.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct VolumeEntry {
    pub name: String,
    /// `dir`, `file`, `link` or `other`.
    pub kind: String,
    pub size: f64,
    /// Unix seconds.
    pub modified: f64,
    /// Octal permission bits, like `644`.
    pub mode: String,
    /// A symbolic link's target (not followed).
    pub target: Option<String>,
}

/// A directory listing of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
pub struct VolumeListing {
    /// The listed path, relative to the volume's root (`""` is the root).
    pub path: String,
    /// Directories first, then by name.
    pub entries: Vec<VolumeEntry>,
    /// More entries exist than [`MAX_ENTRIES`]; only the first are shown.
    pub truncated: bool,
}

/// A listing shows at most this many entries.
pub const MAX_ENTRIES: usize = 2000;
/// A listing takes at most this long.
const LIST_TIMEOUT: Duration = Duration::from_secs(20);

/// Checks a volume name before it goes into a URL path.
pub fn check_name(n: &str) -> Result<(), DockerError> {
    let ok = n.len() >= 2
        && n.len() <= 255
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(DockerError::Invalid(format!(
            "{n:?} is not a volume name: 2 or more letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

/// Which containers mount which volume.
async fn users(docker: &Docker) -> Result<HashMap<String, Vec<String>>, DockerError> {
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default().all(true).build(),
        ))
        .await?;
    let mut by_volume: HashMap<String, Vec<String>> = HashMap::new();
    for c in containers {
        let name = c
            .names
            .iter()
            .flatten()
            .next()
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default();
        for m in c.mounts.iter().flatten() {
            if m.typ.as_deref() == Some("volume") {
                if let Some(v) = &m.name {
                    by_volume.entry(v.clone()).or_default().push(name.clone());
                }
            }
        }
    }
    Ok(by_volume)
}

/// Every volume with its size (measured by Docker's `system df`, which the
/// list waits for) and users, by name.
pub async fn list(docker: &Docker, docker_sock: &Path) -> Result<Vec<VolumeRow>, DockerError> {
    let vols = docker
        .list_volumes(None::<bollard::query_parameters::ListVolumesOptions>)
        .await?;
    let mut users = users(docker).await?;
    let sizes = super::images::disk_use(docker_sock)
        .await
        .map(|d| d.volume_sizes)
        .unwrap_or_default();
    let mut rows: Vec<VolumeRow> = vols
        .volumes
        .into_iter()
        .flatten()
        .map(|v| {
            let mut used_by = users.remove(&v.name).unwrap_or_default();
            used_by.sort();
            VolumeRow {
                size: sizes.get(&v.name).copied().unwrap_or(-1) as f64,
                anonymous: v.name.len() == 64 && v.name.bytes().all(|b| b.is_ascii_hexdigit()),
                project: v.labels.get(super::containers::COMPOSE_PROJECT).cloned(),
                created: v.created_at.map(|d| d.to_string()).unwrap_or_default(),
                name: v.name,
                driver: v.driver,
                mountpoint: v.mountpoint,
                used_by,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.anonymous.cmp(&b.anonymous).then(a.name.cmp(&b.name)));
    Ok(rows)
}

pub async fn create(docker: &Docker, name: &str) -> Result<VolumeRow, DockerError> {
    check_name(name)?;
    if docker.inspect_volume(name).await.is_ok() {
        return Err(DockerError::Conflict(format!(
            "a volume named {name} exists already"
        )));
    }
    let v = docker
        .create_volume(VolumeCreateRequest {
            name: Some(name.to_owned()),
            ..Default::default()
        })
        .await?;
    Ok(VolumeRow {
        name: v.name,
        driver: v.driver,
        mountpoint: v.mountpoint,
        created: v.created_at.map(|d| d.to_string()).unwrap_or_default(),
        size: 0.0,
        used_by: Vec::new(),
        project: None,
        anonymous: false,
    })
}

/// Removes a volume; one in use is refused with the names of its users
/// (Docker refuses it even when forced).
pub async fn remove(docker: &Docker, name: &str) -> Result<(), DockerError> {
    check_name(name)?;
    let used = users(docker).await?.remove(name).unwrap_or_default();
    if !used.is_empty() {
        return Err(DockerError::Conflict(format!(
            "volume {name} is used by {}: remove {} first",
            used.join(", "),
            if used.len() == 1 {
                "that container"
            } else {
                "those containers"
            }
        )));
    }
    let opts = RemoveVolumeOptionsBuilder::default().build();
    docker.remove_volume(name, Some(opts)).await?;
    Ok(())
}

/// Removes every volume no container uses (named ones too: the guest's
/// dockerd predates API 1.42, where prune keeps named volumes; `all=true`
/// asks newer engines for the same).
pub async fn prune(docker: &Docker) -> Result<Removed, DockerError> {
    let mut filters = HashMap::new();
    let v = docker.client_version();
    if (v.major_version, v.minor_version) >= (1, 42) {
        filters.insert("all", vec!["true"]);
    }
    let opts = PruneVolumesOptionsBuilder::default()
        .filters(&filters)
        .build();
    let r = docker.prune_volumes(Some(opts)).await?;
    Ok(Removed {
        items: r.volumes_deleted.unwrap_or_default(),
        reclaimed: r.space_reclaimed.unwrap_or(0) as f64,
    })
}

/// Checks a path inside a volume: relative, no `..`, no NUL.
pub fn check_rel(rel: &str) -> Result<String, DockerError> {
    let clean: Vec<&str> = rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if rel.len() > 4096 || rel.contains('\0') || clean.contains(&"..") {
        return Err(DockerError::Invalid(format!(
            "{rel:?} is not a path inside the volume"
        )));
    }
    Ok(clean.join("/"))
}

/// The guest-side lister: resolves the path (symbolic links included) and
/// refuses anything that ends up outside the volume, then lists one level.
/// Exit 3: missing; 4: outside the volume; 5: not a directory.
const LISTER: &str = r#"root=$(realpath -e -- "$1") || exit 3
p=$(realpath -e -- "$1/$2") || exit 3
case "$p/" in "$root"/*) ;; *) exit 4;; esac
[ -d "$p" ] || exit 5
cd "$p" && find . -mindepth 1 -maxdepth 1 -printf '%y\t%s\t%T@\t%m\t%f\t%l\0' | head -z -n "$3""#;

/// Parses the lister's NUL-separated records.
pub fn parse_listing(path: &str, out: &[u8]) -> VolumeListing {
    let mut entries: Vec<VolumeEntry> = out
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .filter_map(|r| {
            let s = String::from_utf8_lossy(r);
            let mut f = s.splitn(6, '\t');
            let (kind, size, mtime, mode, name, target) = (
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
            );
            Some(VolumeEntry {
                name: name.to_owned(),
                kind: match kind {
                    "d" => "dir",
                    "f" => "file",
                    "l" => "link",
                    _ => "other",
                }
                .to_owned(),
                size: size.parse().unwrap_or(0.0),
                modified: mtime.parse().unwrap_or(0.0),
                mode: mode.to_owned(),
                target: (kind == "l").then(|| target.to_owned()),
            })
        })
        .collect();
    let truncated = entries.len() > MAX_ENTRIES;
    entries.truncate(MAX_ENTRIES);
    entries.sort_by(|a, b| {
        (a.kind != "dir")
            .cmp(&(b.kind != "dir"))
            .then(a.name.cmp(&b.name))
    });
    VolumeListing {
        path: path.to_owned(),
        entries,
        truncated,
    }
}

/// Lists one directory of a volume, read-only, in the guest.
pub async fn browse(
    docker: &Docker,
    vsock_sock: &Path,
    name: &str,
    rel: &str,
) -> Result<VolumeListing, DockerError> {
    check_name(name)?;
    let rel = check_rel(rel)?;
    let v = docker.inspect_volume(name).await?;
    if v.driver != "local" || !v.mountpoint.starts_with("/var/lib/docker/volumes/") {
        return Err(DockerError::Invalid(format!(
            "volume {name} uses the {} driver; only local volumes can be browsed",
            v.driver
        )));
    }
    let argv = vec![
        "sh".into(),
        "-c".into(),
        LISTER.into(),
        "berth-ls".into(),
        v.mountpoint,
        rel.clone(),
        (MAX_ENTRIES + 1).to_string(),
    ];
    let run = crate::shell::capture(vsock_sock, argv, 1 << 20);
    let out = tokio::time::timeout(LIST_TIMEOUT, run)
        .await
        .map_err(|_| DockerError::Api(format!("listing {name}/{rel} took too long")))?
        .map_err(|e| DockerError::Api(format!("cannot reach the guest agent: {e}")))?;
    let shown = if rel.is_empty() {
        name.to_owned()
    } else {
        format!("{name}/{rel}")
    };
    match out.code {
        0 => Ok(parse_listing(&rel, &out.stdout)),
        3 => Err(DockerError::NotFound(format!("{shown} does not exist"))),
        4 => Err(DockerError::Invalid(format!(
            "{shown} leads outside the volume (a symbolic link); not followed"
        ))),
        5 => Err(DockerError::Invalid(format!("{shown} is not a directory"))),
        c => Err(DockerError::Api(format!(
            "listing {shown} failed ({c}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_are_checked() {
        assert!(check_name("pgdata").is_ok());
        assert!(check_name("my_app.data-1").is_ok());
        assert!(check_name("a").is_err());
        assert!(check_name("../x").is_err());
        assert!(check_name("a/b").is_err());
        assert_eq!(check_rel("").unwrap(), "");
        assert_eq!(check_rel("/a//b/./c/").unwrap(), "a/b/c");
        assert!(check_rel("a/../../etc").is_err());
        assert!(check_rel("..").is_err());
        assert!(check_rel("a\0b").is_err());
    }

    #[test]
    fn listings_are_parsed_sorted_and_bounded() {
        let out = b"f\t12\t1700000000.5\t644\tz.txt\t\0d\t4096\t1700000001.0\t755\tsub\t\0l\t7\t1.0\t777\tlink\t../../etc\0";
        let l = parse_listing("x", out);
        let names: Vec<_> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["sub", "link", "z.txt"]);
        assert_eq!(l.entries[1].target.as_deref(), Some("../../etc"));
        assert_eq!(l.entries[2].size, 12.0);
        assert_eq!(l.entries[2].mode, "644");
        assert!(!l.truncated);
        let many: Vec<u8> = (0..MAX_ENTRIES + 1)
            .flat_map(|i| format!("f\t1\t1\t644\tf{i}\t\0").into_bytes())
            .collect();
        let l = parse_listing("", &many);
        assert!(l.truncated);
        assert_eq!(l.entries.len(), MAX_ENTRIES);
    }
}

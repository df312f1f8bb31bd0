//! The check that refuses to create a container whose bind mount names a
//! host path in no shared folder.
//!
//! dockerd makes a missing `-v` source itself: for a host path outside
//! every share that would be an empty directory in the VM, and the
//! container would silently run without the user's files. The agent's
//! Docker-port forwarder ([`crate::httpgate`]) holds back each `POST
//! /containers/create` from the host and asks [`BindCheck`]: it reads the
//! bind mounts (`HostConfig.Binds` and `HostConfig.Mounts` of type `bind`)
//! and refuses, with a message that says how to share the folder, any
//! absolute source that is in no share and does not exist in the guest.
//! Sources in a share, and paths that exist in the guest
//! (`/var/run/docker.sock`, `/etc/localtime`, …), pass as before. A request
//! the check cannot read is allowed: dockerd validates it itself; this is a
//! guide for users, not a security boundary. Every other request passes
//! without being held (an earlier dockerd authorization plugin cost every
//! API call two extra round trips).

use std::path::{Component, Path, PathBuf};

use berth_proto::share::ShareSpec;
use serde::Deserialize;

use crate::httpgate::{api_path, Gate};

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct CreateBody {
    #[serde(default)]
    host_config: Option<HostConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct HostConfig {
    #[serde(default)]
    binds: Option<Vec<String>>,
    #[serde(default)]
    mounts: Option<Vec<MountSpec>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MountSpec {
    #[serde(default, rename = "Type")]
    kind: String,
    #[serde(default)]
    source: String,
}

/// Whether `uri` is `/containers/create` (with or without an API version).
fn is_create(method: &str, uri: &str) -> bool {
    method == "POST" && api_path(uri) == "containers/create"
}

/// The absolute host paths a create request bind-mounts.
fn bind_sources(body: &[u8]) -> Vec<String> {
    let Ok(b) = serde_json::from_slice::<CreateBody>(body) else {
        return Vec::new();
    };
    let Some(hc) = b.host_config else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for bind in hc.binds.unwrap_or_default() {
        // `SRC:DST[:OPTS]`; a source without a leading slash is a volume.
        let src = bind.split(':').next().unwrap_or("");
        if src.starts_with('/') {
            out.push(src.to_owned());
        }
    }
    for m in hc.mounts.unwrap_or_default() {
        if m.kind == "bind" && m.source.starts_with('/') {
            out.push(m.source);
        }
    }
    out
}

/// `path` with `.` and `..` resolved lexically, as dockerd cleans it.
fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The config value that lists the current shares.
fn shares_value(shares: &[ShareSpec]) -> String {
    shares
        .iter()
        .map(|s| {
            if s.read_only {
                format!("{}:ro", s.path)
            } else {
                s.path.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `None` when the request may go on; otherwise the message for the user.
pub fn check(
    method: &str,
    uri: &str,
    body: &[u8],
    shares: &[ShareSpec],
    exists: impl Fn(&Path) -> bool,
) -> Option<String> {
    if !is_create(method, uri) {
        return None;
    }
    for src in bind_sources(body) {
        let p = clean(&src);
        if shares.iter().any(|s| p.starts_with(&s.path)) || exists(&p) {
            continue;
        }
        let list = shares_value(shares);
        let listed = if list.is_empty() {
            "none".to_owned()
        } else {
            list.replace(',', ", ")
        };
        let value = if list.is_empty() {
            p.display().to_string()
        } else {
            format!("{list},{}", p.display())
        };
        return Some(format!(
            "{} is not in a folder shared with the Berth VM, so the container would get an \
             empty directory made in the VM instead of your files. Shared folders: {listed}. \
             To share it, run: berth config set shares \"{value}\" and then berth restart",
            p.display()
        ));
    }
    None
}

/// The bind-mount check for one VM's shares.
#[derive(Debug)]
pub struct BindCheck {
    pub shares: Vec<ShareSpec>,
}

impl Gate for BindCheck {
    fn wants(&self, method: &str, uri: &str) -> bool {
        is_create(method, uri)
    }

    fn check(&self, method: &str, uri: &str, body: &[u8]) -> Option<String> {
        let msg = check(method, uri, body, &self.shares, |p| {
            p.symlink_metadata().is_ok()
        })?;
        tracing::info!("refused a container: {msg}");
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares() -> Vec<ShareSpec> {
        vec![
            ShareSpec {
                tag: "share0".into(),
                path: "/Users/me".into(),
                read_only: false,
            },
            ShareSpec {
                tag: "share1".into(),
                path: "/tmp".into(),
                read_only: true,
            },
        ]
    }

    fn create(host_config: serde_json::Value) -> Vec<u8> {
        serde_json::json!({ "Image": "x", "HostConfig": host_config })
            .to_string()
            .into_bytes()
    }

    fn guest_has(p: &Path) -> bool {
        p == Path::new("/var/run/docker.sock") || p == Path::new("/etc/localtime")
    }

    #[test]
    fn binds_in_a_share_or_in_the_guest_pass() {
        let b = create(serde_json::json!({
            "Binds": ["/Users/me/app:/app", "/tmp/x:/x:ro", "data:/data", "/var/run/docker.sock:/var/run/docker.sock"],
            "Mounts": [{"Type": "bind", "Source": "/Users/me/src", "Target": "/src"},
                       {"Type": "volume", "Source": "v", "Target": "/v"}]
        }));
        for uri in ["/v1.47/containers/create?name=a", "/containers/create"] {
            assert_eq!(check("POST", uri, &b, &shares(), guest_has), None);
        }
    }

    #[test]
    fn a_missing_path_in_no_share_is_refused_with_the_fix() {
        for hc in [
            serde_json::json!({ "Binds": ["/opt/project:/src"] }),
            serde_json::json!({ "Mounts": [{"Type": "bind", "Source": "/opt/project", "Target": "/src"}] }),
            // `..` does not lead out of a share unnoticed.
            serde_json::json!({ "Binds": ["/Users/me/../project/../../opt/project:/src"] }),
        ] {
            let msg = check(
                "POST",
                "/v1.47/containers/create",
                &create(hc),
                &shares(),
                guest_has,
            )
            .expect("refused");
            assert!(
                msg.contains("/opt/project is not in a folder shared with the Berth VM"),
                "{msg}"
            );
            assert!(
                msg.contains("berth config set shares \"/Users/me,/tmp:ro,/opt/project\""),
                "{msg}"
            );
            assert!(msg.contains("berth restart"), "{msg}");
        }
        // A prefix of a share's name is not in it.
        let b = create(serde_json::json!({ "Binds": ["/Users/meow:/x"] }));
        assert!(check("POST", "/containers/create", &b, &shares(), guest_has).is_some());
    }

    #[test]
    fn other_requests_and_unreadable_bodies_pass() {
        let b = create(serde_json::json!({ "Binds": ["/opt/project:/src"] }));
        for (method, uri, body) in [
            ("GET", "/v1.47/containers/json", b.as_slice()),
            ("POST", "/v1.47/containers/abc/start", b.as_slice()),
            ("POST", "/containers/create", b"not json".as_slice()),
            (
                "POST",
                "/containers/create",
                b"{\"HostConfig\":null}".as_slice(),
            ),
        ] {
            assert_eq!(
                check(method, uri, body, &shares(), guest_has),
                None,
                "{method} {uri}"
            );
        }
    }
}

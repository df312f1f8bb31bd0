//! A dockerd authorization plugin, `berth-shares`, that refuses to create
//! a container whose bind mount names a host path in no shared folder.
//!
//! dockerd makes a missing `-v` source itself: for a host path outside
//! every share that would be an empty directory in the VM, and the
//! container would silently run without the user's files. dockerd asks
//! this plugin before each API request (`authorization-plugins` in
//! daemon.json, socket under `/run/docker/plugins`); for `POST
//! /containers/create` the plugin reads the bind mounts (`HostConfig.Binds`
//! and `HostConfig.Mounts` of type `bind`) and refuses, with a message
//! that says how to share the folder, any absolute source that is in no
//! share and does not exist in the guest. Sources in a share, and paths
//! that exist in the guest (`/var/run/docker.sock`, `/etc/localtime`, …),
//! pass as before. A request the plugin cannot read is allowed: dockerd
//! validates it itself; this is a guide for users, not a security boundary.

use std::convert::Infallible;
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use berth_proto::share::ShareSpec;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The plugin's name, as daemon.json lists it.
pub const PLUGIN: &str = "berth-shares";
/// Where dockerd looks for it.
pub const SOCKET: &str = "/run/docker/plugins/berth-shares.sock";
/// The largest request accepted: dockerd forwards bodies up to 1 MiB,
/// base64-encoded.
const MAX_REQUEST: usize = 4 << 20;
/// Requests served at once (dockerd is the only client).
const MAX_CONNS: usize = 64;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AuthzRequest {
    #[serde(default)]
    request_method: String,
    #[serde(default, rename = "RequestUri", alias = "RequestURI")]
    request_uri: String,
    #[serde(default)]
    request_body: Option<String>,
}

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
    if method != "POST" {
        return false;
    }
    let path = uri.split('?').next().unwrap_or("");
    let rest = match path.strip_prefix("/v") {
        Some(r) => match r.split_once('/') {
            Some((v, rest)) if v.chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
            _ => return false,
        },
        None => path.strip_prefix('/').unwrap_or(path),
    };
    rest.trim_end_matches('/') == "containers/create"
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

/// The reply to one plugin call.
fn answer(path: &str, body: &[u8], shares: &[ShareSpec]) -> serde_json::Value {
    match path {
        "/Plugin.Activate" => serde_json::json!({ "Implements": ["authz"] }),
        "/AuthZPlugin.AuthZReq" => {
            let Ok(req) = serde_json::from_slice::<AuthzRequest>(body) else {
                return serde_json::json!({ "Allow": true });
            };
            let create = req
                .request_body
                .as_deref()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .unwrap_or_default();
            match check(
                &req.request_method,
                &req.request_uri,
                &create,
                shares,
                |p| p.symlink_metadata().is_ok(),
            ) {
                None => serde_json::json!({ "Allow": true }),
                Some(msg) => {
                    tracing::info!("refused a container: {msg}");
                    serde_json::json!({ "Allow": false, "Msg": msg })
                }
            }
        }
        // Responses are never changed.
        "/AuthZPlugin.AuthZRes" => serde_json::json!({ "Allow": true }),
        _ => serde_json::json!({ "Err": format!("{PLUGIN}: unknown call {path}") }),
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shares: std::sync::Arc<Vec<ShareSpec>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let reply = answer(&path, &body, &shares);
    let mut resp = Response::new(Full::new(Bytes::from(reply.to_string())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/vnd.docker.plugins.v1.2+json"),
    );
    Ok(resp)
}

/// Listens on [`SOCKET`] and serves the plugin; dockerd may be configured
/// with it once this returns `Ok`.
pub fn start(shares: Vec<ShareSpec>) -> std::io::Result<()> {
    let dir = Path::new(SOCKET).parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(SOCKET);
    let listener = std::os::unix::net::UnixListener::bind(SOCKET)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(serve(listener, std::sync::Arc::new(shares)));
    Ok(())
}

async fn serve(listener: tokio::net::UnixListener, shares: std::sync::Arc<Vec<ShareSpec>>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    let mut log = berth_limits::RateLimiter::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                if let Some(s) = log.hit() {
                    tracing::warn!("{PLUGIN}: accept failed: {e}{s}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shares = shares.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |r| handle(r, shares.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(permit);
        });
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

    #[test]
    fn the_plugin_protocol() {
        assert_eq!(
            answer("/Plugin.Activate", b"", &shares()),
            serde_json::json!({ "Implements": ["authz"] })
        );
        let body = base64::engine::general_purpose::STANDARD.encode(create(
            serde_json::json!({ "Binds": ["/nowhere/at/all:/x"] }),
        ));
        let req = serde_json::json!({
            "User": "", "RequestMethod": "POST",
            "RequestUri": "/v1.47/containers/create", "RequestBody": body,
        });
        let r = answer(
            "/AuthZPlugin.AuthZReq",
            req.to_string().as_bytes(),
            &shares(),
        );
        assert_eq!(r["Allow"], false);
        assert!(r["Msg"].as_str().unwrap().contains("/nowhere/at/all"));
        let ok = serde_json::json!({ "RequestMethod": "GET", "RequestUri": "/_ping" });
        assert_eq!(
            answer(
                "/AuthZPlugin.AuthZReq",
                ok.to_string().as_bytes(),
                &shares()
            )["Allow"],
            true
        );
        assert_eq!(
            answer("/AuthZPlugin.AuthZRes", b"{}", &shares())["Allow"],
            true
        );
        assert_eq!(
            answer("/AuthZPlugin.AuthZReq", b"garbage", &shares())["Allow"],
            true
        );
    }
}

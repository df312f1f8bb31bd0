//! The self-test mode (`berth.selftest=` on the kernel command line): proves
//! on a console alone, without vsock, that the engine really runs containers
//! and that its state persists on the data disk. Inert unless asked for.

use std::time::Duration;

use hyper::Method;
use serde_json::json;

use crate::cmdline::SelfTest;
use crate::console;
use crate::daemons::DOCKER_SOCKET;
use crate::docker_api::{self, ApiError};

pub const IMAGE: &str = "berth-selftest:latest";
/// Largest image tar the self-test reads into memory.
const MAX_TAR: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("image {IMAGE} is not present and no tar disk was given")]
    NoImage,
    #[error("cannot read the image tar: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("unexpected answer from dockerd: {0}")]
    Parse(String),
}

/// Runs the self-test, printing `berth-agent: selftest-*` lines.
pub async fn run(t: &SelfTest) -> Result<(), SelfTestError> {
    let s = DOCKER_SOCKET;
    let long = Duration::from_secs(120);
    let present =
        match docker_api::call_ok(s, Method::GET, &format!("/images/{IMAGE}/json"), None, long)
            .await
        {
            Ok(_) => true,
            Err(ApiError::Status(hyper::StatusCode::NOT_FOUND, _)) => false,
            Err(e) => return Err(e.into()),
        };
    console::milestone(
        "selftest-image",
        &[("present", if present { "true" } else { "false" })],
    );
    if !present {
        let dev = t.image_tar.as_ref().ok_or(SelfTestError::NoImage)?;
        let tar = read_tar(dev).map_err(SelfTestError::Read)?;
        let path = "/images/create?fromSrc=-&repo=berth-selftest&tag=latest";
        docker_api::call(s, Method::POST, path, "application/x-tar", tar.into(), long).await?;
        docker_api::call_ok(s, Method::GET, &format!("/images/{IMAGE}/json"), None, long).await?;
        console::milestone("selftest-imported", &[]);
    }
    let created = docker_api::call_ok(
        s,
        Method::POST,
        "/containers/create",
        Some(json!({
            "Image": IMAGE,
            "Cmd": ["/bin/sh", "-c", "echo berth-selftest-ok; uname -r"],
        })),
        long,
    )
    .await?;
    let id = serde_json::from_slice::<serde_json::Value>(&created)
        .ok()
        .and_then(|v| v["Id"].as_str().map(str::to_owned))
        .ok_or_else(|| SelfTestError::Parse(String::from_utf8_lossy(&created).into_owned()))?;
    docker_api::call_ok(
        s,
        Method::POST,
        &format!("/containers/{id}/start"),
        None,
        long,
    )
    .await?;
    let waited = docker_api::call_ok(
        s,
        Method::POST,
        &format!("/containers/{id}/wait"),
        None,
        long,
    )
    .await?;
    let code = serde_json::from_slice::<serde_json::Value>(&waited)
        .ok()
        .and_then(|v| v["StatusCode"].as_i64())
        .ok_or_else(|| SelfTestError::Parse(String::from_utf8_lossy(&waited).into_owned()))?;
    let logs = docker_api::call_ok(
        s,
        Method::GET,
        &format!("/containers/{id}/logs?stdout=1&stderr=1"),
        None,
        long,
    )
    .await?;
    for line in docker_api::demux_logs(&logs).lines() {
        console::write_line(&format!("berth-agent: selftest-output {line}"));
    }
    docker_api::call_ok(
        s,
        Method::DELETE,
        &format!("/containers/{id}?force=1"),
        None,
        long,
    )
    .await?;
    console::milestone("selftest-done", &[("exit_code", &code.to_string())]);
    Ok(())
}

fn read_tar(dev: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(dev)?
        .take(MAX_TAR)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

//! A small HTTP/1.1 client over unix-domain streams (hyper), for the host
//! agent's API and for requests to dockerd through the forwarded socket.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Errors of one request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("request failed: {0}")]
    Hyper(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Build(#[from] hyper::http::Error),
    #[error("answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Sends one request on `stream` and returns the status and body.
pub async fn request_on<S>(
    stream: S,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, Bytes), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "berth");
    let body = match body {
        Some(v) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    drop(sender);
    conn.abort();
    Ok((status, bytes))
}

/// One request to a unix socket, JSON in and out.
pub async fn request_json(
    sock: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, serde_json::Value), HttpError> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|source| HttpError::Connect {
            path: sock.display().to_string(),
            source,
        })?;
    let (status, bytes) = request_on(stream, method, path, body).await?;
    let v = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok((status, v))
}

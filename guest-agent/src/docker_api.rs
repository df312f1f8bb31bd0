//! A minimal Docker Engine API client over the local unix socket, for the
//! agent's own needs: readiness and the self-test.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// A Docker API call that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP error talking to dockerd: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request built by the agent: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("dockerd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("dockerd answered {0}: {1}")]
    Status(StatusCode, String),
}

/// One HTTP/1.1 connection to dockerd, kept alive across requests.
#[derive(Debug)]
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(socket: &str) -> Result<Connection, ApiError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| ApiError::Connect(socket.to_owned(), e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Connection { sender })
    }

    /// Sends one request and reads the whole answer; the connection can
    /// carry the next one afterwards.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        self.sender.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "docker")
            .header("Content-Type", content_type)
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// One request to dockerd on a new connection; returns status and the
/// whole body.
pub async fn call(
    socket: &str,
    method: Method,
    path: &str,
    content_type: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ApiError> {
    let fut = async {
        let mut conn = Connection::open(socket).await?;
        conn.send(method, path, content_type, body).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ApiError::Timeout(timeout))?
}

/// Like [`call`] with a JSON body, failing on any non-2xx status.
pub async fn call_ok(
    socket: &str,
    method: Method,
    path: &str,
    json: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let body = json.map(|j| Bytes::from(j.to_string())).unwrap_or_default();
    let (status, body) = call(socket, method, path, "application/json", body, timeout).await?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(ApiError::Status(
            status,
            String::from_utf8_lossy(&body).trim().to_owned(),
        ))
    }
}

/// `GET /_ping` answered `OK`.
pub async fn ping(socket: &str) -> bool {
    matches!(
        call(socket, Method::GET, "/_ping", "text/plain", Bytes::new(), Duration::from_secs(5)).await,
        Ok((StatusCode::OK, body)) if &body[..] == b"OK"
    )
}

/// Splits a non-TTY container log stream (8-byte headers: stream, 0, 0, 0,
/// big-endian length) into its payload text. Stops at a truncated frame.
pub fn demux_logs(mut raw: &[u8]) -> String {
    let mut out = Vec::new();
    while raw.len() >= 8 {
        let len = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
        let Some(payload) = raw.get(8..8 + len) else {
            break;
        };
        out.extend_from_slice(payload);
        raw = &raw[8 + len..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demux() {
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 3];
        raw.extend_from_slice(b"hi\n");
        raw.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        raw.extend_from_slice(b"err\n");
        assert_eq!(demux_logs(&raw), "hi\nerr\n");
        // Truncated frame and garbage lengths don't panic.
        assert_eq!(demux_logs(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, b'x']), "");
        assert_eq!(demux_logs(&[1, 2, 3]), "");
    }
}

//! Host side of the guest's vsock: Firecracker's `CONNECT <port>` handshake
//! on the driver's `vsock.sock`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Errors reaching a guest port.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("guest port {port} refused the connection ({reply:?})")]
    Refused { port: u32, reply: String },
    #[error("guest port {0} did not answer the handshake in time")]
    Timeout(u32),
    #[error("handshake with guest port {port} failed: {source}")]
    Io { port: u32, source: std::io::Error },
}

/// Opens a byte stream to `port` in the guest.
pub async fn connect(vsock_sock: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut s = UnixStream::connect(vsock_sock)
        .await
        .map_err(|source| VsockError::Connect {
            path: vsock_sock.display().to_string(),
            source,
        })?;
    let handshake = async {
        s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
        // Read the reply byte by byte: anything after the newline already
        // belongs to the guest's stream.
        let mut line = Vec::with_capacity(16);
        loop {
            let b = s.read_u8().await?;
            if b == b'\n' || line.len() > 64 {
                break;
            }
            line.push(b);
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&line).into_owned())
    };
    let reply = match tokio::time::timeout(Duration::from_secs(5), handshake).await {
        Err(_) => return Err(VsockError::Timeout(port)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(VsockError::Refused {
                port,
                reply: "connection closed".into(),
            })
        }
        Ok(Err(source)) => return Err(VsockError::Io { port, source }),
        Ok(Ok(r)) => r,
    };
    if reply.starts_with("OK ") {
        Ok(s)
    } else {
        Err(VsockError::Refused { port, reply })
    }
}

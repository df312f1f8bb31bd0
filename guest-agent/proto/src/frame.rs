//! Length-prefixed JSON framing.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes in a frame header: the body length as a big-endian `u32`.
pub const HEADER_LEN: usize = 4;

/// Largest body either side accepts. Control messages are small; anything
/// bigger is a bug or an attack and is refused before allocating.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame body of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("frame body is empty")]
    Empty,
    #[error("frame body is not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
}

/// Serializes `msg` into one frame (header + JSON body).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Validates a header and returns the body length it announces.
pub fn decode_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Parses a frame body.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Reads one frame. Returns [`FrameError::Closed`] on a clean EOF before
/// the header, so callers can tell a finished peer from a broken one.
#[cfg(feature = "tokio")]
pub async fn read_frame<T, R>(reader: &mut R) -> Result<T, FrameError>
where
    T: DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    let len = decode_len(header)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    decode_body(&body)
}

/// Writes one frame and flushes it.
#[cfg(feature = "tokio")]
pub async fn write_frame<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Serialize,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, Response};

    #[test]
    fn round_trip() {
        let frame = encode_frame(&Request::Ping { nonce: 7 }).unwrap();
        let len = decode_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        let back: Request = decode_body(&frame[4..]).unwrap();
        assert_eq!(back, Request::Ping { nonce: 7 });
    }

    #[test]
    fn rejects_oversized_and_empty_headers() {
        assert!(matches!(
            decode_len(u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            decode_len(((MAX_FRAME_LEN + 1) as u32).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(decode_len([0; 4]), Err(FrameError::Empty)));
    }

    #[test]
    fn rejects_garbage_bodies() {
        for body in [
            &b"{"[..],
            b"null",
            b"{\"type\":\"nope\"}",
            b"\xff\xfe",
            b"[1,2]",
        ] {
            assert!(decode_body::<Request>(body).is_err(), "{body:?}");
        }
    }

    #[tokio::test]
    async fn async_read_write() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write_frame(&mut a, &Response::Pong { nonce: 3 })
            .await
            .unwrap();
        drop(a);
        let got: Response = read_frame(&mut b).await.unwrap();
        assert_eq!(got, Response::Pong { nonce: 3 });
        assert!(matches!(
            read_frame::<Response, _>(&mut b).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn truncated_header_is_an_error_not_a_clean_close() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0, 0])
            .await
            .unwrap();
        drop(a);
        assert!(matches!(
            read_frame::<Response, _>(&mut b).await,
            Err(FrameError::Io(_))
        ));
    }
}

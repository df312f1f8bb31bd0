//! The byte stream of an `exec` session.
//!
//! After the agent answers [`crate::Request::Exec`] with [`crate::Response::Ok`],
//! the control connection stops carrying JSON and carries *exec frames* both
//! ways until the process has exited and its [`ExecFrame::Exit`] was sent:
//! one kind byte, a 4-byte big-endian payload length, the payload. Payloads
//! are at most [`MAX_EXEC_PAYLOAD`] bytes. Anything else is a protocol error
//! and closes the connection (the process is then killed).

/// Largest payload in one exec frame.
pub const MAX_EXEC_PAYLOAD: usize = 64 * 1024;

/// Bytes in an exec frame header: kind + length.
pub const EXEC_HEADER_LEN: usize = 5;

const STDIN: u8 = 0x01;
const STDIN_EOF: u8 = 0x02;
const RESIZE: u8 = 0x03;
const SIGNAL: u8 = 0x04;
const STDOUT: u8 = 0x11;
const STDERR: u8 = 0x12;
const EXIT: u8 = 0x13;

/// One message of an exec session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecFrame {
    /// host → guest: bytes for the process's stdin (or its terminal).
    Stdin(Vec<u8>),
    /// host → guest: no more stdin; the process's stdin is closed (with a
    /// terminal, an end-of-file character is written instead).
    StdinEof,
    /// host → guest: the host terminal changed size.
    Resize { rows: u16, cols: u16 },
    /// host → guest: deliver this signal number to the process group.
    Signal(i32),
    /// guest → host: output (the terminal's, when there is one).
    Stdout(Vec<u8>),
    /// guest → host: standard error (never with a terminal).
    Stderr(Vec<u8>),
    /// guest → host: the process ended; the exit code, or 128 + signal.
    /// Always the last frame the agent sends.
    Exit(i32),
}

/// Why an exec frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ExecFrameError {
    #[error("exec frame kind {0:#04x} is unknown")]
    UnknownKind(u8),
    #[error("exec frame payload of {0} bytes exceeds the {MAX_EXEC_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("exec frame kind {kind:#04x} has a {len}-byte payload, expected {expected}")]
    BadLength {
        kind: u8,
        len: usize,
        expected: usize,
    },
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
}

impl ExecFrame {
    /// Serializes the frame. Data longer than [`MAX_EXEC_PAYLOAD`] must be
    /// split by the caller; this returns `TooLarge` for it.
    pub fn encode(&self) -> Result<Vec<u8>, ExecFrameError> {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            ExecFrame::Stdin(d) => (STDIN, d.as_slice().into()),
            ExecFrame::StdinEof => (STDIN_EOF, (&[][..]).into()),
            ExecFrame::Resize { rows, cols } => {
                let mut p = rows.to_be_bytes().to_vec();
                p.extend_from_slice(&cols.to_be_bytes());
                (RESIZE, p.into())
            }
            ExecFrame::Signal(s) => (SIGNAL, s.to_be_bytes().to_vec().into()),
            ExecFrame::Stdout(d) => (STDOUT, d.as_slice().into()),
            ExecFrame::Stderr(d) => (STDERR, d.as_slice().into()),
            ExecFrame::Exit(c) => (EXIT, c.to_be_bytes().to_vec().into()),
        };
        if payload.len() > MAX_EXEC_PAYLOAD {
            return Err(ExecFrameError::TooLarge(payload.len()));
        }
        let mut out = Vec::with_capacity(EXEC_HEADER_LEN + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Validates a header; returns the kind and the payload length.
    pub fn decode_header(header: [u8; EXEC_HEADER_LEN]) -> Result<(u8, usize), ExecFrameError> {
        let kind = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_EXEC_PAYLOAD {
            return Err(ExecFrameError::TooLarge(len));
        }
        let fixed = match kind {
            STDIN | STDOUT | STDERR => None,
            STDIN_EOF => Some(0),
            RESIZE | SIGNAL | EXIT => Some(4),
            other => return Err(ExecFrameError::UnknownKind(other)),
        };
        if let Some(expected) = fixed {
            if len != expected {
                return Err(ExecFrameError::BadLength {
                    kind,
                    len,
                    expected,
                });
            }
        }
        Ok((kind, len))
    }

    /// Builds a frame from a header validated by [`Self::decode_header`].
    pub fn decode_payload(kind: u8, payload: Vec<u8>) -> Result<Self, ExecFrameError> {
        let word = |p: &[u8]| -> Result<[u8; 4], ExecFrameError> {
            p.try_into().map_err(|_| ExecFrameError::BadLength {
                kind,
                len: p.len(),
                expected: 4,
            })
        };
        Ok(match kind {
            STDIN => ExecFrame::Stdin(payload),
            STDIN_EOF => ExecFrame::StdinEof,
            RESIZE => {
                let w = word(&payload)?;
                ExecFrame::Resize {
                    rows: u16::from_be_bytes([w[0], w[1]]),
                    cols: u16::from_be_bytes([w[2], w[3]]),
                }
            }
            SIGNAL => ExecFrame::Signal(i32::from_be_bytes(word(&payload)?)),
            STDOUT => ExecFrame::Stdout(payload),
            STDERR => ExecFrame::Stderr(payload),
            EXIT => ExecFrame::Exit(i32::from_be_bytes(word(&payload)?)),
            other => return Err(ExecFrameError::UnknownKind(other)),
        })
    }
}

/// Reads one exec frame; [`ExecFrameError::Closed`] on a clean EOF before
/// the header.
#[cfg(feature = "tokio")]
pub async fn read_exec_frame<R>(reader: &mut R) -> Result<ExecFrame, ExecFrameError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; EXEC_HEADER_LEN];
    let mut got = 0;
    while got < EXEC_HEADER_LEN {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ExecFrameError::Closed
            } else {
                ExecFrameError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    let (kind, len) = ExecFrame::decode_header(header)?;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    ExecFrame::decode_payload(kind, payload)
}

/// Writes one exec frame and flushes it.
#[cfg(feature = "tokio")]
pub async fn write_exec_frame<W>(writer: &mut W, frame: &ExecFrame) -> Result<(), ExecFrameError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    writer.write_all(&frame.encode()?).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        for f in [
            ExecFrame::Stdin(b"ls\n".to_vec()),
            ExecFrame::StdinEof,
            ExecFrame::Resize {
                rows: 40,
                cols: 120,
            },
            ExecFrame::Signal(15),
            ExecFrame::Stdout(vec![0; MAX_EXEC_PAYLOAD]),
            ExecFrame::Stderr(Vec::new()),
            ExecFrame::Exit(-1),
        ] {
            let bytes = f.encode().unwrap();
            let (kind, len) = ExecFrame::decode_header(bytes[..5].try_into().unwrap()).unwrap();
            assert_eq!(len, bytes.len() - 5);
            assert_eq!(
                ExecFrame::decode_payload(kind, bytes[5..].to_vec()).unwrap(),
                f
            );
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(matches!(
            ExecFrame::decode_header([0x7f, 0, 0, 0, 0]),
            Err(ExecFrameError::UnknownKind(0x7f))
        ));
        assert!(matches!(
            ExecFrame::decode_header([STDOUT, 0xff, 0xff, 0xff, 0xff]),
            Err(ExecFrameError::TooLarge(_))
        ));
        assert!(matches!(
            ExecFrame::decode_header([EXIT, 0, 0, 0, 3]),
            Err(ExecFrameError::BadLength { .. })
        ));
        assert!(ExecFrame::Stdin(vec![0; MAX_EXEC_PAYLOAD + 1])
            .encode()
            .is_err());
    }

    #[tokio::test]
    async fn async_round_trip_and_clean_close() {
        let (mut a, mut b) = tokio::io::duplex(256);
        write_exec_frame(&mut a, &ExecFrame::Exit(3)).await.unwrap();
        drop(a);
        assert_eq!(read_exec_frame(&mut b).await.unwrap(), ExecFrame::Exit(3));
        assert!(matches!(
            read_exec_frame(&mut b).await,
            Err(ExecFrameError::Closed)
        ));
    }
}

//! The client→dockerd direction of a Docker API connection read as a
//! sequence of HTTP/1.1 requests, so that the agent can look at the few
//! requests it must check (a container create) before dockerd sees them,
//! at no cost to the others: their bytes are passed on as they arrive,
//! only the request heads are parsed to find where each request ends.
//!
//! Anything this reader does not understand (not HTTP, a head over
//! [`MAX_HEAD`], malformed framing) and everything after a connection
//! upgrade or hijack (`attach`, `exec` start, BuildKit's session) is passed
//! on byte for byte: dockerd judges it as before. The check is a guide for
//! users, not a security boundary, so it fails open.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest request head read (Go's HTTP server's own default).
const MAX_HEAD: usize = 1 << 20;
/// The largest body held back for a check; a larger one passes unchecked.
pub const MAX_HELD: usize = 4 << 20;
/// Headers parsed per request.
const MAX_HEADERS: usize = 128;
/// Bytes read from the client at a time.
const READ: usize = 64 << 10;

/// What decides which requests are held back and whether they may go on.
pub trait Gate {
    /// Whether the request's body must be seen before it is passed on.
    fn wants(&self, method: &str, path: &str) -> bool;
    /// `None` when the request may go on; otherwise the message for the
    /// user.
    fn check(&self, method: &str, path: &str, body: &[u8]) -> Option<String>;
}

/// How the client's side of a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client closed its side; everything it sent was passed on.
    Eof,
    /// A request was refused and not passed on; nothing after it was read.
    Refused(String),
}

/// The path of a Docker API request without its query and API version:
/// `/v1.47/containers/create?name=a` → `containers/create`.
pub fn api_path(uri: &str) -> &str {
    let path = uri.split('?').next().unwrap_or("");
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = match path.strip_prefix('v').and_then(|r| r.split_once('/')) {
        Some((v, rest)) if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.') => {
            rest
        }
        _ => path,
    };
    path.trim_end_matches('/')
}

/// Whether dockerd turns the connection into a raw stream after answering
/// this request, even when the client sent no `Upgrade` header.
fn hijacks(uri: &str) -> bool {
    let p = api_path(uri);
    p.ends_with("/attach")
        || p.ends_with("/attach/ws")
        || (p.starts_with("exec/") && p.ends_with("/start"))
        || p == "session"
        || p == "grpc"
}

/// How a request's body is delimited.
#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(Chunks),
}

/// What a request head says.
#[derive(Debug)]
struct Head {
    /// Bytes of the head, blank line included.
    len: usize,
    method: String,
    uri: String,
    body: Framing,
    /// The connection is a raw stream after this request.
    raw_after: bool,
    /// `Expect: 100-continue`: the body comes only after dockerd's go-ahead.
    expect: bool,
}

/// `Ok(None)`: the head is not complete yet; `Err`: not a request this
/// reader follows.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut upgrade = false;
    let mut expect = false;
    for h in req.headers.iter() {
        let v = std::str::from_utf8(h.value).map_err(|_| ())?.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = v.parse().map_err(|_| ())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // A request's last coding must be `chunked`, or its length is
            // unknowable (RFC 9112 §6.3).
            let last = v.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(());
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case("connection") {
            upgrade |= v
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("expect") {
            expect |= v.eq_ignore_ascii_case("100-continue");
        }
    }
    let uri = req.path.unwrap_or("").to_owned();
    Ok(Some(Head {
        len,
        method: req.method.unwrap_or("").to_owned(),
        raw_after: upgrade || hijacks(&uri),
        uri,
        body: if chunked {
            Framing::Chunked(Chunks::default())
        } else {
            Framing::Length(length.unwrap_or(0))
        },
        expect,
    }))
}

/// Where a chunked body is (RFC 9112 §7.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In a chunk-size line's hex digits.
    #[default]
    Size,
    /// In a chunk extension, up to the line's end.
    Ext,
    /// After the size line's CR.
    SizeLf,
    /// In a chunk's data, with this many bytes left.
    Data(u64),
    /// After a chunk's data: its CR.
    DataCr,
    /// After a chunk's data: its LF.
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    LineStart,
    /// In a trailer field, up to the line's end.
    Trailer,
    /// After the final blank line's CR.
    FinalLf,
    Done,
}

/// A streaming parser of a chunked body.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    size: u64,
    digits: u32,
}

impl Chunks {
    /// Consumes `data` up to the body's end: `(bytes consumed, ended)`;
    /// chunk data is appended to `sink` when given.
    fn feed(&mut self, data: &[u8], mut sink: Option<&mut Vec<u8>>) -> Result<(usize, bool), ()> {
        let mut i = 0;
        while i < data.len() {
            if let ChunkState::Data(left) = self.state {
                let n = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                if let Some(s) = sink.as_deref_mut() {
                    s.extend_from_slice(&data[i..i + n]);
                }
                i += n;
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (ChunkState::Size, b'\r') => ChunkState::SizeLf,
                (ChunkState::Size | ChunkState::Ext | ChunkState::SizeLf, b'\n') => {
                    self.size_line_end()?
                }
                (ChunkState::Size, b';' | b' ' | b'\t') => ChunkState::Ext,
                (ChunkState::Size, b) => {
                    let d = (b as char).to_digit(16).ok_or(())?;
                    // A chunk over 2^56 bytes is not a Docker API body.
                    if self.size >> 56 != 0 {
                        return Err(());
                    }
                    self.size = self.size * 16 + u64::from(d);
                    self.digits += 1;
                    ChunkState::Size
                }
                (ChunkState::Ext, b'\r') => ChunkState::SizeLf,
                (ChunkState::Ext, _) => ChunkState::Ext,
                (ChunkState::SizeLf, _) => return Err(()),
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataCr | ChunkState::DataLf, b'\n') => ChunkState::Size,
                (ChunkState::DataCr | ChunkState::DataLf, _) => return Err(()),
                (ChunkState::LineStart, b'\r') => ChunkState::FinalLf,
                (ChunkState::LineStart | ChunkState::FinalLf, b'\n') => ChunkState::Done,
                (ChunkState::Trailer, b'\n') => ChunkState::LineStart,
                (ChunkState::LineStart | ChunkState::Trailer, _) => ChunkState::Trailer,
                (ChunkState::FinalLf, _) => return Err(()),
                // `Data` is handled above and `Done` returns below.
                (ChunkState::Data(_) | ChunkState::Done, _) => return Err(()),
            };
            if self.state == ChunkState::Done {
                return Ok((i, true));
            }
        }
        Ok((i, self.state == ChunkState::Done))
    }

    fn size_line_end(&mut self) -> Result<ChunkState, ()> {
        if self.digits == 0 {
            return Err(());
        }
        let size = std::mem::take(&mut self.size);
        self.digits = 0;
        Ok(if size == 0 {
            ChunkState::LineStart
        } else {
            ChunkState::Data(size)
        })
    }
}

impl Framing {
    /// Like [`Chunks::feed`], for either framing.
    fn feed(&mut self, data: &[u8], sink: Option<&mut Vec<u8>>) -> Result<(usize, bool), ()> {
        match self {
            Framing::Length(left) => {
                let n = (data.len() as u64).min(*left) as usize;
                if let Some(s) = sink {
                    s.extend_from_slice(&data[..n]);
                }
                *left -= n as u64;
                Ok((n, *left == 0))
            }
            Framing::Chunked(c) => c.feed(data, sink),
        }
    }
}

/// Reads more of the client's bytes into `buf`; 0 at EOF.
async fn fill<R: AsyncRead + Unpin>(client: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ);
    client.read_buf(buf).await
}

/// Passes `buf` and then everything else the client sends on unread.
async fn raw<R, W>(client: &mut R, docker: &mut W, buf: BytesMut) -> std::io::Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    docker.write_all(&buf).await?;
    tokio::io::copy(client, docker).await?;
    Ok(End::Eof)
}

/// How passing a body on ended.
enum Step {
    Done,
    Eof,
    Malformed,
}

/// Passes one body on as it arrives, starting with what `buf` holds.
async fn stream_body<R, W>(
    client: &mut R,
    docker: &mut W,
    buf: &mut BytesMut,
    mut framing: Framing,
) -> std::io::Result<Step>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let Ok((n, done)) = framing.feed(buf, None) else {
            return Ok(Step::Malformed);
        };
        docker.write_all(&buf[..n]).await?;
        buf.advance(n);
        if done {
            return Ok(Step::Done);
        }
        if fill(client, buf).await? == 0 {
            return Ok(Step::Eof);
        }
    }
}

/// Passes the client's requests on to dockerd until the client closes its
/// side or `gate` refuses one. The caller shuts dockerd's side down after.
pub async fn pump<R, W, G>(client: &mut R, docker: &mut W, gate: &G) -> std::io::Result<End>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    G: Gate + ?Sized,
{
    let mut buf = BytesMut::with_capacity(READ);
    loop {
        let mut head = loop {
            match parse_head(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) if buf.len() <= MAX_HEAD => {}
                _ => return raw(client, docker, buf).await,
            }
            if fill(client, &mut buf).await? == 0 {
                // A partial head (or nothing) before EOF: dockerd answers it.
                docker.write_all(&buf).await?;
                return Ok(End::Eof);
            }
        };
        let body_left = if !head.expect && gate.wants(&head.method, &head.uri) {
            // Hold the whole request back until it can be judged.
            let mut body = Vec::new();
            let mut at = head.len;
            let held = loop {
                let Ok((n, done)) = head.body.feed(&buf[at..], Some(&mut body)) else {
                    return raw(client, docker, buf).await;
                };
                at += n;
                if done {
                    break true;
                }
                if at - head.len > MAX_HELD {
                    break false;
                }
                if fill(client, &mut buf).await? == 0 {
                    docker.write_all(&buf).await?;
                    return Ok(End::Eof);
                }
            };
            if held {
                if let Some(msg) = gate.check(&head.method, &head.uri, &body) {
                    return Ok(End::Refused(msg));
                }
            }
            docker.write_all(&buf[..at]).await?;
            buf.advance(at);
            !held
        } else {
            docker.write_all(&buf[..head.len]).await?;
            buf.advance(head.len);
            true
        };
        if body_left {
            match stream_body(client, docker, &mut buf, head.body).await? {
                Step::Done => {}
                Step::Eof => return Ok(End::Eof),
                Step::Malformed => return raw(client, docker, buf).await,
            }
        }
        if head.raw_after {
            return raw(client, docker, buf).await;
        }
    }
}

/// The HTTP answer to a refused request, as dockerd words its own errors
/// (the `docker` CLI prints `Error response from daemon: <message>`).
pub fn refusal(message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "message": message }).to_string();
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds back `POST …/containers/create` and refuses a body that says
    /// "refuse".
    struct Creates;

    impl Gate for Creates {
        fn wants(&self, method: &str, path: &str) -> bool {
            method == "POST" && api_path(path) == "containers/create"
        }
        fn check(&self, _: &str, _: &str, body: &[u8]) -> Option<String> {
            (body == b"refuse").then(|| "no".to_owned())
        }
    }

    fn req(method: &str, path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("{method} {path} HTTP/1.1\r\nHost: docker\r\n{extra}\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn sized(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
        req(
            method,
            path,
            &format!("Content-Length: {}\r\n", body.len()),
            body,
        )
    }

    fn chunked(method: &str, path: &str, parts: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for p in parts {
            body.extend_from_slice(format!("{:x};ext=1\r\n", p.len()).as_bytes());
            body.extend_from_slice(p);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
        req(method, path, "Transfer-Encoding: chunked\r\n", &body)
    }

    /// Sends `input` to the pump `step` bytes at a time; what reached
    /// dockerd and how the pump ended.
    async fn run(input: &[u8], step: usize) -> (Vec<u8>, End) {
        let (mut client, mut agent_in) = tokio::io::duplex(256 << 10);
        let (mut agent_out, mut docker) = tokio::io::duplex(256 << 10);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for part in input.chunks(step.max(1)) {
                if client.write_all(part).await.is_err() {
                    return;
                }
            }
            let _ = client.shutdown().await;
            // Keep the pipe open until the pump is done reading.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            docker.read_to_end(&mut got).await.unwrap();
            got
        });
        let end = pump(&mut agent_in, &mut agent_out, &Creates).await.unwrap();
        agent_out.shutdown().await.unwrap();
        drop(agent_out);
        drop(agent_in);
        let got = reader.await.unwrap();
        writer.await.unwrap();
        (got, end)
    }

    #[tokio::test]
    async fn keep_alive_requests_pass_byte_for_byte_until_a_refused_create() {
        let allowed = [
            req("HEAD", "/_ping", "", b""),
            sized("POST", "/v1.47/containers/create?name=a", b"fine"),
            // A chunked upload whose body looks like a refused create.
            chunked(
                "POST",
                "/v1.47/build",
                &[
                    b"POST /containers/create HTTP/1.1\r\n",
                    b"refuse",
                    &[0u8; 70_000],
                ],
            ),
            sized("POST", "/containers/create", b""),
            chunked("POST", "/containers/create", &[b"fi", b"ne"]),
            sized(
                "PUT",
                "/v1.47/containers/x/archive?path=/",
                &[b'r'; 100_000],
            ),
        ]
        .concat();
        for refused in [
            sized("POST", "/v1.47/containers/create", b"refuse"),
            chunked("POST", "/v1.47/containers/create", &[b"ref", b"use"]),
        ] {
            let after = sized("POST", "/containers/create", b"never read");
            let input = [allowed.clone(), refused, after].concat();
            for step in [1, 7, 4096, input.len()] {
                let (got, end) = run(&input, step).await;
                assert_eq!(end, End::Refused("no".into()), "step {step}");
                assert!(
                    got == allowed,
                    "step {step}: {} of {} bytes",
                    got.len(),
                    allowed.len()
                );
            }
        }
    }

    #[tokio::test]
    async fn after_a_hijack_or_anything_unreadable_bytes_pass_unread() {
        let refused = sized("POST", "/containers/create", b"refuse");
        for opener in [
            req(
                "POST",
                "/v1.47/containers/x/attach?stream=1",
                "Content-Length: 0\r\n",
                b"",
            ),
            req(
                "POST",
                "/v1.47/exec/x/start",
                "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 2\r\n",
                b"{}",
            ),
            req(
                "POST",
                "/v1.47/other",
                "Connection: keep-alive, Upgrade\r\n",
                b"",
            ),
            b"not http at all\r\n\r\n".to_vec(),
            req("POST", "/x", "Transfer-Encoding: gzip\r\n", b""),
            req(
                "POST",
                "/x",
                "Content-Length: 1\r\nContent-Length: 2\r\n",
                b"",
            ),
            chunked("POST", "/x", &[b"a"]).replace_chunk_size(),
            [b"GET /".as_slice(), &vec![b'a'; MAX_HEAD + 10]].concat(),
        ] {
            let input = [opener, refused.clone()].concat();
            let (got, end) = run(&input, 1000).await;
            assert_eq!(end, End::Eof);
            assert!(got == input, "{}", String::from_utf8_lossy(&input[..40]));
        }
        // Half a request, then EOF: passed on for dockerd to answer.
        let (got, end) = run(b"POST /containers/create HTTP/1.1\r\nContent-Len", 5).await;
        assert_eq!((got.len(), end), (45, End::Eof));
        let part = sized("POST", "/containers/create", b"refu");
        let (got, end) = run(&part[..part.len() - 1], 5).await;
        assert_eq!((got.len(), end), (part.len() - 1, End::Eof));
    }

    #[tokio::test]
    async fn an_expect_continue_or_oversized_create_passes_unchecked() {
        let expect = req(
            "POST",
            "/containers/create",
            "Expect: 100-continue\r\nContent-Length: 6\r\n",
            b"refuse",
        );
        let big = sized(
            "POST",
            "/containers/create",
            &vec![b'x'; MAX_HELD + 100_000],
        );
        let input = [expect, big, sized("GET", "/_ping", b"")].concat();
        let (got, end) = run(&input, 65_536).await;
        assert_eq!(end, End::Eof);
        assert!(got == input);
    }

    #[test]
    fn api_paths() {
        for (uri, want) in [
            ("/v1.47/containers/create?name=a", "containers/create"),
            ("/containers/create/", "containers/create"),
            ("/version", "version"),
            ("/v/containers/create", "v/containers/create"),
            ("/vx1/containers/create", "vx1/containers/create"),
        ] {
            assert_eq!(api_path(uri), want, "{uri}");
        }
        assert!(hijacks("/v1.47/containers/abc/attach?stream=1"));
        assert!(hijacks("/exec/abc/start"));
        assert!(hijacks("/session"));
        assert!(!hijacks("/v1.47/containers/abc/start"));
    }

    #[test]
    fn the_refusal_is_a_docker_error() {
        let r = String::from_utf8(refusal("a \"b\"")).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap()["message"],
            "a \"b\""
        );
    }

    trait Corrupt {
        fn replace_chunk_size(self) -> Vec<u8>;
    }

    impl Corrupt for Vec<u8> {
        /// A chunk-size line that is not hex.
        fn replace_chunk_size(self) -> Vec<u8> {
            let s = String::from_utf8(self).unwrap();
            s.replacen("1;ext=1", "zz", 1).into_bytes()
        }
    }
}

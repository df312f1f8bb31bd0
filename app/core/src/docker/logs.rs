//! A container's log as lines for the UI: stdout and stderr told apart,
//! Docker's timestamps split off, sent in batches.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use bollard::Docker;
use futures_util::StreamExt;
use serde::Serialize;
use ts_rs::TS;

use super::containers::check_id;
use super::DockerError;

/// Lines are sent at most this often, so a chatty container costs the UI
/// a few renders a second, not one per line.
pub const BATCH_EVERY: Duration = Duration::from_millis(100);
/// A batch never holds more lines than this.
pub const BATCH_LINES: usize = 5000;
/// A line longer than this is cut (the rest is dropped, and said so).
pub const LINE_MAX: usize = 16 << 10;

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct LogLine {
    /// `stdout`, `stderr` or `console` (a TTY container's one stream).
    pub stream: String,
    /// Docker's RFC 3339 timestamp.
    pub ts: String,
    pub text: String,
}

/// Splits Docker's `timestamps=true` prefix off a line.
pub fn split_ts(line: &str) -> (&str, &str) {
    match line.split_once(' ') {
        Some((ts, rest)) if ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.ends_with('Z') => {
            (ts, rest)
        }
        _ => ("", line),
    }
}

/// Turns a chunk of one stream into lines; a line Docker split across
/// chunks is joined (TTY output comes in arbitrary pieces).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: [Vec<u8>; 3],
}

fn stream_index(stream: &str) -> usize {
    match stream {
        "stdout" => 0,
        "stderr" => 1,
        _ => 2,
    }
}

impl LineSplitter {
    pub fn push(&mut self, stream: &str, bytes: &[u8], out: &mut Vec<LogLine>) {
        let buf = &mut self.partial[stream_index(stream)];
        for &b in bytes {
            if b == b'\n' {
                out.push(make_line(stream, buf));
                buf.clear();
            } else if buf.len() < LINE_MAX + 4 {
                buf.push(b);
            }
        }
    }

    /// What is left without a newline (the stream ended).
    pub fn finish(&mut self, out: &mut Vec<LogLine>) {
        for (i, stream) in ["stdout", "stderr", "console"].iter().enumerate() {
            if !self.partial[i].is_empty() {
                out.push(make_line(stream, &self.partial[i]));
                self.partial[i].clear();
            }
        }
    }
}

fn make_line(stream: &str, raw: &[u8]) -> LogLine {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = String::from_utf8_lossy(raw);
    let (ts, rest) = split_ts(&text);
    let mut text = rest.to_owned();
    if text.len() > LINE_MAX {
        let mut cut = LINE_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" … (line cut)");
    }
    LogLine {
        stream: stream.to_owned(),
        ts: ts.to_owned(),
        text,
    }
}

/// Streams the log of `id`: the last `tail` lines (all with `None`), then,
/// with `follow`, new lines as they come, until the container's log ends or
/// `on_batch` returns false.
pub async fn stream(
    docker: &Docker,
    id: &str,
    tail: Option<u32>,
    follow: bool,
    mut on_batch: impl FnMut(Vec<LogLine>) -> bool,
) -> Result<(), DockerError> {
    check_id(id)?;
    let tail = tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
    let opts = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .follow(follow)
        .tail(&tail)
        .build();
    let mut logs = Box::pin(docker.logs(id, Some(opts)));
    let mut split = LineSplitter::default();
    let mut batch = Vec::new();
    let mut due = tokio::time::Instant::now() + BATCH_EVERY;
    loop {
        let next = tokio::time::timeout_at(due, logs.next()).await;
        let ended = match next {
            Err(_) => false,
            Ok(None) => true,
            Ok(Some(Err(e))) => {
                split.finish(&mut batch);
                if !batch.is_empty() {
                    on_batch(std::mem::take(&mut batch));
                }
                return Err(e.into());
            }
            Ok(Some(Ok(out))) => {
                let (stream, bytes) = match &out {
                    LogOutput::StdOut { message } => ("stdout", message),
                    LogOutput::StdErr { message } => ("stderr", message),
                    LogOutput::Console { message } => ("console", message),
                    LogOutput::StdIn { message } => ("stdout", message),
                };
                split.push(stream, bytes, &mut batch);
                false
            }
        };
        if ended {
            split.finish(&mut batch);
        }
        let now = tokio::time::Instant::now();
        let due_now = now >= due || batch.len() >= BATCH_LINES || ended;
        if due_now && !batch.is_empty() && !on_batch(std::mem::take(&mut batch)) {
            return Ok(());
        }
        if now >= due {
            due = now + BATCH_EVERY;
        }
        if ended {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_are_joined_per_stream() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.push("stdout", b"2026-12-02T19:00:00.123456789Z hel", &mut out);
        s.push("stderr", b"2026-12-02T19:00:01.000000000Z oops\n", &mut out);
        s.push("stdout", b"lo\r\nsecond", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].stream, "stderr");
        assert_eq!(out[0].text, "oops");
        assert_eq!(out[1].text, "hello");
        assert_eq!(out[1].ts, "2026-12-02T19:00:00.123456789Z");
        s.finish(&mut out);
        assert_eq!(out[2].text, "second");
        assert_eq!(out[2].ts, "");
    }

    #[test]
    fn a_huge_line_is_cut_and_says_so() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        let big = vec![b'x'; LINE_MAX * 3];
        s.push("stdout", &big, &mut out);
        s.push("stdout", b"\n", &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].text.len() < LINE_MAX + 32);
        assert!(out[0].text.ends_with("(line cut)"));
    }

    #[test]
    fn text_without_a_timestamp_is_kept_whole() {
        assert_eq!(split_ts("plain words here"), ("", "plain words here"));
        assert_eq!(
            split_ts("2026-12-02T19:00:00Z x y"),
            ("2026-12-02T19:00:00Z", "x y")
        );
    }
}

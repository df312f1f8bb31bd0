//! Host folders shared into the guest (virtio-fs), as the host passes them
//! on the kernel command line: one `berth.share=TAG,rw|ro,PATH` word each,
//! the path percent-encoded so that any byte fits in one word. The agent
//! mounts tag `TAG` at `PATH`, the same absolute path as on the host.
//! See `docs/file-sharing.md`.

use std::fmt;

/// Guest vsock port for file events: a share's backend connects and sends
/// one [`FsEvent`] line per change it saw on the host; the agent raises the
/// matching inotify events in the guest.
pub const FS_EVENTS_PORT: u32 = 1032;
/// A line a backend sends on [`FS_EVENTS_PORT`] when the guest holds most
/// of the inodes it may hold on that share (each costs the backend a host
/// descriptor): the agent then has the guest kernel let go of the cached
/// names and inodes nothing uses, which sends the server their FORGETs.
pub const RECLAIM_LINE: &str = "reclaim";
/// The longest event line accepted (a path is at most `PATH_MAX`, 4096,
/// percent-encoded up to three times that).
pub const MAX_EVENT_LINE: usize = 3 * 4096 + 16;

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsEventKind {
    Create,
    Modify,
    Delete,
}

impl FsEventKind {
    pub fn word(self) -> &'static str {
        match self {
            FsEventKind::Create => "create",
            FsEventKind::Modify => "modify",
            FsEventKind::Delete => "delete",
        }
    }
}

/// A change on the host under a share: `KIND PATH\n` on the wire, the path
/// percent-encoded (it is the same path in the guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    pub kind: FsEventKind,
    pub path: String,
}

impl FsEvent {
    pub fn encode(&self) -> String {
        format!("{} {}\n", self.kind.word(), encode_path(&self.path))
    }

    /// Parses one line (without its newline); `None` if malformed.
    pub fn parse(line: &str) -> Option<FsEvent> {
        let (kind, path) = line.split_once(' ')?;
        let kind = match kind {
            "create" => FsEventKind::Create,
            "modify" => FsEventKind::Modify,
            "delete" => FsEventKind::Delete,
            _ => return None,
        };
        let path = decode_path(path)?;
        (path.starts_with('/') && !path.contains('\0') && !path.contains('\n'))
            .then_some(FsEvent { kind, path })
    }
}

/// Most shares one VM has (each is a device and a backend process).
pub const MAX_SHARES: usize = 8;
/// The longest share path accepted, so that the command line (2 KiB on
/// x86) holds every share.
pub const MAX_PATH: usize = 160;

/// One shared folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The virtio-fs tag the guest mounts it by.
    pub tag: String,
    /// The absolute path, identical on the host and in the guest.
    pub path: String,
    pub read_only: bool,
}

/// Why a share cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareError(pub String);

impl fmt::Display for ShareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShareError {}

/// Checks a share's path: absolute, normalised, not the root, not too long.
pub fn check_path(path: &str) -> Result<(), ShareError> {
    let bad = |why: &str| Err(ShareError(format!("share {path:?}: {why}")));
    if !path.starts_with('/') {
        return bad("must be an absolute path");
    }
    if path == "/" {
        return bad("the root directory cannot be shared");
    }
    if path.len() > MAX_PATH {
        return bad(&format!("longer than {MAX_PATH} bytes"));
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if path.ends_with('/')
        || path
            .split('/')
            .skip(1)
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("must be normalised (no empty, `.` or `..` components, no trailing /)");
    }
    Ok(())
}

fn keep(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+' | b'@')
}

/// Percent-encodes every byte but a few plain ones.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes [`encode_path`]; `None` for a malformed escape or non-UTF-8.
pub fn decode_path(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl ShareSpec {
    /// The share's kernel command line word.
    pub fn cmdline_word(&self) -> String {
        format!(
            "berth.share={},{},{}",
            self.tag,
            if self.read_only { "ro" } else { "rw" },
            encode_path(&self.path)
        )
    }

    /// Every well-formed `berth.share=` word, in order (at most
    /// [`MAX_SHARES`]); malformed ones are skipped.
    pub fn from_cmdline(cmdline: &str) -> Vec<ShareSpec> {
        cmdline
            .split_ascii_whitespace()
            .filter_map(|w| w.strip_prefix("berth.share="))
            .filter_map(|v| {
                let mut it = v.splitn(3, ',');
                let tag = it.next()?;
                let read_only = match it.next()? {
                    "ro" => true,
                    "rw" => false,
                    _ => return None,
                };
                let path = decode_path(it.next()?)?;
                let ok = !tag.is_empty()
                    && tag.len() <= 36
                    && tag
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                (ok && check_path(&path).is_ok()).then(|| ShareSpec {
                    tag: tag.to_owned(),
                    path,
                    read_only,
                })
            })
            .take(MAX_SHARES)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_any_path() {
        let shares = vec![
            ShareSpec {
                tag: "share0".into(),
                path: "/Users/Ada Lovelace/My, Code%/ü".into(),
                read_only: false,
            },
            ShareSpec {
                tag: "share1".into(),
                path: "/tmp".into(),
                read_only: true,
            },
        ];
        let line = format!(
            "console=ttyS0 {} {} quiet",
            shares[0].cmdline_word(),
            shares[1].cmdline_word()
        );
        assert_eq!(line.split_ascii_whitespace().count(), 4, "{line}");
        assert_eq!(ShareSpec::from_cmdline(&line), shares);
    }

    #[test]
    fn malformed_words_and_paths_are_skipped() {
        for w in [
            "berth.share=t,rw,relative",
            "berth.share=t,xx,/tmp",
            "berth.share=,rw,/tmp",
            "berth.share=t/x,rw,/tmp",
            "berth.share=t,rw,/a/../etc",
            "berth.share=t,rw,/",
            "berth.share=t,rw,/a%2",
            "berth.share=t,rw,/a%00b",
            "berth.share=t,rw",
        ] {
            assert!(ShareSpec::from_cmdline(w).is_empty(), "{w}");
        }
    }

    #[test]
    fn events_round_trip_and_malformed_lines_are_refused() {
        let e = FsEvent {
            kind: FsEventKind::Modify,
            path: "/Users/ada/my app/index.js".into(),
        };
        let line = e.encode();
        assert_eq!(line, "modify /Users/ada/my%20app/index.js\n");
        assert_eq!(FsEvent::parse(line.trim_end_matches('\n')), Some(e));
        for bad in [
            "",
            "modify",
            "touch /a",
            "create relative",
            "delete /a%0Ab",
            "create /a%00",
        ] {
            assert_eq!(FsEvent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_checked() {
        assert!(check_path("/home/ada").is_ok());
        for bad in ["home", "/", "/a/", "/a//b", "/a/./b", "/a/.."] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert!(check_path(&format!("/{}", "x".repeat(MAX_PATH))).is_err());
    }
}

//! Size-capped log files.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// An append-only log file that never grows past `max_bytes`: when a
/// write would take it past, the file is renamed to `<path>.1` (replacing
/// the previous one) and a new one is started. At most about twice
/// `max_bytes` is on disk.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    written: u64,
    rotations: u64,
}

impl RotatingLog {
    /// Opens `path` for appending (creating it), rotating at once if it is
    /// already at its cap.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<RotatingLog> {
        let file = open_append(path)?;
        let written = file.metadata()?.len();
        let mut log = RotatingLog {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            file,
            written,
            rotations: 0,
        };
        if log.written >= log.max_bytes {
            log.rotate()?;
        }
        Ok(log)
    }

    /// The name the previous file is kept under.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = open_append(&self.path)?;
        self.written = 0;
        self.rotations += 1;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Write for RotatingLog {
    /// Writes all of `buf` (splitting it across a rotation if needed).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let room = self.max_bytes.saturating_sub(self.written);
            if room == 0 {
                self.rotate()?;
                continue;
            }
            let n = rest.len().min(room.min(usize::MAX as u64) as usize);
            self.file.write_all(&rest[..n])?;
            self.written += n as u64;
            rest = &rest[n..];
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Copies everything `from` yields into `log` until EOF or a read error.
/// Write errors (a full disk) drop the data rather than stall the writer
/// on the other end of `from`.
pub fn drain_to_log(mut from: impl Read, log: &mut RotatingLog) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let _ = log.write_all(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_grows_past_its_cap_and_keeps_one_old_file() {
        let dir = std::env::temp_dir().join(format!("berth-rotlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.log");
        std::fs::write(&path, vec![b'o'; 100]).unwrap();
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        let line = [b'x'; 99];
        for _ in 0..100 {
            log.write_all(&line).unwrap();
            log.write_all(b"\n").unwrap();
        }
        let cur = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(RotatingLog::rotated_path(&path))
            .unwrap()
            .len();
        assert!(cur <= 1000 && old == 1000, "{cur} {old}");
        assert_eq!(log.rotations(), 10);
        // 100 + 100 × 100 bytes written in all: what is kept is the end.
        assert_eq!((100 + 100 * 100 - cur) % 1000, 0);
        drop(log);
        // Reopened at its cap: rotates at once.
        std::fs::write(&path, vec![b'z'; 1000]).unwrap();
        let log = RotatingLog::open(&path, 1000).unwrap();
        assert_eq!(log.rotations(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn drains_a_pipe_until_eof() {
        let dir = std::env::temp_dir().join(format!("berth-drain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.log");
        let mut log = RotatingLog::open(&path, 64).unwrap();
        drain_to_log(&[b'a'; 200][..], &mut log);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 200 - 3 * 64);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The data disk: a second virtio-blk device holding Docker's state.
//!
//! Blank (all zeros at the start, as a fresh sparse file is) and marked
//! fresh by the host (`berth.data_fresh=1`: the host just created it) →
//! formatted ext4. ext4 → `e2fsck -p`, then mounted, with
//! `errors=remount-ro`. Anything else — a foreign filesystem, an ext4
//! that e2fsck cannot repair, or a blank disk the host did not just
//! create (a used disk that lost its superblock reads as blank) — is left
//! untouched and dockerd is not started.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use berth_proto::DataDiskState;
use nix::mount::{mount, MsFlags};

use crate::console;
use crate::process::{self, ProcessError};
use crate::reaper::{Exit, Reaper};

/// Where the data disk is mounted; Docker's directories are bound from it.
pub const MOUNT_POINT: &str = "/var/lib/berth";

/// Directories on the data disk and where each is bound.
pub const BINDS: &[(&str, &str)] = &[
    ("docker", "/var/lib/docker"),
    ("containerd", "/var/lib/containerd"),
    ("etc-docker", "/etc/docker"),
];

/// ext4 options of the data disk. `discard`: blocks freed by deleting
/// files (images, containers, volumes) are discarded at once, so the
/// host's `data.img` shrinks within seconds (both drivers punch holes for
/// a discard). Measured here against a periodic `fstrim`: deleting a 1 GiB
/// file or an image of 5,000 files costs the same with and without it
/// (docs/benchmarks.md), and nothing has to run on a timer.
pub const MOUNT_OPTIONS: &str = "noinit_itable,errors=remount-ro,discard";

/// Trims the data disk once: what was freed while it was mounted without
/// `discard` (by an older Berth) goes back to the host too.
pub async fn trim_once(reaper: &Reaper) {
    match crate::process::run(reaper, "/sbin/fstrim", &[MOUNT_POINT]).await {
        Ok(o) if o.exit == Exit::Code(0) => {}
        Ok(o) => tracing::warn!("fstrim {MOUNT_POINT}: {:?} {}", o.exit, o.text.trim()),
        Err(e) => tracing::warn!("fstrim {MOUNT_POINT}: {e}"),
    }
}

/// Bytes inspected to classify a disk.
const PROBE_LEN: usize = 64 * 1024;
/// ext2/3/4 superblock magic at byte 1080.
const EXT_MAGIC_OFFSET: usize = 1024 + 56;

/// What the first bytes of a disk say it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Blank,
    Ext4,
    Unknown,
}

/// Classifies a disk from its first bytes.
pub fn classify(head: &[u8]) -> Content {
    if head.iter().all(|&b| b == 0) {
        return Content::Blank;
    }
    match head.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2) {
        Some([0x53, 0xef]) => Content::Ext4,
        _ => Content::Unknown,
    }
}

/// Why the data disk was not mounted.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} holds data that is not an ext4 filesystem; refusing to format it")]
    Foreign(PathBuf),
    #[error("{0} has no filesystem signature, but it is not a new disk: its first blocks (the ext4 superblock) may have been lost. Nothing was changed. With Berth stopped, check it on the host with `e2fsck -n data.img` and repair it from a backup superblock with `e2fsck -b 32768 -B 4096 data.img`; or, to start over with an empty disk, delete data.img (this deletes every image, container and volume)")]
    NotFresh(PathBuf),
    #[error("formatting {0} failed ({1}): {2}")]
    Format(PathBuf, Exit, String),
    #[error("{0} has filesystem errors e2fsck could not repair ({1}); left untouched: {2}")]
    Unrepairable(PathBuf, Exit, String),
    #[error("mounting {0} on {1} failed: {2}")]
    Mount(PathBuf, String, nix::Error),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// What `e2fsck -p` exit codes mean for us.
#[derive(Debug, PartialEq, Eq)]
pub enum FsckVerdict {
    Clean,
    Repaired,
    Refuse,
}

/// e2fsck exit codes: 0 clean, 1 repaired, 2 repaired (reboot advised: only
/// matters for a mounted root), 4+ uncorrected, operational error, or more.
pub fn fsck_verdict(exit: Exit) -> FsckVerdict {
    match exit {
        Exit::Code(0) => FsckVerdict::Clean,
        Exit::Code(1) | Exit::Code(2) => FsckVerdict::Repaired,
        _ => FsckVerdict::Refuse,
    }
}

/// Reads the first [`PROBE_LEN`] bytes (less if the disk is smaller).
fn read_head(dev: &Path) -> Result<Vec<u8>, DiskError> {
    let mut f = fs::File::open(dev).map_err(|e| DiskError::Read(dev.to_owned(), e))?;
    let mut buf = vec![0u8; PROBE_LEN];
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DiskError::Read(dev.to_owned(), e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Formats, checks and mounts the data disk. Returns the state to report.
pub async fn prepare(reaper: &Reaper, dev: &Path, fresh: bool) -> Result<DataDiskState, DiskError> {
    if !dev.exists() {
        tracing::warn!(
            "no data disk at {}: Docker's state lives in memory and is lost at power off",
            dev.display()
        );
        mount_binds_on_tmpfs()?;
        return Ok(DataDiskState::Missing);
    }
    let devs = dev.to_string_lossy().into_owned();
    let head = read_head(dev)?;
    let state = match classify(&head) {
        Content::Unknown => return Err(DiskError::Foreign(dev.to_owned())),
        Content::Blank if !fresh => return Err(DiskError::NotFresh(dev.to_owned())),
        Content::Blank => {
            tracing::info!("data disk {devs} is blank: formatting it as ext4");
            // The disk is known to be zero (a fresh sparse file), so inode
            // tables and journal need no zeroing: that would only make the
            // host file grow.
            let out = process::run(
                reaper,
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-L",
                    "berth-data",
                    "-m",
                    "0",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    &devs,
                ],
            )
            .await?;
            if !out.exit.success() {
                return Err(DiskError::Format(dev.to_owned(), out.exit, out.text));
            }
            DataDiskState::Formatted
        }
        Content::Ext4 => {
            let out = process::run(reaper, "e2fsck", &["-p", &devs]).await?;
            match fsck_verdict(out.exit) {
                FsckVerdict::Clean => {}
                FsckVerdict::Repaired => {
                    tracing::warn!("e2fsck repaired {devs}: {}", out.text.trim())
                }
                FsckVerdict::Refuse => {
                    return Err(DiskError::Unrepairable(
                        dev.to_owned(),
                        out.exit,
                        out.text.trim().to_owned(),
                    ))
                }
            }
            grow_offline(reaper, dev, &head).await;
            DataDiskState::Mounted
        }
    };
    mount(
        Some(dev),
        MOUNT_POINT,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        // An I/O error makes the filesystem read-only rather than carry on
        // writing over what may be inconsistent.
        Some(MOUNT_OPTIONS),
    )
    .map_err(|e| DiskError::Mount(dev.to_owned(), MOUNT_POINT.into(), e))?;
    bind_dirs(Path::new(MOUNT_POINT))?;
    Ok(state)
}

/// The host grows data.img when `disk_gib` grows; ext4 follows, before it
/// is mounted. Offline, not online: an online resize writes the mounted
/// superblock (journal marked in use) into every backup superblock, and a
/// later recovery from a backup (`e2fsck -b`) then replays a stale
/// journal. A failure leaves the filesystem as it was, so it is only
/// logged.
async fn grow_offline(reaper: &Reaper, dev: &Path, head: &[u8]) {
    let devs = dev.to_string_lossy().into_owned();
    let (Some(fs), Ok(disk)) = (fs_bytes(head), device_bytes(dev)) else {
        return;
    };
    if disk <= fs + (1 << 20) {
        return;
    }
    tracing::info!(
        "{devs} grew from {} to {} MiB: resizing ext4",
        fs >> 20,
        disk >> 20
    );
    // resize2fs wants a freshly checked filesystem.
    for (program, args) in [
        ("e2fsck", &["-f", "-p", devs.as_str()][..]),
        ("resize2fs", &[devs.as_str()][..]),
    ] {
        match process::run(reaper, program, args).await {
            Ok(out)
                if out.exit == Exit::Code(0)
                    || (program == "e2fsck" && out.exit == Exit::Code(1)) => {}
            Ok(out) => {
                tracing::warn!(
                    "{program} {devs} failed ({}): {}",
                    out.exit,
                    out.text.trim()
                );
                return;
            }
            Err(e) => {
                tracing::warn!("{program} {devs} could not run: {e}");
                return;
            }
        }
    }
    console::milestone("data-disk-resized", &[("mib", &(disk >> 20).to_string())]);
}

/// The filesystem's size in bytes, from the ext4 superblock in `head`.
pub fn fs_bytes(head: &[u8]) -> Option<u64> {
    let sb = head.get(1024..1024 + 0x154)?;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    let log = u32_at(24);
    if log > 6 {
        return None;
    }
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let hi = if incompat_64bit {
        u32_at(0x150) as u64
    } else {
        0
    };
    let blocks = (hi << 32) | u32_at(4) as u64;
    blocks.checked_mul(1024u64 << log)
}

/// A block device's (or file's) size in bytes.
fn device_bytes(dev: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    fs::File::open(dev)?.seek(std::io::SeekFrom::End(0))
}

/// Without a data disk, Docker still runs, on a tmpfs.
fn mount_binds_on_tmpfs() -> Result<(), DiskError> {
    mount(
        Some("berth-data"),
        MOUNT_POINT,
        Some("tmpfs"),
        MsFlags::MS_NOATIME,
        Some("mode=0755"),
    )
    .map_err(|e| DiskError::Mount("tmpfs".into(), MOUNT_POINT.into(), e))?;
    bind_dirs(Path::new(MOUNT_POINT))
}

fn bind_dirs(base: &Path) -> Result<(), DiskError> {
    for (sub, target) in BINDS {
        let src = base.join(sub);
        fs::create_dir_all(&src).map_err(|e| DiskError::Read(src.clone(), e))?;
        mount(
            Some(&src),
            *target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| DiskError::Mount(src.clone(), (*target).into(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_blank_ext4_and_foreign() {
        assert_eq!(classify(&[0u8; 4096]), Content::Blank);
        assert_eq!(classify(&[]), Content::Blank);
        let mut ext = vec![0u8; 4096];
        ext[1080] = 0x53;
        ext[1081] = 0xef;
        ext[2000] = 7;
        assert_eq!(classify(&ext), Content::Ext4);
        let mut other = vec![0u8; 4096];
        other[0] = 0xeb; // a FAT boot sector, say
        assert_eq!(classify(&other), Content::Unknown);
        // Too short to hold a superblock but not blank.
        assert_eq!(classify(&[1, 2, 3]), Content::Unknown);
    }

    #[test]
    fn fsck_codes() {
        assert_eq!(fsck_verdict(Exit::Code(0)), FsckVerdict::Clean);
        assert_eq!(fsck_verdict(Exit::Code(1)), FsckVerdict::Repaired);
        assert_eq!(fsck_verdict(Exit::Code(2)), FsckVerdict::Repaired);
        assert_eq!(fsck_verdict(Exit::Code(4)), FsckVerdict::Refuse);
        assert_eq!(fsck_verdict(Exit::Code(8)), FsckVerdict::Refuse);
        assert_eq!(fsck_verdict(Exit::Signal(9)), FsckVerdict::Refuse);
    }

    #[test]
    fn classifies_a_real_mkfs_image() {
        // mkfs.ext4 is present wherever the guest image is built.
        let Ok(dir) = std::env::temp_dir().canonicalize() else {
            return;
        };
        let img = dir.join(format!("berth-classify-{}.img", std::process::id()));
        fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        assert_eq!(classify(&read_head(&img).unwrap()), Content::Blank);
        let status = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status();
        match status {
            Ok(s) if s.success() => {
                let head = read_head(&img).unwrap();
                assert_eq!(classify(&head), Content::Ext4);
                assert_eq!(fs_bytes(&head), Some(8 << 20));
            }
            _ => eprintln!(
                "SKIPPED part of classifies_a_real_mkfs_image: mkfs.ext4 not runnable here"
            ),
        }
        let _ = fs::remove_file(img);
    }
}

//! Host folders (virtio-fs) mounted at the same absolute path as on the
//! host, before dockerd starts, so a bind mount of any path under a share
//! works unchanged. Each share mount is a shared mount (as every mount is
//! on a systemd host), so `-v /path:/path:rshared` works.
//!
//! The root file system is read-only: a mount point that does not exist is
//! made on a tmpfs laid over its nearest existing ancestor, if that
//! ancestor is an empty directory (the image provides `/Users`, `/Volumes`,
//! `/private`, `/var/folders`, `/home`, `/mnt`, `/media` and `/srv` empty
//! for that); a directory with content is never hidden. Once the shares
//! are mounted those tmpfs are made read-only, like the root.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use berth_proto::share::ShareSpec;
use nix::mount::{mount, MsFlags};

/// Mounts every share, shortest path first (so nested shares land on
/// their parents); returns how many are mounted. A share that cannot be
/// mounted is logged and skipped: dockerd still starts.
pub fn mount_all(shares: &[ShareSpec]) -> usize {
    let mut sorted: Vec<&ShareSpec> = shares.iter().collect();
    sorted.sort_by_key(|s| s.path.len());
    let mut mounted = 0;
    let mut laid = Vec::new();
    for s in sorted {
        match mount_one(s, &mut laid) {
            Ok(()) => {
                mounted += 1;
                tracing::info!(
                    "shared host folder {} mounted ({})",
                    s.path,
                    if s.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                );
            }
            Err(e) => tracing::error!("cannot mount the shared folder {}: {e:#}", s.path),
        }
    }
    // The tmpfs laid for mount points become read-only, like the root
    // around them: dockerd then fails to create a bind-mount source that
    // is in no share ("read-only file system") instead of silently making
    // an empty directory in the guest.
    for dir in laid {
        let flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if let Err(e) = mount(
            Some("berth-shares"),
            &dir,
            Some("tmpfs"),
            flags,
            Some("mode=0755"),
        ) {
            tracing::warn!("cannot make {} read-only: {e}", dir.display());
        }
    }
    mounted
}

fn mount_one(s: &ShareSpec, laid: &mut Vec<PathBuf>) -> Result<()> {
    let path = Path::new(&s.path);
    ensure_mountpoint(path, laid)?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if s.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some(s.tag.as_str()),
        path,
        Some("virtiofs"),
        flags,
        None::<&str>,
    )
    .with_context(|| format!("mount -t virtiofs {} {}", s.tag, s.path))?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("making {} a shared mount", s.path))?;
    Ok(())
}

/// Makes `path` an existing directory, laying a tmpfs over an empty
/// read-only ancestor where it must.
fn ensure_mountpoint(path: &Path, laid: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    match fs::create_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc_erofs()) => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    let ancestor = nearest_existing(path);
    if ancestor == Path::new("/") {
        bail!(
            "{} does not exist in the guest and / is read-only; share a folder under /Users, /home, /Volumes, /private, /mnt, /media or /srv",
            path.display()
        );
    }
    let empty = fs::read_dir(&ancestor)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if !empty {
        bail!(
            "{} does not exist in the guest, and its parent {} is read-only and not empty",
            path.display(),
            ancestor.display()
        );
    }
    mount(
        Some("berth-shares"),
        &ancestor,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .with_context(|| format!("laying a tmpfs over {}", ancestor.display()))?;
    laid.push(ancestor);
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn libc_erofs() -> i32 {
    nix::errno::Errno::EROFS as i32
}

/// The deepest existing ancestor of `path`.
fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_existing_ancestor() {
        let tmp = std::env::temp_dir();
        assert_eq!(nearest_existing(&tmp.join("no/such/dir")), tmp);
        assert_eq!(
            nearest_existing(Path::new("/no-such-top/x")),
            Path::new("/")
        );
    }
}

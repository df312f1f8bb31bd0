//! Where a disk's bytes live: a raw image file in production, anything
//! with the same operations in tests.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};

use super::{BlockError, SECTOR_SIZE};

/// The operations virtio-blk needs from its backing store. Offsets and
/// lengths are in bytes and already checked against [`Storage::size`].
pub trait Storage: Send + 'static {
    /// Size in bytes, fixed for the device's life.
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a range; it reads back as zeroes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range, keeping it allocated.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// A raw disk image file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    len: u64,
}

impl FileStorage {
    /// Opens and locks the image (see [`lock_image`]).
    pub fn open(path: &Path, read_only: bool) -> Result<FileStorage, BlockError> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(shown.clone(), e))?;
        if let Err(e) = lock_image(&file, read_only) {
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => BlockError::InUse(shown),
                _ => BlockError::Open(shown, e),
            });
        }
        let len = file
            .metadata()
            .map_err(|e| BlockError::Open(shown.clone(), e))?
            .len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size(shown, len));
        }
        Ok(FileStorage { file, len })
    }
}

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }
}

impl FileStorage {
    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        let to_i64 =
            |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        fallocate(&self.file, mode, to_i64(offset)?, to_i64(len)?).map_err(io::Error::from)
    }
}

/// Locks the whole image with an open-file-description lock: exclusive for
/// a writable disk, shared for a read-only one. QEMU takes the same kind of
/// locks, so neither a second berth-vmm nor a QEMU can open a data disk that
/// a running VM writes. The lock goes away with the file, however the
/// process ends.
fn lock_image(file: &File, read_only: bool) -> Result<(), io::Error> {
    use nix::fcntl::{fcntl, FcntlArg};
    let lock = libc::flock {
        l_type: if read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_SETLK(&lock))
        .map(|_| ())
        .map_err(io::Error::from)
}

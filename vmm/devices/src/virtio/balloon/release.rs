//! Giving a range of guest memory back to the host.
//!
//! On Linux: memory shared with vhost-user backends lives in a file (a
//! memfd), and punching a hole in the file frees it for every process that
//! maps it; private anonymous memory is dropped with
//! `madvise(MADV_DONTNEED)`. Either way the range reads as zero the next
//! time the guest touches it, which is what a guest that reported the pages
//! free expects. What the macOS and Windows backends must do instead is in
//! `docs/vmm.md`.

use std::os::fd::AsFd;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// The page size free ranges are counted in.
pub const PAGE: u64 = 4096;

/// Releases guest memory the guest no longer uses.
pub trait Releaser: Send {
    /// Releases `len` bytes at `addr`: a range [`super::range_ok`] accepted.
    fn release(&self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> std::io::Result<()>;
}

/// The host's own way (Linux).
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRelease;

impl Releaser for HostRelease {
    fn release(&self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> std::io::Result<()> {
        let bad = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        let (region, at) = mem.to_region_addr(addr).ok_or_else(bad)?;
        if at.0.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(bad());
        }
        if let Some(f) = region.file_offset() {
            let offset = f.start().checked_add(at.0).ok_or_else(bad)?;
            let off = i64::try_from(offset).map_err(|_| bad())?;
            let n = i64::try_from(len).map_err(|_| bad())?;
            nix::fcntl::fallocate(
                f.file().as_fd(),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )?;
            return Ok(());
        }
        let host = mem.get_host_address(addr).map_err(|_| bad())?;
        let n = usize::try_from(len).map_err(|_| bad())?;
        // SAFETY: `host..host + n` lies inside one region of guest memory
        // (checked above), a private anonymous mapping this process made and
        // keeps for the VM's life. MADV_DONTNEED leaves the mapping in place
        // and only drops its pages (they read as zero afterwards); guest
        // memory is only ever accessed through vm-memory's volatile
        // accessors, never through Rust references, so none is invalidated.
        let rc = unsafe { libc::madvise(host.cast(), n, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

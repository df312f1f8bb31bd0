//! Pseudo-terminals for `exec` sessions with a terminal.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use berth_proto::TermSize;
use nix::fcntl::OFlag;
use nix::libc;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);
nix::ioctl_write_int_bad!(tiocsctty, libc::TIOCSCTTY);

/// What a terminal sends for end-of-file (`VEOF`, ^D, in its default
/// settings). It only ends input at the start of a line.
pub const EOF_CHAR: u8 = 0x04;

/// A new pseudo-terminal pair.
#[derive(Debug)]
pub struct Pty {
    /// Non-blocking, close-on-exec: the agent's side.
    pub master: OwnedFd,
    /// The process's terminal; close-on-exec, so only the stdio copies
    /// made for the child survive its exec.
    pub slave: File,
}

/// Opens a pseudo-terminal of `size`. Both ends are opened close-on-exec
/// from the start, so children spawned meanwhile by other tasks (daemon
/// restarts) never inherit them.
pub fn open(size: TermSize) -> std::io::Result<Pty> {
    let master =
        posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    // std opens with O_CLOEXEC.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(name)?;
    let master = OwnedFd::from(master);
    set_size(master.as_fd(), size)?;
    Ok(Pty { master, slave })
}

/// Sets the terminal's window size (the kernel sends SIGWINCH to its
/// foreground process group).
pub fn set_size(fd: BorrowedFd<'_>, size: TermSize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is open for the duration of the borrow and `ws` is a
    // live winsize the kernel only reads.
    unsafe { tiocswinsz(fd.as_raw_fd(), &ws) }?;
    Ok(())
}

/// In the child between fork and exec: makes stdin, the terminal's slave,
/// the controlling terminal of the session the child just created.
/// Async-signal-safe: one ioctl, no allocation.
pub fn make_controlling_terminal() -> std::io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument, no pointer; fd 0 is the
    // slave, set up by Command before pre_exec hooks run.
    unsafe { tiocsctty(0, 0) }?;
    Ok(())
}

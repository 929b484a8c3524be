//! Signalling an eventfd from ordinary (non-ring) code.

use std::io;
use std::os::fd::RawFd;

/// Add 1 to an eventfd's counter, waking whoever waits on it.
pub(crate) fn signal_eventfd(fd: RawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: an 8-byte write from a valid u64; a bad fd is reported as an error.
    let r = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    if r == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

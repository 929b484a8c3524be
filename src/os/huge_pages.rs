//! Declining transparent huge pages for the daemon's own memory.
//!
//! The allocator (mimalloc) gives every thread its own pages, out of an
//! arena it asks the kernel to back with huge pages where it may. A thread
//! that touches a few kilobytes then holds a 2 MiB page. ringblk runs a
//! thread per export, so each export served once cost about 720 KiB of RSS
//! (500 exports: 435 MB), against about 75 KiB without huge pages; its hot
//! data (rings, request state) is far too small to gain from them.

use std::io;

/// Ask the kernel for no transparent huge pages in this process (for
/// memory faulted from now on, in mappings old and new).
pub fn decline() -> io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes
    // nothing but this process's huge-page policy.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn declined_shows_in_the_process_status() {
        super::decline().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}

//! Memory a frontend shares with us through a file descriptor (the
//! inflight region, the dirty log): mapped shared and read-write, only ever
//! accessed through atomics by its users, unmapped when dropped.

use crate::error::Error;
use std::os::fd::{AsRawFd, BorrowedFd};

pub(crate) struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the value and is not tied to a
// thread; its users only access it with atomic loads and stores.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

pub(crate) fn os_err(what: &str) -> Error {
    Error::from(std::io::Error::last_os_error()).context(what)
}

impl SharedMap {
    /// Map `len` bytes of `fd` from `offset`, after checking that the fd is
    /// a regular file (a memfd is one) holding them: a mapping past the
    /// file's end would fault. `what` names it in errors.
    pub(crate) fn open(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<SharedMap, Error> {
        // SAFETY: fstat into a zeroed struct we own; the fd is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os_err(&format!("fstat of the {what} fd")));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Error::invalid(format!(
                "the {what} fd is not a memfd or regular file"
            )));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid(format!("{what}: offset + size overflows")))?;
        if (st.st_size as u64) < end {
            return Err(Error::invalid(format!(
                "the {what} fd holds {} bytes, {end} needed",
                st.st_size
            )));
        }
        let len = usize::try_from(len).map_err(|_| Error::invalid(format!("{what} too large")))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Error::invalid(format!("{what}: offset too large")))?;
        // SAFETY: a new shared mapping of a file checked to hold it; the
        // result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_err(&format!("mmap of the {what}")));
        }
        Ok(SharedMap {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Anonymous zeroed memory of `len` bytes (tests).
    #[cfg(test)]
    pub(crate) fn anonymous(len: usize) -> SharedMap {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        SharedMap {
            ptr: ptr as *mut u8,
            len,
        }
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; its users borrow it through &self only.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

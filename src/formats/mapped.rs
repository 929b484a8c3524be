//! A format's tables written through a shared mapping, on tmpfs.
//!
//! A qcow2 request that allocates completes only once the metadata that
//! makes its data reachable (an L2 entry, a refcount) is in the image file.
//! On tmpfs the file is its page cache, so a store into a shared mapping of
//! it is as good as a write: the kernel keeps it when the process dies. It
//! costs no system call, and not the inode lock tmpfs takes for every
//! write, which the io_uring workers writing guest data hold most of the
//! time under an allocating load (`perf` showed the iothread spinning on
//! it). A page is faulted in once, on its first store.
//!
//! One mapping per file, reserved larger than the file (mapping past the
//! end is allowed; only touching it is not), and replaced by a larger one
//! when a table lies beyond it. Only ranges inside the file as the driver
//! knows it are written this way; a write that grows the file is the
//! caller's. Another process that truncates the file under us makes the
//! store fault: the SIGBUS handler (`os::sigbus`) absorbs it and this write
//! fails, instead of the daemon dying; later writes go the ordinary way.

use std::io;
use std::os::fd::RawFd;

use crate::os::sigbus::{self, Registration};
use crate::uring::IoVec;

/// The smallest reservation: an image's first GiB needs no second mapping.
const MIN_RESERVE: u64 = 1 << 30;

pub(crate) struct TableMap {
    fd: RawFd,
    /// Null while nothing is mapped.
    ptr: *mut u8,
    len: usize,
    registration: Option<Registration>,
    /// A store was lost to a truncation: the mapping is not used again.
    poisoned: bool,
}

// SAFETY: the mapping is plain shared memory; its owner (FileDriver) only
// touches it under a Mutex, so moving it between threads is sound.
unsafe impl Send for TableMap {}

impl TableMap {
    /// A mapping of `fd`, made on the first write.
    pub(crate) fn new(fd: RawFd) -> TableMap {
        TableMap {
            fd,
            ptr: std::ptr::null_mut(),
            len: 0,
            registration: None,
            poisoned: false,
        }
    }

    /// The file this maps.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd
    }

    /// Store `buf` at `offset`, which the caller knows lies inside the
    /// file. Ok(false): not done, write it another way (this mapping gave
    /// up, or cannot grow); Err: the store was lost because the file
    /// shrank under us.
    pub(crate) fn write(&mut self, offset: u64, buf: &IoVec) -> io::Result<bool> {
        if !self.reach(offset, buf.len())? {
            return Ok(false);
        }
        let mut at = offset as usize;
        for v in buf.iovecs() {
            // SAFETY: `[at, at + v.iov_len)` lies inside the mapping
            // (`reach`), which stays mapped while `self` is borrowed; the
            // source is memory `buf` keeps alive. Raw copies, no
            // references: other processes may touch the file.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, self.ptr.add(at), v.iov_len)
            };
            at += v.iov_len;
        }
        self.stored(offset)
    }

    /// As [`TableMap::write`], from a plain slice.
    pub(crate) fn store(&mut self, offset: u64, bytes: &[u8]) -> io::Result<bool> {
        if !self.reach(offset, bytes.len())? {
            return Ok(false);
        }
        // SAFETY: as in `write`: inside the mapping, raw copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.add(offset as usize),
                bytes.len(),
            )
        };
        self.stored(offset)
    }

    /// Whether `[offset, offset + len)` lies inside the mapping, mapping
    /// more if need be.
    fn reach(&mut self, offset: u64, len: usize) -> io::Result<bool> {
        if self.poisoned {
            return Ok(false);
        }
        let Some(end) = offset.checked_add(len as u64) else {
            return Ok(false);
        };
        if end > self.len as u64 {
            if let Err(e) = self.remap(end) {
                log::warn!("cannot map image tables for writing ({e}); writing them instead");
                self.poisoned = true;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After a store at `offset`: whether it was lost to a truncation.
    fn stored(&mut self, offset: u64) -> io::Result<bool> {
        if sigbus::any_poisoned() && self.registration.as_ref().is_some_and(|r| r.poisoned()) {
            self.poisoned = true;
            self.unmap();
            return Err(io::Error::other(format!(
                "the image file shrank under us (write at {offset} lost)"
            )));
        }
        Ok(true)
    }

    /// Map at least `need` bytes (a power of two, at least MIN_RESERVE).
    fn remap(&mut self, need: u64) -> io::Result<()> {
        self.unmap();
        let len = usize::try_from(need.next_power_of_two().max(MIN_RESERVE))
            .map_err(|_| io::Error::other("image too large to map"))?;
        // SAFETY: a fresh shared mapping of our own fd at an address the
        // kernel picks; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        match sigbus::register(ptr as usize, len, page, -1) {
            Ok(r) => {
                self.ptr = ptr as *mut u8;
                self.len = len;
                self.registration = Some(r);
                Ok(())
            }
            Err(e) => {
                // SAFETY: the mapping made above, used by nobody.
                unsafe { libc::munmap(ptr, len) };
                Err(e)
            }
        }
    }

    fn unmap(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        // Unregister first: from here on a SIGBUS there would be a bug.
        self.registration = None;
        // SAFETY: the mapping `remap` made; nothing borrows it past `write`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        self.ptr = std::ptr::null_mut();
        self.len = 0;
    }
}

impl Drop for TableMap {
    fn drop(&mut self) {
        self.unmap();
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::uring::AlignedBuf;

    fn bytes(v: u8, n: usize) -> IoVec {
        let mut b = AlignedBuf::zeroed(n, 512);
        b.as_mut_slice().fill(v);
        IoVec::from_buf(b)
    }

    fn tmpfs_file(name: &str, len: u64) -> (std::fs::File, std::path::PathBuf) {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/ringblk-mapped-{name}-{}",
            std::process::id()
        ));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len).unwrap();
        (f, path)
    }

    #[test]
    fn stores_land_in_the_file_also_past_the_first_reservation() {
        let (f, path) = tmpfs_file("land", 3 << 30);
        let mut m = TableMap::new(f.as_raw_fd());
        assert!(m.write(4096 + 512, &bytes(0xab, 512)).unwrap());
        assert!(m.write((2 << 30) + 8192, &bytes(0xcd, 1024)).unwrap());
        assert!(m.len >= 3 << 30, "remapped larger: {}", m.len);
        let mut got = vec![0u8; 1024];
        f.read_exact_at(&mut got[..512], 4096 + 512).unwrap();
        assert!(got[..512].iter().all(|&b| b == 0xab));
        f.read_exact_at(&mut got, (2 << 30) + 8192).unwrap();
        assert!(got.iter().all(|&b| b == 0xcd));
        std::fs::remove_file(path).unwrap();
    }

    /// Another process truncates the file: the store faults, the handler
    /// absorbs it, the write reports its loss, and the map steps aside.
    #[test]
    fn a_store_past_a_truncation_fails_the_write_not_the_process() {
        let (f, path) = tmpfs_file("trunc", 1 << 20);
        let mut m = TableMap::new(f.as_raw_fd());
        assert!(m.write(0, &bytes(1, 512)).unwrap());
        f.set_len(4096).unwrap();
        let e = m.write(512 << 10, &bytes(2, 512)).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
        assert!(!m.write(0, &bytes(3, 512)).unwrap(), "not used again");
        std::fs::remove_file(path).unwrap();
    }
}

//! Kick and call descriptors from the frontend: only eventfds.
//!
//! A queue's iothread writes call fds and its ring reads kick fds. A pipe
//! or a socket behaves in ways an eventfd cannot (a full pipe, a read that
//! returns less than 8 bytes, data that is not a counter), so only
//! eventfds are accepted. How they are used never depends on their flags,
//! which the frontend shares and may change at any time: the call write
//! goes through the ring with RWF_NOWAIT (`ops::signal_eventfd_nowait`),
//! and a queue is woken to stop through its waker, not its kick fd.

use crate::error::Error;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// True if `fd` is an eventfd: its fdinfo has the eventfd counter line
/// (present since Linux 3.8; pipes, sockets and files have none).
fn is_eventfd(fd: &OwnedFd) -> io::Result<bool> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(info.lines().any(|l| l.starts_with("eventfd-count:")))
}

/// Set O_NONBLOCK, which a RWF_NOWAIT write to an eventfd needs to be
/// tried at all. The flag lives on the open file description, which the
/// frontend shares with us through SCM_RIGHTS: the frontend's copy becomes
/// non-blocking too. QEMU and libblkio create these eventfds non-blocking
/// already. A frontend that clears the flag again only loses its own
/// guest notifications.
fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accept `fd` as vring `index`'s `what` ("kick" or "call") descriptor if
/// it is an eventfd, and make it non-blocking.
pub(crate) fn accept(fd: OwnedFd, index: usize, what: &str) -> Result<File, Error> {
    match is_eventfd(&fd) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::invalid(format!(
                "vring {index}: the {what} fd is not an eventfd"
            )))
        }
        Err(e) => {
            return Err(Error::invalid(format!(
                "vring {index}: cannot inspect the {what} fd: {e}"
            )))
        }
    }
    set_nonblocking(&fd).map_err(|e| {
        Error::invalid(format!(
            "vring {index}: cannot make the {what} fd non-blocking: {e}"
        ))
    })?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn owned(raw: i32) -> OwnedFd {
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    #[test]
    fn only_eventfds_are_accepted_and_they_become_non_blocking() {
        // SAFETY: plain syscall, result checked by `owned`.
        let efd = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) });
        let f = accept(efd, 0, "call").unwrap();
        // SAFETY: fcntl on our descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);

        let mut p = [0i32; 2];
        // SAFETY: pipe2 into a two-int array.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (r, w) = (owned(p[0]), owned(p[1]));
        assert!(accept(r, 1, "kick")
            .unwrap_err()
            .message()
            .contains("not an eventfd"));
        assert!(accept(w, 1, "call").is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(accept(OwnedFd::from(a), 2, "kick").is_err());
        let file = File::open("/proc/self/status").unwrap();
        assert!(accept(OwnedFd::from(file), 3, "call").is_err());
    }
}

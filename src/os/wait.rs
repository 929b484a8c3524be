//! Sleeping on a file descriptor until it is readable, with a stop fd
//! (shutdown) that always wins: the accept and message loops of the
//! vhost-user and control threads.

use std::io;
use std::os::fd::RawFd;

/// What woke [`wait_for`] up.
pub(crate) enum Wake {
    /// `fd` is readable (a message, a connection, or end of file).
    Ready,
    /// `stop_fd` was signalled.
    Stop,
}

/// Sleep until `fd` is readable or `stop_fd` is signalled (stop wins).
pub(crate) fn wait_for(fd: RawFd, stop_fd: RawFd) -> io::Result<Wake> {
    Ok(match poll3(fd, stop_fd, -1)? {
        (_, true, _) => Wake::Stop,
        _ => Wake::Ready,
    })
}

/// [`wait_for`], or `Ok(None)` when `alarm_fd` is signalled first (stop
/// wins over the alarm, the alarm over `fd`).
pub(crate) fn wait_for_or_alarm(
    fd: RawFd,
    stop_fd: RawFd,
    alarm_fd: RawFd,
) -> io::Result<Option<Wake>> {
    Ok(match poll3(fd, stop_fd, alarm_fd)? {
        (_, true, _) => Some(Wake::Stop),
        (_, _, true) => None,
        _ => Some(Wake::Ready),
    })
}

/// Sleep until one of three fds is readable (a negative fd is ignored);
/// which ones are.
fn poll3(fd: RawFd, stop_fd: RawFd, alarm_fd: RawFd) -> io::Result<(bool, bool, bool)> {
    let entry = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [entry(fd), entry(stop_fd), entry(alarm_fd)];
    loop {
        // SAFETY: poll on three pollfd entries (negative fds are skipped).
        if unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) } >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok((
        fds[0].revents != 0,
        fds[1].revents != 0,
        fds[2].revents != 0,
    ))
}

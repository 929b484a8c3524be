//! systemd's notification protocol (sd_notify(3)): a datagram of
//! `KEY=value` lines to the socket `$NOTIFY_SOCKET` names. A few lines of
//! our own rather than a crate: all we need is one `sendto` of a short
//! text, and the crates that offer it bring the rest of libsystemd's API.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where systemd listens for our state, if it does.
pub(crate) struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`: a path, or `@name` in the abstract namespace.
    /// None when unset (not under systemd); an error when it cannot be used.
    pub(crate) fn from_env() -> io::Result<Option<Notifier>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None => SocketAddr::from_pathname(&name)?,
        };
        Ok(Some(Notifier {
            sock: UnixDatagram::unbound()?,
            addr,
        }))
    }

    /// Send `state` (newline-separated `KEY=value` assignments).
    pub(crate) fn send(&self, state: &str) -> io::Result<()> {
        self.sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
    }

    /// Send `state` with `fd` attached (`FDSTORE=1`: systemd keeps a copy
    /// of the descriptor for the service's next process).
    pub(crate) fn send_fd(&self, state: &str, fd: RawFd) -> io::Result<()> {
        // A socket of its own, connected: sendmsg then needs no address.
        let sock = UnixDatagram::unbound()?;
        sock.connect_addr(&self.addr)?;
        let iov = [IoSlice::new(state.as_bytes())];
        let fds = [fd];
        let mut ancillary = [0u8; 64];
        // SAFETY: CMSG_SPACE of one int is a constant; the buffer holds it.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        debug_assert!(space <= ancillary.len());
        // SAFETY: a msghdr over our buffers, one SCM_RIGHTS control
        // message written through the CMSG macros within `space` bytes.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = 1;
            msg.msg_control = ancillary.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), 1);
            libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// How often systemd expects `WATCHDOG=1` (`$WATCHDOG_USEC`), if it
/// watches this process (`$WATCHDOG_PID` unset, or ours).
pub(crate) fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

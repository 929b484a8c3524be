//! Sockets passed by systemd's socket activation (sd_listen_fds(3)):
//! `LISTEN_PID` names this process, `LISTEN_FDS` counts the fds from 3 on,
//! `LISTEN_FDNAMES` names them (colon-separated). Read once at start-up;
//! each fd is taken at most once, by the export whose socket it is.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The first fd systemd passes.
const FIRST: RawFd = 3;

#[derive(Debug, Default)]
pub struct PassedFds {
    /// (fd, name) not yet taken.
    fds: Vec<(RawFd, String)>,
}

impl PassedFds {
    /// The fds passed to this process, marked close-on-exec; none if the
    /// variables are unset or meant for another process.
    pub fn from_env() -> PassedFds {
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        let n = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse::<RawFd>().ok())
            .filter(|_| ours)
            .unwrap_or(0)
            .clamp(0, 1024);
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|s| s.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let fds = (0..n)
            .map(|i| {
                let fd = FIRST + i;
                // SAFETY: fcntl on an fd number; on an fd that is not open
                // it fails harmlessly.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                (fd, names.get(i as usize).cloned().unwrap_or_default())
            })
            .collect();
        PassedFds { fds }
    }

    /// Take the passed listening Unix socket bound to `path`, if any.
    pub fn take_bound_to(&mut self, path: &Path) -> Option<RawFd> {
        let want = std::path::absolute(path).ok()?;
        let i = self.fds.iter().position(|(fd, _)| {
            bound_path(*fd).is_some_and(|p| std::path::absolute(&p).ok().as_ref() == Some(&want))
        })?;
        Some(self.fds.remove(i).0)
    }

    /// Every passed descriptor whose name starts with `prefix`, with its
    /// name; the caller owns them from now on.
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(RawFd, String)> {
        let (taken, rest) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|(_, n)| n.starts_with(prefix));
        self.fds = rest;
        taken
    }

    /// Take the passed fd called `name` (`FileDescriptorName=`), if any.
    pub fn take_named(&mut self, name: &str) -> Option<RawFd> {
        let i = self.fds.iter().position(|(_, n)| n == name)?;
        Some(self.fds.remove(i).0)
    }
}

/// The path a Unix socket is bound to (None for other fds, or unbound or
/// abstract sockets).
fn bound_path(fd: RawFd) -> Option<std::path::PathBuf> {
    // SAFETY: getsockname writes at most `len` bytes into the zeroed
    // sockaddr_un; we read sun_path only up to its NUL within bounds.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) != 0
            || addr.sun_family != libc::AF_UNIX as libc::sa_family_t
            || addr.sun_path[0] == 0
        {
            return None;
        }
        let bytes: &[u8] =
            std::slice::from_raw_parts(addr.sun_path.as_ptr().cast(), addr.sun_path.len());
        let s = CStr::from_bytes_until_nul(bytes).ok()?;
        Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
            s.to_bytes(),
        )))
    }
}

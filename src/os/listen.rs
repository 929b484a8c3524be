//! Creating a listening Unix socket at a path other local users can reach,
//! without trusting what they may have put there.
//!
//! The socket is bound inside a fresh 0700 folder next to the path, given
//! its mode there (so nobody can connect before the mode is right), and
//! then renamed onto the path atomically. What is already at the path is
//! never followed and never deleted unless it is a socket nobody listens on;
//! that stale socket is swapped out with RENAME_EXCHANGE and removed only
//! if the swapped-out entry is the very inode found stale, so a socket
//! someone else created in between is put back, not deleted.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Attempts before giving up when the path keeps changing under us.
const ATTEMPTS: usize = 3;

/// A socket file this process created; removed on drop if it is still ours.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn error(path: &Path, kind: io::ErrorKind, msg: &str) -> io::Error {
    io::Error::new(kind, format!("{}: {msg}", path.display()))
}

fn context(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// What is at the path now.
enum Existing {
    Nothing,
    /// A socket nobody listens on: (dev, ino).
    Stale((u64, u64)),
}

fn inspect(path: &Path) -> io::Result<Existing> {
    use std::os::unix::fs::FileTypeExt;
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(context(path, e)),
    };
    let t = m.file_type();
    if t.is_symlink() {
        return Err(error(
            path,
            io::ErrorKind::AlreadyExists,
            "is a symbolic link; refusing to follow it (give the real path)",
        ));
    }
    if !t.is_socket() {
        return Err(error(
            path,
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket; refusing to replace it",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(error(
            path,
            io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            Ok(Existing::Stale((m.dev(), m.ino())))
        }
        Err(e) => Err(context(path, e)),
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: two NUL-terminated paths; AT_FDCWD resolves them as open would.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A private folder next to `path`, removed (with what is left in it) on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn beside(path: &Path) -> io::Result<PrivateDir> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let template = cstr(&parent.join(".ringblk-sock-XXXXXX"))?;
        let mut bytes = template.into_bytes_with_nul();
        // SAFETY: mkdtemp rewrites the XXXXXX of a NUL-terminated buffer we own.
        if unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) }.is_null() {
            return Err(context(parent, io::Error::last_os_error()));
        }
        bytes.pop();
        Ok(PrivateDir(PathBuf::from(std::ffi::OsStr::from_bytes(
            &bytes,
        ))))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("sock"));
        let _ = std::fs::remove_file(self.0.join("old"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Bind a listening socket at `path` with permission bits `mode`. A stale
/// socket there is replaced; a live socket, a symlink or any other file is
/// refused with an error naming the path.
pub(crate) fn bind_listener(path: &Path, mode: u32) -> io::Result<(UnixListener, SocketFile)> {
    for _ in 0..ATTEMPTS {
        let existing = inspect(path)?;
        let dir = PrivateDir::beside(path)?;
        let tmp = dir.0.join("sock");
        let listener = UnixListener::bind(&tmp).map_err(|e| context(path, e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| context(path, e))?;
        let m = std::fs::symlink_metadata(&tmp).map_err(|e| context(path, e))?;
        let ours = || SocketFile {
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        };
        match existing {
            Existing::Nothing => match rename2(&tmp, path, libc::RENAME_NOREPLACE) {
                Ok(()) => return Ok((listener, ours())),
                // Someone created something there since we looked: look again.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(context(path, e)),
            },
            Existing::Stale(stale) => {
                match rename2(&tmp, path, libc::RENAME_EXCHANGE) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(context(path, e)),
                }
                // `tmp` now names what was at `path`.
                let swapped = std::fs::symlink_metadata(&tmp).map(|m| (m.dev(), m.ino()));
                if swapped.ok() == Some(stale) {
                    let _ = std::fs::remove_file(&tmp);
                    return Ok((listener, ours()));
                }
                // Not the stale socket we checked: give it back, look again.
                rename2(&tmp, path, libc::RENAME_EXCHANGE).map_err(|e| context(path, e))?;
            }
        }
    }
    Err(error(
        path,
        io::ErrorKind::AddrInUse,
        "kept changing while the socket was being created",
    ))
}

/// Pacing for an accept loop whose `accept` fails: out of fds (EMFILE,
/// ENFILE) or memory, the pending connection stays queued and the socket
/// stays readable, so retrying at once would spin. Waits grow from 10 ms
/// to 1 s and end early when `stop_fd` is signalled; the log says so at
/// most once per wait.
pub(crate) struct AcceptBackoff {
    delay: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            delay: Duration::ZERO,
        }
    }
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// A connection taken and set up: the next failure starts over.
    pub(crate) fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// Log `e` and wait before the next accept; false if `stop_fd` was
    /// signalled meanwhile.
    pub(crate) fn failed(&mut self, what: &Path, e: &io::Error, stop_fd: RawFd) -> bool {
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        log::warn!(
            "{}: cannot take a new connection: {e}; retrying in {:?}",
            what.display(),
            self.delay
        );
        let mut fd = libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd; an EINTR just shortens the wait.
        let r = unsafe { libc::poll(&mut fd, 1, self.delay.as_millis() as libc::c_int) };
        !(r > 0 && fd.revents != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringblk-listen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn socket_gets_the_mode_and_goes_on_drop() {
        let d = scratch("mode");
        let p = d.join("s.sock");
        let (l, f) = bind_listener(&p, 0o600).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        UnixStream::connect(&p).unwrap();
        // A live socket is refused.
        let e = bind_listener(&p, 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(l);
        drop(f);
        assert!(!p.exists());
        // Nothing but the socket was left in the folder.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let d = scratch("stale");
        let p = d.join("s.sock");
        drop(UnixListener::bind(&p).unwrap());
        let (_l, _f) = bind_listener(&p, 0o600).unwrap();
        UnixStream::connect(&p).unwrap();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_and_symlinks_are_refused_and_left_alone() {
        let d = scratch("refuse");
        let file = d.join("data");
        std::fs::write(&file, b"precious").unwrap();
        let e = bind_listener(&file, 0o600).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        let link = d.join("link.sock");
        std::os::unix::fs::symlink(d.join("elsewhere.sock"), &link).unwrap();
        let e = bind_listener(&link, 0o600).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!d.join("elsewhere.sock").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn our_socket_replaced_by_another_is_not_removed_on_drop() {
        let d = scratch("replaced");
        let p = d.join("s.sock");
        let (l, f) = bind_listener(&p, 0o600).unwrap();
        std::fs::remove_file(&p).unwrap();
        let other = UnixListener::bind(&p).unwrap();
        drop(f);
        drop(l);
        assert!(p.exists(), "another process's socket must survive our exit");
        drop(other);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

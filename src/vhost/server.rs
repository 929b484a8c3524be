//! An export's listening socket and what serves a frontend on it: one
//! frontend at a time, the next one accepted (by the acceptor, see
//! acceptor.rs) when the previous leaves. The daemon never exits because a
//! client left.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use vmm_sys_util::eventfd::EventFd;

use super::acceptor::Listening;
use super::device::Device;
use super::handoff::Restored;
use super::session::Session;
use crate::os::listen::{bind_listener, SocketFile};
use crate::os::notify::Notifier;

pub(crate) struct VhostServer<D> {
    listener: UnixListener,
    path: PathBuf,
    /// Removes the socket file when the server goes (none for a socket
    /// the caller passed as an fd).
    _file: Option<SocketFile>,
    stop: EventFd,
    device: Arc<D>,
    /// Set before `stop` for an upgrade: the connected frontend's session
    /// goes to systemd's fd store instead of being closed.
    handoff: Arc<OnceLock<Arc<Notifier>>>,
}

impl<D: Device> VhostServer<D> {
    /// Listen on `path`, a socket created with permission bits `mode`.
    pub(crate) fn bind(path: &Path, mode: u32, device: Arc<D>) -> io::Result<Self> {
        let (listener, file) = bind_listener(path, mode)?;
        Ok(VhostServer {
            listener,
            path: path.to_path_buf(),
            _file: Some(file),
            stop: EventFd::new(libc::EFD_CLOEXEC)?,
            device,
            handoff: Arc::default(),
        })
    }

    /// Listen on a socket the caller created and passed as inherited fd
    /// `fd` (QSD's `addr.type=fd`): it must be a listening Unix socket.
    pub(crate) fn from_fd(fd: RawFd, device: Arc<D>) -> io::Result<Self> {
        let invalid =
            |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd}: {what}"));
        let int_opt = |opt| -> io::Result<libc::c_int> {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `v`.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("fd {fd}: not a socket ({})", io::Error::last_os_error()),
                ));
            }
            Ok(v)
        };
        if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX {
            return Err(invalid("not a Unix socket"));
        }
        if int_opt(libc::SO_ACCEPTCONN)? != 1 {
            return Err(invalid("not a listening socket"));
        }
        // SAFETY: fcntl on an fd we just saw is an open socket.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the fd is an open listening Unix socket the caller handed
        // over to us; nothing else in this process owns it.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        Ok(VhostServer {
            listener,
            path: PathBuf::from(format!("fd {fd}")),
            _file: None,
            stop: EventFd::new(libc::EFD_CLOEXEC)?,
            device,
            handoff: Arc::default(),
        })
    }

    /// A handle that makes `serve` return (after the current frontend's
    /// requests have completed).
    pub(crate) fn stopper(&self) -> io::Result<EventFd> {
        self.stop.try_clone()
    }

    /// Where to put a notifier so that stopping hands the session over.
    pub(crate) fn handoff(&self) -> Arc<OnceLock<Arc<Notifier>>> {
        self.handoff.clone()
    }

    /// Go on serving the frontend of a session the previous daemon handed
    /// over; if it cannot be rebuilt, its connection closes (the frontend
    /// reconnects as after any restart).
    pub(crate) fn serve_restored(&self, r: Restored) {
        let id = self.device.id();
        let stream = match r.fd(r.state.socket) {
            Ok(fd) => UnixStream::from(fd),
            Err(e) => {
                log::error!("export {id}: cannot take over the session: {e}");
                return;
            }
        };
        self.device.set_connected(true);
        match Session::restore(&*self.device, &stream, r) {
            Ok(mut session) => {
                log::info!("export {id}: took over the previous daemon's session");
                session.run(self.stop.as_raw_fd(), &self.handoff);
            }
            Err(e) => log::error!(
                "export {id}: cannot take over the session ({e}); closing its connection"
            ),
        }
        self.device.set_backend_channel(None);
        self.device.set_connected(false);
    }
}

impl<D: Device + 'static> Listening for VhostServer<D> {
    fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(s, _)| s)
    }

    fn serve_stream(&self, stream: UnixStream) {
        let id = self.device.id();
        log::info!("export {id}: frontend connected");
        self.device.set_connected(true);
        match Session::new(&*self.device, &stream) {
            Ok(mut session) => session.run(self.stop.as_raw_fd(), &self.handoff),
            Err(e) => log::error!("export {id}: cannot serve the frontend: {e}"),
        }
        self.device.set_backend_channel(None);
        self.device.set_connected(false);
    }
}

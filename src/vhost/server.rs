//! The listening socket: one frontend at a time, the next one accepted when
//! the previous leaves. The daemon never exits because a client left.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::blk::export::BlkExport;
use super::session::Session;
use super::socket::{wait_for, Wake};

pub struct VhostServer {
    listener: UnixListener,
    path: PathBuf,
    stop: EventFd,
    export: Arc<BlkExport>,
    /// The backend-initiated channel of the current frontend, if it gave one
    /// (used to tell it about config changes).
    pub backend_channel: Arc<Mutex<Option<UnixStream>>>,
}

/// Bind `path`, replacing a stale socket file but never a live one.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another process is listening on this socket",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        r => r,
    }
}

impl VhostServer {
    pub fn bind(path: &Path, export: Arc<BlkExport>) -> io::Result<Self> {
        let listener =
            bind(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(VhostServer {
            listener,
            path: path.to_path_buf(),
            stop: EventFd::new(libc::EFD_CLOEXEC)?,
            export,
            backend_channel: Arc::new(Mutex::new(None)),
        })
    }

    /// A handle that makes `serve` return (after the current frontend's
    /// requests have completed).
    pub fn stopper(&self) -> io::Result<EventFd> {
        self.stop.try_clone()
    }

    /// Accept and serve frontends until stopped.
    pub fn serve(&self) {
        loop {
            match wait_for(self.listener.as_raw_fd(), self.stop.as_raw_fd()) {
                Ok(Wake::Ready) => {}
                Ok(Wake::Stop) => return,
                Err(e) => {
                    log::error!("{}: poll failed: {e}", self.path.display());
                    return;
                }
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    log::warn!("{}: accept failed: {e}", self.path.display());
                    continue;
                }
            };
            log::info!("export {}: frontend connected", self.export.id);
            Session::new(&self.export, &stream, self.backend_channel.clone())
                .run(self.stop.as_raw_fd());
            *self
                .backend_channel
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

impl Drop for VhostServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

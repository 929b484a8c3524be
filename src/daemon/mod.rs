//! The daemon object: it owns the iothreads, the exports (each a
//! BlockBackend, a virtio-blk device and the thread serving its vhost-user
//! socket) and the control server, and shuts them down in one documented
//! order. The command lines build it (the simple `serve` form and QSD's
//! options, `qsd`); `main.rs` only parses arguments and waits for signals.

pub mod keyval;
pub mod qsd;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::control::{ControlServer, Daemon as ControlTarget};
use crate::graph::{
    all_nodes, drain_all_begin, drain_all_end, find_node, release_monitor_nodes, BackendError,
    BlockBackend, Node,
};
use crate::uring::IoThread;
use crate::vhost::blk::config::{seg_max_for, BlkGeometry, SIZE_MAX};
use crate::vhost::blk::export::BlkExport;
use crate::vhost::blk::request::{Limits, VIRTIO_BLK_ID_BYTES};
use crate::vhost::blk::state::ExportState;
use crate::vhost::server::VhostServer;

/// Largest discard / write-zeroes request we advertise, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Permission bits of a vhost-user socket unless told otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// QMP clients connected at once unless told otherwise.
pub const DEFAULT_CONTROL_CLIENTS: usize = 16;

/// Set by QMP `quit` before it raises SIGTERM, to name the reason.
static QUIT_REQUESTED: AtomicBool = AtomicBool::new(false);

/// QMP `quit`: the main thread, waiting for SIGTERM, carries it out.
pub fn request_quit() {
    QUIT_REQUESTED.store(true, Ordering::SeqCst);
    // SAFETY: kill on our own pid; the main thread takes it with sigwait.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// True once QMP `quit` asked for the shutdown under way.
pub fn quit_requested() -> bool {
    QUIT_REQUESTED.load(Ordering::SeqCst)
}

/// Where an export's frontends connect.
pub enum ExportListener {
    /// A socket ringblk creates at this path.
    Path(PathBuf),
    /// A listening socket the caller created, passed as this fd.
    Fd(RawFd),
}

impl ExportListener {
    pub fn describe(&self) -> String {
        match self {
            ExportListener::Path(p) => std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            ExportListener::Fd(fd) => format!("fd {fd}"),
        }
    }
}

/// What an export serves and how the device looks to the guest.
pub struct ExportConfig {
    pub id: String,
    pub root: Arc<Node>,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    /// Up to 20 bytes.
    pub serial: String,
    pub listener: ExportListener,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Indices into the daemon's iothreads: queue k runs on `iothreads[k mod n]`.
    pub iothreads: Vec<usize>,
}

struct RunningExport {
    export: Arc<BlkExport>,
    backend: Arc<BlockBackend>,
    stopper: EventFd,
    server: JoinHandle<()>,
}

#[derive(Default)]
pub struct StorageDaemon {
    /// Iothreads and their ids (`--object iothread,id=`).
    iothreads: Vec<(String, IoThread)>,
    /// The iothread of exports that name none (QSD runs them in its main
    /// loop; ours is one shared iothread).
    shared_iothread: Option<usize>,
    exports: Vec<RunningExport>,
    control: Option<ControlServer>,
}

impl StorageDaemon {
    /// Start an iothread (its own io_uring ring and executor); returns its
    /// index for [`ExportConfig::iothreads`].
    pub fn add_iothread(&mut self, name: &str, poll_max: Duration) -> Result<usize, String> {
        let t = IoThread::start(name, poll_max)
            .map_err(|e| format!("cannot start iothread {name}: {e}"))?;
        self.iothreads.push((name.to_string(), t));
        Ok(self.iothreads.len() - 1)
    }

    /// `--object iothread,id=ID`: ids are unique.
    pub fn add_named_iothread(&mut self, id: &str, poll_max: Duration) -> Result<(), String> {
        if self.iothreads.iter().any(|(n, _)| n == id) {
            return Err(format!("attempt to add duplicate property '{id}'"));
        }
        self.add_iothread(id, poll_max).map(|_| ())
    }

    /// The iothreads named `ids`, or the shared one if `ids` is empty.
    pub fn iothreads_for(&mut self, ids: &[String]) -> Result<Vec<usize>, String> {
        if ids.is_empty() {
            let shared = match self.shared_iothread {
                Some(i) => i,
                None => {
                    let i = self.add_iothread("main-iothread", Duration::from_micros(32))?;
                    self.shared_iothread = Some(i);
                    i
                }
            };
            return Ok(vec![shared]);
        }
        ids.iter()
            .map(|id| {
                self.iothreads
                    .iter()
                    .position(|(n, _)| n == id)
                    .ok_or_else(|| format!("Cannot find iothread {id}"))
            })
            .collect()
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        find_node(name)
    }

    /// Export `cfg.root` on `cfg.socket`; frontends are accepted from now on.
    pub fn add_export(&mut self, cfg: ExportConfig) -> Result<Arc<BlockBackend>, String> {
        if cfg.serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(format!(
                "export {}: serial '{}' is longer than {VIRTIO_BLK_ID_BYTES} bytes",
                cfg.id, cfg.serial
            ));
        }
        let threads = cfg
            .iothreads
            .iter()
            .map(|&i| self.iothreads.get(i).map(|(_, t)| t.handle()))
            .collect::<Option<Vec<_>>>()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("export {}: no such iothread", cfg.id))?;
        let backend = BlockBackend::new(&cfg.id, cfg.root, cfg.read_only);
        let bs = cfg.logical_block_size as u64;
        if backend.size() < bs {
            return Err(format!(
                "export {}: the disk is smaller than one {bs}-byte block",
                cfg.id
            ));
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..cfg.serial.len()].copy_from_slice(cfg.serial.as_bytes());
        let geometry = BlkGeometry {
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            read_only: cfg.read_only,
            limits: Limits {
                block_size: cfg.logical_block_size,
                size_max: SIZE_MAX,
                seg_max: seg_max_for(cfg.queue_size),
                max_discard_sectors: MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
                max_segments: 1,
                serial,
            },
        };
        let state = ExportState::new(
            &cfg.id,
            backend.clone(),
            geometry.limits.clone(),
            geometry.seg_max() as usize + 2,
            cfg.num_queues,
        );
        let export = Arc::new(BlkExport {
            id: cfg.id.clone(),
            geometry,
            state,
            iothreads: threads,
            socket: PathBuf::from(cfg.listener.describe()),
            connected: AtomicBool::new(false),
        });
        let server = match &cfg.listener {
            ExportListener::Path(p) => VhostServer::bind(p, cfg.socket_mode, export.clone()),
            ExportListener::Fd(fd) => VhostServer::from_fd(*fd, export.clone()),
        }
        .map_err(|e| format!("export {}: {e}", cfg.id))?;
        let stopper = server.stopper().map_err(|e| e.to_string())?;
        let server = std::thread::Builder::new()
            .name("vhost".into())
            .spawn(move || server.serve())
            .map_err(|e| format!("export {}: cannot start its thread: {e}", cfg.id))?;
        self.exports.push(RunningExport {
            export,
            backend: backend.clone(),
            stopper,
            server,
        });
        Ok(backend)
    }

    /// Open the QMP control socket over the exports added so far. `quit`
    /// must only start the shutdown (QMP `quit`); the caller carries it out.
    pub fn start_control(
        &mut self,
        path: &Path,
        max_clients: usize,
        quit: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), String> {
        let exports = self.exports.iter().map(|e| e.export.clone()).collect();
        let iothreads = self.iothreads.iter().map(|(_, t)| t.handle()).collect();
        let target = ControlTarget::new(exports, iothreads, quit);
        let server = ControlServer::start(path, target, max_clients)
            .map_err(|e| format!("control socket: {e}"))?;
        self.control = Some(server);
        Ok(())
    }

    /// Shut down in this order: control clients are told and disconnected
    /// (their drained sections end) -> exports stop accepting work, each
    /// frontend is disconnected once its in-flight requests completed ->
    /// drain_all -> every BlockBackend is flushed and its tree ejected ->
    /// our references go, so nodes close (qcow2 writes back its caches,
    /// files sync) -> nothing may be left open. `reason` is the SHUTDOWN
    /// event's.
    pub fn shutdown(self, reason: &str) -> Result<(), String> {
        let mut failed = Vec::new();
        if let Some(c) = self.control {
            c.shutdown(reason);
        }
        for e in &self.exports {
            let _ = e.stopper.write(1);
        }
        let mut backends = Vec::new();
        for e in self.exports {
            if e.server.join().is_err() {
                failed.push(format!("export {}: its vhost thread panicked", e.export.id));
            }
            backends.push(e.backend);
        }
        drain_all_begin();
        let mut roots = Vec::new();
        for b in &backends {
            // Every export has an iothread, so there is one to flush on.
            if let Some((_, t)) = self.iothreads.first() {
                let bb = b.clone();
                match t.handle().block_on(move || async move { bb.flush().await }) {
                    Err(BackendError::Ejected { .. }) | Ok(()) => {}
                    Err(e) => failed.push(format!("final flush failed: {e}")),
                }
            }
            roots.extend(b.eject());
        }
        drain_all_end();
        drop(roots);
        drop(backends);
        release_monitor_nodes();
        for (_, t) in self.iothreads {
            t.stop();
        }
        let left: Vec<String> = all_nodes().iter().map(|n| n.name().to_string()).collect();
        if !left.is_empty() {
            failed.push(format!(
                "nodes still open after shutdown: {}",
                left.join(", ")
            ));
        }
        if failed.is_empty() {
            log::info!("shut down cleanly");
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

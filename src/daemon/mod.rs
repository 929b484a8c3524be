//! The daemon object: it owns the iothreads, the exports (each a
//! BlockBackend, a virtio-blk device and the thread serving its vhost-user
//! socket) and the control server, and shuts them down in one documented
//! order. The command lines build it (the simple `serve` form and QSD's
//! options, `qsd`); `main.rs` only parses arguments and waits for signals.

pub mod keyval;
pub mod qsd;
pub mod serve;
mod systemd;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::control::{ControlServer, Daemon as ControlTarget};
use crate::graph::{BackendError, BlockBackend, Graph};
use crate::uring::{find_iothreads, IoThread, IoThreadHandle};
use crate::vhost::exports::ExportTable;
pub use crate::vhost::exports::{ExportConfig, ExportListener, DEFAULT_SOCKET_MODE};

/// QMP clients connected at once unless told otherwise.
pub const DEFAULT_CONTROL_CLIENTS: usize = 16;

/// How long start-up waits for an image another process has locked
/// (`--lock-wait`): long enough for the kernel to finish the I/O of a
/// daemon that was just killed (milliseconds, or a few seconds on a slow
/// disk), short enough that a real conflict is reported promptly.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(5);

/// `--lock-wait SECONDS` (a decimal number, at most an hour).
pub fn parse_lock_wait(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "lock wait must be a number of seconds from 0 to 3600, not '{s}'"
        )),
    }
}

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

#[derive(Default)]
pub struct StorageDaemon {
    /// Iothreads and their ids (`--object iothread,id=`).
    iothreads: Vec<IoThread>,
    /// The iothread of exports that name none (QSD runs them in its main
    /// loop; ours is one shared iothread).
    shared_iothread: Option<IoThreadHandle>,
    exports: Arc<ExportTable>,
    control: Option<ControlServer>,
    /// The block graph: every node, BlockBackend and job of this daemon.
    graph: Graph,
    /// systemd's notification socket (and watchdog), once ready.
    systemd: Option<systemd::Systemd>,
}

impl StorageDaemon {
    /// Start an iothread (its own io_uring ring and executor).
    pub fn add_iothread(
        &mut self,
        name: &str,
        poll_max: Duration,
    ) -> Result<IoThreadHandle, String> {
        let t = IoThread::start(name, poll_max)
            .map_err(|e| format!("cannot start iothread {name}: {e}"))?;
        let handle = t.handle();
        self.iothreads.push(t);
        Ok(handle)
    }

    fn handles(&self) -> Vec<IoThreadHandle> {
        self.iothreads.iter().map(IoThread::handle).collect()
    }

    /// `--object iothread,id=ID`: ids are unique.
    pub fn add_named_iothread(&mut self, id: &str, poll_max: Duration) -> Result<(), String> {
        if self.iothreads.iter().any(|t| t.handle().name() == id) {
            return Err(format!("attempt to add duplicate property '{id}'"));
        }
        self.add_iothread(id, poll_max).map(|_| ())
    }

    /// The iothreads named `ids`, or the shared one if `ids` is empty.
    pub fn iothreads_for(&mut self, ids: &[String]) -> Result<Vec<IoThreadHandle>, String> {
        if ids.is_empty() {
            let shared = match &self.shared_iothread {
                Some(t) => t.clone(),
                None => {
                    let t = self.add_iothread("main-iothread", Duration::from_micros(32))?;
                    self.shared_iothread = Some(t.clone());
                    t
                }
            };
            return Ok(vec![shared]);
        }
        find_iothreads(&self.handles(), ids)
    }

    /// How many iothreads run.
    pub fn iothread_count(&self) -> usize {
        self.iothreads.len()
    }

    /// The daemon's block graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Export `cfg.root`, its queues on the daemon's `iothreads` (queue k
    /// on the k mod n-th); frontends are accepted from now on.
    pub fn add_export(
        &mut self,
        cfg: ExportConfig,
        iothreads: Vec<IoThreadHandle>,
    ) -> Result<Arc<BlockBackend>, String> {
        self.exports.add(cfg, iothreads)
    }

    /// Open the QMP control socket over the exports added so far. `quit`
    /// must only start the shutdown (QMP `quit`); the caller carries it out.
    pub fn start_control(
        &mut self,
        path: &Path,
        max_clients: usize,
        quit: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), String> {
        // Exports added over QMP without an iothread go where command-line
        // exports without one went, else onto the first iothread; a thread
        // is started for them only if there is none at all.
        let default = match (&self.shared_iothread, self.iothreads.first()) {
            (Some(t), _) => t.clone(),
            (None, Some(first)) => first.handle(),
            (None, None) => self.iothreads_for(&[])?.remove(0),
        };
        let iothreads = self.handles();
        let target = ControlTarget::new(
            self.graph.clone(),
            self.exports.clone(),
            iothreads,
            default,
            quit,
        );
        let server = ControlServer::start(path, target, max_clients)
            .map_err(|e| format!("control socket: {e}"))?;
        self.control = Some(server);
        Ok(())
    }

    /// Every export and the control socket accept connections: tell
    /// systemd, if it started us (`READY=1` with what is served), and start
    /// the watchdog pings it asked for.
    pub fn ready(&mut self) {
        let ids: Vec<String> = self.exports.list().iter().map(|e| e.id.clone()).collect();
        let status = format!("serving {} export(s): {}", ids.len(), ids.join(", "));
        let iothreads = self.handles();
        self.systemd = systemd::Systemd::ready(&status, iothreads);
    }

    /// Shut down in this order: control clients are told and disconnected
    /// (their drained sections end) -> jobs are cancelled (their graph
    /// changes undone, their threads gone) -> exports stop accepting work, each
    /// frontend is disconnected once its in-flight requests completed ->
    /// drain_all -> every BlockBackend is flushed and its tree ejected ->
    /// our references go, so nodes close (qcow2 writes back its caches,
    /// files sync) -> nothing may be left open. `reason` is the SHUTDOWN
    /// event's.
    pub fn shutdown(mut self, reason: &str) -> Result<(), String> {
        if let Some(s) = self.systemd.take() {
            s.stopping();
        }
        if let Some(c) = self.control {
            c.shutdown(reason);
        }
        {
            let _g = self.graph.lock();
            self.graph.jobs().cancel_all();
        }
        let (backends, mut failed) = self.exports.stop_all();
        self.graph.drain_all_begin();
        let mut roots = Vec::new();
        for b in &backends {
            // Every export has an iothread, so there is one to flush on.
            if let Some(t) = self.iothreads.first() {
                let bb = b.clone();
                match t.handle().block_on(move || async move { bb.flush().await }) {
                    Err(BackendError::Ejected { .. }) | Ok(()) => {}
                    Err(e) => failed.push(format!("final flush failed: {e}")),
                }
            }
            roots.extend(b.eject());
        }
        self.graph.drain_all_end();
        drop(roots);
        drop(backends);
        self.graph.release_monitor_nodes();
        for t in self.iothreads {
            t.stop();
        }
        let left: Vec<String> = self
            .graph
            .all_nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
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

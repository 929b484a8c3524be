//! The daemon's state: its block graph, its iothreads and its exports. The
//! command lines (`daemon/`, both forms) and QMP (`control/`) drive this
//! one value; neither keeps a copy of any of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::Error;
use crate::graph::{BlockBackend, Graph};
use crate::uring::{find_iothreads, IoThread, IoThreadHandle};
use crate::vhost::blk::export::BlkExport;
use crate::vhost::exports::{ExportConfig, ExportOptions, ExportTable};

/// The shared iothread's polling limit: QEMU's default adaptive polling
/// limit (32 µs).
const SHARED_POLL_MAX: Duration = Duration::from_micros(32);

#[derive(Default)]
pub struct DaemonState {
    graph: Graph,
    exports: ExportTable,
    iothreads: Mutex<IoThreads>,
    /// Set by QMP `quit` before it raises SIGTERM, to name the reason.
    quit_requested: AtomicBool,
}

#[derive(Default)]
struct IoThreads {
    all: Vec<IoThread>,
    /// The iothread of exports that name none (QSD runs them in its main
    /// loop; ours is one shared iothread, started on first use).
    shared: Option<IoThreadHandle>,
}

impl DaemonState {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The daemon's block graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn exports(&self) -> &ExportTable {
        &self.exports
    }

    pub fn export(&self, id: &str) -> Option<Arc<BlkExport>> {
        self.exports.find(id)
    }

    fn threads(&self) -> MutexGuard<'_, IoThreads> {
        self.iothreads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start an iothread (its own io_uring ring and executor).
    pub fn add_iothread(&self, name: &str, poll_max: Duration) -> Result<IoThreadHandle, Error> {
        Self::start_iothread(&mut self.threads(), name, poll_max)
    }

    fn start_iothread(
        threads: &mut IoThreads,
        name: &str,
        poll_max: Duration,
    ) -> Result<IoThreadHandle, Error> {
        let t = IoThread::start(name, poll_max)
            .map_err(|e| Error::io(format!("cannot start iothread {name}: {e}")))?;
        let handle = t.handle();
        threads.all.push(t);
        Ok(handle)
    }

    /// `--object iothread,id=ID`: ids are unique.
    pub fn add_named_iothread(&self, id: &str, poll_max: Duration) -> Result<(), Error> {
        let mut threads = self.threads();
        if threads.all.iter().any(|t| t.handle().name() == id) {
            return Err(Error::invalid(format!(
                "attempt to add duplicate property '{id}'"
            )));
        }
        Self::start_iothread(&mut threads, id, poll_max).map(|_| ())
    }

    /// Every iothread, in the order they started.
    pub fn iothreads(&self) -> Vec<IoThreadHandle> {
        self.threads().all.iter().map(IoThread::handle).collect()
    }

    /// The iothreads named `ids`, or the shared one if `ids` is empty
    /// (command-line exports).
    pub fn iothreads_for(&self, ids: &[String]) -> Result<Vec<IoThreadHandle>, Error> {
        let mut threads = self.threads();
        if ids.is_empty() {
            return Ok(vec![Self::shared(&mut threads)?]);
        }
        let all: Vec<_> = threads.all.iter().map(IoThread::handle).collect();
        find_iothreads(&all, ids)
    }

    fn shared(threads: &mut IoThreads) -> Result<IoThreadHandle, Error> {
        if let Some(t) = &threads.shared {
            return Ok(t.clone());
        }
        let t = Self::start_iothread(threads, "main-iothread", SHARED_POLL_MAX)?;
        threads.shared = Some(t.clone());
        Ok(t)
    }

    /// Where an export added over QMP that names no iothread runs: where
    /// command-line exports without one run, else on the first iothread;
    /// a thread is started for it only if there is none at all.
    fn default_iothread(&self) -> Result<IoThreadHandle, Error> {
        let mut threads = self.threads();
        match (&threads.shared, threads.all.first()) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(first)) => Ok(first.handle()),
            (None, None) => Self::shared(&mut threads),
        }
    }

    /// Export `cfg.root`, its queues on `iothreads` (queue k on the k mod
    /// n-th); frontends are accepted from now on.
    pub fn add_export(
        &self,
        cfg: ExportConfig,
        iothreads: Vec<IoThreadHandle>,
    ) -> Result<Arc<BlockBackend>, Error> {
        let id = cfg.id.clone();
        self.exports
            .add(cfg, iothreads)
            .map_err(|e| e.context(format!("export {id}")))
    }

    /// QMP `block-export-add`: `opts` names its iothreads, or none.
    pub fn add_export_from(&self, opts: ExportOptions) -> Result<Arc<BlockBackend>, Error> {
        let ExportOptions { config, iothreads } = opts;
        let handles = if iothreads.is_empty() {
            vec![self.default_iothread()?]
        } else {
            find_iothreads(&self.iothreads(), &iothreads)?
        };
        self.exports.add(config, handles)
    }

    /// QMP `block-export-del`: stop export `id`, then detach it from its
    /// node under the graph lock. Waiting for the frontend's requests
    /// happens before, without the lock, so that a hard delete of a busy
    /// export holds up no other graph change.
    pub fn remove_export(&self, id: &str, hard: bool) -> Result<(), Error> {
        let backend = self.exports.remove(id, hard)?;
        let _g = self.graph.lock();
        backend.eject();
        Ok(())
    }

    /// QMP `quit`: the main thread, waiting for SIGTERM, carries it out.
    pub fn request_quit(&self) {
        self.quit_requested.store(true, Ordering::SeqCst);
        // SAFETY: kill on our own pid; the main thread takes it with sigwait.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }

    /// True once QMP `quit` asked for the shutdown under way.
    pub fn quit_requested(&self) -> bool {
        self.quit_requested.load(Ordering::SeqCst)
    }

    /// Stop every iothread (at the end of shutdown, once nothing runs on
    /// them).
    pub(crate) fn stop_iothreads(&self) {
        let all = std::mem::take(&mut self.threads().all);
        self.threads().shared = None;
        for t in all {
            t.stop();
        }
    }
}

//! The daemon's state: its block graph, its iothreads and its exports. The
//! command lines (`daemon/`, both forms) and QMP (`control/`) drive this
//! one value; neither keeps a copy of any of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::Error;
use crate::graph::throttle::Limits;
use crate::graph::{BlockBackend, Graph};
use crate::opts::Opts;
use crate::os::notify::Notifier;
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
    /// systemd's notification socket, once the daemon said it is ready:
    /// exports added or deleted over QMP update `STATUS=`.
    status: Mutex<Option<Arc<Notifier>>>,
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

    /// The iothread called `id`.
    fn iothread(&self, id: &str) -> Option<IoThreadHandle> {
        self.iothreads().into_iter().find(|t| t.name() == id)
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
        let backend = self.exports.add(config, handles)?;
        self.announce();
        Ok(backend)
    }

    /// What `STATUS=` says: the exports served.
    pub(crate) fn status_line(&self) -> String {
        let ids: Vec<String> = self.exports.list().iter().map(|e| e.id.clone()).collect();
        format!("serving {} export(s): {}", ids.len(), ids.join(", "))
    }

    /// From now on, tell systemd through `n` when the exports change.
    pub(crate) fn announce_to(&self, n: Arc<Notifier>) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    /// The exports changed: a new `STATUS=`, if systemd listens.
    fn announce(&self) {
        let n = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(n) = n {
            if let Err(e) = n.send(&format!("STATUS={}", self.status_line())) {
                log::warn!("telling systemd what is served: {e}");
            }
        }
    }

    /// `--object` and QMP `object-add`: an `iothread` or a
    /// `throttle-group`, with QEMU's properties.
    pub fn add_object(&self, props: Map<String, Value>) -> Result<(), Error> {
        let mut o = Opts::new(props);
        let kind = o.required_string("qom-type")?;
        let id = o.required_string("id")?;
        if !valid_id(&id) {
            return Err(Error::invalid("Parameter 'id' expects an identifier"));
        }
        if self.object_exists(&id) {
            return Err(Error::invalid(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        match kind.as_str() {
            "iothread" => {
                // QEMU's default adaptive polling limit is 32 µs.
                let poll = o.size("poll-max-ns")?.unwrap_or(32_768);
                o.size("poll-grow")?;
                o.size("poll-shrink")?;
                o.size("aio-max-batch")?;
                o.finish()?;
                self.add_named_iothread(&id, Duration::from_nanos(poll))
            }
            "throttle-group" => {
                let limits = Limits::from_properties(o.into_map())?;
                self.graph.throttle_groups().add(&id, limits)
            }
            other => Err(Error::unsupported(format!(
                "object type '{other}' is not supported (iothread, throttle-group)"
            ))),
        }
    }

    fn object_exists(&self, id: &str) -> bool {
        self.graph.throttle_groups().contains(id) || self.iothread(id).is_some()
    }

    /// QMP `object-del`: a throttle group no filter node uses. Iothreads
    /// live as long as the daemon.
    pub fn del_object(&self, id: &str) -> Result<(), Error> {
        if self.iothread(id).is_some() {
            return Err(Error::busy(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.graph.throttle_groups().remove(id)
    }

    /// `qom-get`: property `prop` of object `id` (None: no such object).
    pub fn object_property(&self, id: &str, prop: &str) -> Option<Result<Value, Error>> {
        if let Some(limits) = self.graph.throttle_groups().limits(id) {
            let value = match prop {
                "limits" => Ok(limits.to_json()),
                _ => prop
                    .strip_prefix("x-")
                    .and_then(|m| limits.member(m))
                    .map(Value::from)
                    .ok_or_else(|| not_a_property("throttle-group", prop)),
            };
            return Some(value);
        }
        let t = self.iothread(id)?;
        Some(match prop {
            "poll-max-ns" => Ok(Value::from(t.poll_max().as_nanos() as u64)),
            _ => Err(not_a_property("iothread", prop)),
        })
    }

    /// `qom-set`: a throttle group's `limits` (the members given change);
    /// None: no such object.
    pub fn set_object_property(
        &self,
        id: &str,
        prop: &str,
        value: Value,
    ) -> Option<Result<(), Error>> {
        let groups = self.graph.throttle_groups();
        if groups.contains(id) {
            return Some(match (prop, value) {
                ("limits", Value::Object(update)) => groups.update_limits(id, update),
                ("limits", _) => Err(Error::invalid(
                    "Invalid parameter type for 'limits', expected: object",
                )),
                (p, _) if p.starts_with("x-") && Limits::default().member(&p[2..]).is_some() => {
                    Err(Error::invalid(
                        "Property cannot be set after initialization",
                    ))
                }
                (p, _) => Err(not_a_property("throttle-group", p)),
            });
        }
        let t = self.iothread(id)?;
        Some(Err(Error::unsupported(format!(
            "iothread '{}': property '{prop}' cannot be changed at run time",
            t.name()
        ))))
    }

    /// QMP `block-export-del`: stop export `id`, then detach it from its
    /// node under the graph lock. Waiting for the frontend's requests
    /// happens before, without the lock, so that a hard delete of a busy
    /// export holds up no other graph change.
    pub fn remove_export(&self, id: &str, hard: bool) -> Result<(), Error> {
        let backend = self.exports.remove(id, hard)?;
        {
            let _g = self.graph.lock();
            backend.eject();
        }
        self.announce();
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

    /// Shutdown: requests waiting in throttle queues go on without limits,
    /// so that the daemon stops promptly and loses none.
    pub(crate) fn release_throttles(&self) {
        self.graph.throttle_groups().release_all();
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

fn not_a_property(kind: &str, prop: &str) -> Error {
    Error::not_found(format!("Property '{kind}.{prop}' not found"))
}

/// QEMU's object ids: letters, digits, '-', '.', '_', starting with a letter.
fn valid_id(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

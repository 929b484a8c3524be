//! Background jobs on the graph, with QEMU's job model: ids, the status
//! state machine (`created` → `running` → `ready` → `waiting` → `pending`
//! → `concluded` → `null`, or `aborting` on the way out), the verbs
//! (`complete`, `finalize`, `cancel`, `dismiss`), `query-jobs` /
//! `query-block-jobs` answers and the events QMP clients wait for
//! (`JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`, `BLOCK_JOB_PENDING`,
//! `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`).
//!
//! What a job does is its driver's business (see `commit`). Verbs run on
//! the control thread under the graph lock; a job's own thread only copies
//! data, and takes the graph lock to wind up after an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::{json, Value};

use super::registry::Graph;
use crate::error::Error;

/// QEMU's JobStatus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JobStatus {
    Created,
    Running,
    Ready,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Ready => "ready",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// What a kind of job does when a verb reaches it.
pub(super) trait JobDriver: Send + Sync {
    /// `job-complete`: get ready to finish (a commit catches up, inside a
    /// drained section it keeps until `finalize` or `abort`). An error is
    /// the job's failure, reported in its completion event; the job has
    /// undone its graph changes by then.
    fn prepare_completion(&self) -> Result<(), Error>;
    /// Make the result part of the graph (a commit pivots).
    fn finalize(&self);
    /// Undo the job's graph changes and stop its thread (cancel, failure,
    /// shutdown).
    fn abort(&self);
    /// Bytes known to be left to do.
    fn remaining(&self) -> u64;
    /// Whether the job is paused by a drained section right now.
    fn paused(&self) -> bool;
    /// Whether the job is copying right now.
    fn busy(&self) -> bool;
}

struct State {
    status: JobStatus,
    error: Option<String>,
}

pub(crate) struct Job {
    id: String,
    /// QEMU's JobType name (`commit`).
    kind: &'static str,
    state: Mutex<State>,
    /// Bytes done (QEMU's `offset`; its `len` is this plus what is left).
    offset: AtomicU64,
    auto_finalize: bool,
    auto_dismiss: bool,
    driver: Mutex<Option<Arc<dyn JobDriver>>>,
    /// The job list it is in (weak: the list holds the job).
    jobs: Weak<Jobs>,
}

type Sink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// A graph's jobs (those not yet dismissed), and where their events go.
#[derive(Default)]
pub struct Jobs {
    list: Mutex<Vec<Arc<Job>>>,
    sink: Mutex<Option<Sink>>,
}

fn err<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::invalid(msg))
}

impl Jobs {
    fn list(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where job events go (the QMP server sends them to its clients).
    pub fn set_event_sink(&self, sink: impl Fn(&str, Value) + Send + Sync + 'static) {
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(sink));
    }

    fn emit(&self, name: &str, data: Value) {
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(sink) = sink {
            sink(name, data);
        }
    }

    /// Whether a job called `id` exists (not yet dismissed).
    pub fn exists(&self, id: &str) -> bool {
        self.list().iter().any(|j| j.id == id)
    }

    /// The job called `id`, if it exists.
    fn find(&self, id: &str) -> Result<Arc<Job>, Error> {
        self.list()
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| Error::not_found("Job not found"))
    }
}

impl Job {
    /// Register a new job (status `created`) in `jobs`; ids are unique
    /// among jobs not yet dismissed.
    pub(super) fn register(
        jobs: &Arc<Jobs>,
        id: &str,
        kind: &'static str,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> Result<Arc<Job>, Error> {
        if id.is_empty() || id.starts_with('#') {
            return err(format!("Invalid job ID '{id}'"));
        }
        let mut all = jobs.list();
        if all.iter().any(|j| j.id == id) {
            return Err(Error::busy(format!("Job ID '{id}' already in use")));
        }
        let job = Arc::new(Job {
            id: id.to_string(),
            kind,
            state: Mutex::new(State {
                status: JobStatus::Created,
                error: None,
            }),
            offset: AtomicU64::new(0),
            auto_finalize,
            auto_dismiss,
            driver: Mutex::new(None),
            jobs: Arc::downgrade(jobs),
        });
        all.push(job.clone());
        drop(all);
        job.announce(JobStatus::Created);
        Ok(job)
    }

    /// Forget a job whose start failed (it never ran).
    pub(super) fn unregister(&self) {
        if let Some(jobs) = self.jobs.upgrade() {
            jobs.list().retain(|j| j.id != self.id);
        }
    }

    fn emit(&self, name: &str, data: Value) {
        if let Some(jobs) = self.jobs.upgrade() {
            jobs.emit(name, data);
        }
    }

    pub(super) fn set_driver(&self, d: Arc<dyn JobDriver>) {
        *self.driver.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }

    fn driver(&self) -> Option<Arc<dyn JobDriver>> {
        self.driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn status(&self) -> JobStatus {
        self.state().status
    }

    fn announce(&self, s: JobStatus) {
        self.emit(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": s.name()}),
        );
    }

    /// Move to `to` and tell the clients.
    pub(super) fn set_status(&self, to: JobStatus) {
        self.state().status = to;
        self.announce(to);
    }

    pub(super) fn add_progress(&self, n: u64) {
        self.offset.fetch_add(n, Ordering::Relaxed);
    }

    /// (done, total) in bytes.
    fn done_and_total(&self) -> (u64, u64) {
        let done = self.offset.load(Ordering::Relaxed);
        let left = self.driver().map_or(0, |d| d.remaining());
        (done, done.saturating_add(left))
    }

    fn progress(&self) -> Value {
        let (offset, len) = self.done_and_total();
        self.progress_as(offset, len)
    }

    fn progress_as(&self, offset: u64, len: u64) -> Value {
        json!({
            "type": self.kind,
            "device": self.id,
            "len": len,
            "offset": offset,
            // Jobs run unthrottled (block-commit refuses a speed).
            "speed": 0,
        })
    }

    /// The job caught up: `ready`, and BLOCK_JOB_READY. It reports what
    /// was true when it caught up (all done), even if the guest has dirtied
    /// more since.
    pub(super) fn ready(&self) {
        self.set_status(JobStatus::Ready);
        let done = self.offset.load(Ordering::Relaxed);
        self.emit("BLOCK_JOB_READY", self.progress_as(done, done));
    }

    /// The job ends: success (`error` None, after `pending`), failure or
    /// cancellation. Emits QEMU's events in QEMU's order and, with
    /// auto-dismiss, goes.
    pub(super) fn conclude(&self, error: Option<String>, cancelled: bool) {
        if error.is_some() || cancelled {
            self.set_status(JobStatus::Aborting);
        }
        let mut data = self.progress();
        if cancelled {
            self.emit("BLOCK_JOB_CANCELLED", data);
        } else {
            if let Some(e) = &error {
                data["error"] = json!(e);
            }
            self.emit("BLOCK_JOB_COMPLETED", data);
        }
        self.state().error = error;
        self.set_status(JobStatus::Concluded);
        *self.driver.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if self.auto_dismiss {
            self.dismiss_now();
        }
    }

    fn dismiss_now(&self) {
        self.set_status(JobStatus::Null);
        self.unregister();
    }

    fn refuse(&self, verb: &str) -> Error {
        Error::busy(format!(
            "Job '{}' in state '{}' cannot accept command verb '{verb}'",
            self.id,
            self.status().name()
        ))
    }
}

impl Jobs {
    /// `job-complete`: only a job that is `ready`. Without auto-finalize it
    /// stops at `pending` (BLOCK_JOB_PENDING) until `job-finalize`.
    pub fn complete(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        if job.status() != JobStatus::Ready {
            return Err(job.refuse("complete"));
        }
        let Some(d) = job.driver() else {
            return Err(job.refuse("complete"));
        };
        if let Err(e) = d.prepare_completion() {
            job.conclude(Some(e.to_string()), false);
            return Ok(());
        }
        job.set_status(JobStatus::Waiting);
        job.set_status(JobStatus::Pending);
        if job.auto_finalize {
            d.finalize();
            job.conclude(None, false);
        } else {
            self.emit("BLOCK_JOB_PENDING", json!({"type": job.kind, "id": job.id}));
        }
        Ok(())
    }

    /// `job-finalize`: only a job that is `pending`.
    pub fn finalize(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        let d = match (job.status(), job.driver()) {
            (JobStatus::Pending, Some(d)) => d,
            _ => return Err(job.refuse("finalize")),
        };
        d.finalize();
        job.conclude(None, false);
        Ok(())
    }

    /// `job-cancel`: undo what the job did; it ends with BLOCK_JOB_CANCELLED.
    pub fn cancel(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        let Some(d) = job.driver() else {
            return Err(job.refuse("cancel"));
        };
        d.abort();
        job.conclude(None, true);
        Ok(())
    }

    /// `job-dismiss`: forget a concluded job.
    pub fn dismiss(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        if job.status() != JobStatus::Concluded {
            return Err(job.refuse("dismiss"));
        }
        job.dismiss_now();
        Ok(())
    }

    /// Shutdown: cancel every job before the trees are ejected, so their
    /// graph changes are undone and their threads gone. The caller holds the
    /// graph lock.
    pub fn cancel_all(&self) {
        let all: Vec<Arc<Job>> = self.list().clone();
        for j in all {
            if let Some(d) = j.driver() {
                log::info!("job {}: cancelled at shutdown", j.id);
                d.abort();
                j.conclude(None, true);
            }
        }
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Value {
        Value::Array(
            self.list()
                .iter()
                .map(|j| {
                    let (done, total) = j.done_and_total();
                    let st = j.state();
                    let mut v = json!({
                        "id": j.id,
                        "type": j.kind,
                        "status": st.status.name(),
                        "current-progress": done,
                        "total-progress": total,
                    });
                    if let Some(e) = &st.error {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect(),
        )
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Value {
        Value::Array(
            self.list()
                .iter()
                .map(|j| {
                    let (status, error) = {
                        let st = j.state();
                        (st.status, st.error.clone())
                    };
                    let d = j.driver();
                    let mut v = j.progress();
                    v["busy"] = json!(d.as_ref().is_some_and(|d| d.busy()));
                    v["paused"] = json!(d.as_ref().is_some_and(|d| d.paused()));
                    v["io-status"] = json!("ok");
                    v["ready"] = json!(status == JobStatus::Ready);
                    v["status"] = json!(status.name());
                    v["auto-finalize"] = json!(j.auto_finalize);
                    v["auto-dismiss"] = json!(j.auto_dismiss);
                    if let Some(e) = error {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect(),
        )
    }
}

/// A job's thread failed: undo its graph changes and report the error.
/// Runs on a thread of its own, not the job's (which abort joins).
pub(super) fn fail(graph: &Graph, job: Arc<Job>, error: Error) {
    let _g = graph.lock();
    let Some(d) = job.driver() else {
        return; // Completed or cancelled meanwhile.
    };
    log::error!("job {}: {error}", job.id);
    d.abort();
    job.conclude(Some(error.to_string()), false);
}

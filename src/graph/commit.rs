//! Active commit (QEMU's `block-commit` of the active layer): merge an
//! overlay chain back into its base while the guest keeps writing.
//!
//! Start: in a drained section of the top and the base (the rest of the
//! graph goes on), the base is reopened read-write and a
//! `commit_top` filter node goes between the BlockBackends and the top
//! node; it passes every request down and, once a write has completed,
//! marks its granules dirty. A job thread first marks every granule some
//! layer above the base holds, then copies dirty granules from the top
//! (reading through the chain gives exactly what the guest sees) into the
//! base, and reports `ready` once it has caught up.
//!
//! `job-complete` flushes the base while the guest still runs, then drains
//! the top and the base, copies what the guest wrote since (little: the job
//! keeps up) and points the BlockBackends at the base; once the section
//! has ended the base is flushed again and the job reports completion. The
//! guest now writes the base, and the overlays close (their files stay:
//! nothing the user did not ask for is deleted). Cancel points the
//! BlockBackends back at the top.
//!
//! Crash safety: the base only ever receives data the top also shows for
//! the same granule, so at any moment the chain reads the same as before;
//! a restart on the top image sees everything flushed through it.
//!
//! The job is a parent of the top and the base (QEMU: a BdrvChild of the
//! job): draining either pauses it between copies, and a drain waits for
//! the copy in progress.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::backend::move_users;
use super::blockdev::check_new_node_name;
use super::dirty::DirtyMap;
use super::drain::Drained;
use super::in_flight::{InFlight, InFlightCounter};
use super::job::{Job, JobDriver, JobStatus};
use super::node::{Child, ChildRole, Node};
use super::parent::Parent;
use super::snapshot::check_top;
use crate::error::Error;
use crate::formats::{failed, BlockDriver, BlockIo, IoFuture};
use crate::uring::{self, AlignedBuf, IoThread, IoVec};

/// The filter's driver name (QEMU's is `commit_top` too).
pub(super) const FILTER_DRIVER: &str = "commit_top";
/// Dirty tracking granularity: 64 KiB, qcow2's default cluster size.
const GRANULE_BITS: u32 = 16;
/// Granules whose allocation the first pass looks up per drained check.
const SCAN_BATCH: u64 = 256;

/// What `block-commit` asks for.
pub(crate) struct CommitOptions {
    pub job_id: String,
    /// The active layer (the root of an export's tree).
    pub top: Arc<Node>,
    /// Where the data goes; None: the bottom of the chain (QEMU's default).
    pub base: Option<Arc<Node>>,
    /// The filter node's name (default: `#blockNNN`).
    pub filter_node_name: Option<String>,
    /// False: `job-complete` stops at `pending` until `job-finalize`.
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

fn err<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::invalid(msg))
}

/// The filter between the BlockBackends and the top during a commit.
struct CommitTop {
    top: Arc<Node>,
    dirty: Arc<DirtyMap>,
}

impl CommitTop {
    /// Run a write-like request, then mark what it changed.
    fn marking<'a>(&'a self, offset: u64, len: u64, fut: IoFuture<'a>) -> IoFuture<'a> {
        Box::pin(async move {
            let r = fut.await;
            // Marked even on failure: part of it may have landed.
            self.dirty.mark(offset, len);
            r
        })
    }
}

impl BlockIo for CommitTop {
    fn size(&self) -> u64 {
        self.top.size()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.top.read(offset, buf)
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.marking(offset, buf.len() as u64, self.top.write(offset, buf))
    }
    fn flush(&self) -> IoFuture<'_> {
        self.top.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.marking(offset, len, self.top.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.marking(offset, len, self.top.write_zeroes(offset, len, may_unmap))
    }
    fn grow(&self, _new_size: u64) -> IoFuture<'_> {
        failed(io::Error::new(
            io::ErrorKind::ResourceBusy,
            "a commit job is running on this disk; complete or cancel it first",
        ))
    }
}

impl BlockDriver for CommitTop {
    fn driver_name(&self) -> &'static str {
        FILTER_DRIVER
    }
    fn is_read_only(&self) -> bool {
        self.top.is_read_only()
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

struct Commit {
    job: Arc<Job>,
    top: Arc<Node>,
    base: Arc<Node>,
    base_was_read_only: bool,
    /// The filter, until the job ends.
    filter: Mutex<Option<Arc<Node>>>,
    dirty: Arc<DirtyMap>,
    /// Drained sections covering the top or the base right now.
    paused: AtomicU32,
    stop: AtomicBool,
    /// The drained section (of the top and the base) `job-complete` began
    /// and `finalize` (or `abort`) ends.
    completing: Mutex<Option<Drained>>,
    /// A copy in progress (what a drain waits for).
    busy: InFlightCounter,
    /// Our entries in the top's and the base's parent lists.
    edges: Mutex<Vec<(Arc<Node>, u64)>>,
    io: Mutex<Option<IoThread>>,
}

/// Start an active commit job.
pub(crate) fn start_commit(o: CommitOptions) -> Result<(), Error> {
    let top = o.top;
    check_top(&top)?;
    let mut chain = Vec::new();
    let mut at = top.child(ChildRole::Backing);
    while let Some(n) = at {
        at = n.child(ChildRole::Backing);
        chain.push(n);
    }
    let Some(bottom) = chain.last().cloned() else {
        // QEMU's words: the base would be the top itself.
        return err("cannot commit an image into itself");
    };
    let base = match o.base {
        Some(b) if chain.iter().any(|n| Arc::ptr_eq(n, &b)) => b,
        Some(b) => {
            return err(format!(
                "Node '{}' is not in the backing chain of '{}'",
                b.name(),
                top.name()
            ))
        }
        None => bottom,
    };
    let g = top.graph().clone();
    if let Some(n) = &o.filter_node_name {
        check_new_node_name(&g, n)?;
    }
    let job = Job::register(
        g.jobs(),
        &o.job_id,
        "commit",
        o.auto_finalize,
        o.auto_dismiss,
    )?;
    // Only this disk's nodes: the rest of the graph goes on.
    let section = Drained::begin(vec![top.clone(), base.clone()]);
    let started = install(&job, &top, &base, o.filter_node_name);
    drop(section);
    let commit = match started {
        Ok(c) => c,
        Err(e) => {
            job.set_status(JobStatus::Null);
            job.unregister();
            return Err(e);
        }
    };
    let io = IoThread::start(&format!("job-{}", o.job_id), std::time::Duration::ZERO);
    let io = match io {
        Ok(io) => io,
        Err(e) => {
            commit.abort();
            job.set_status(JobStatus::Null);
            job.unregister();
            return Err(Error::io(format!("Cannot start the job's thread: {e}")));
        }
    };
    let handle = io.handle();
    *commit.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
    job.set_driver(commit.clone());
    job.set_status(JobStatus::Running);
    log::info!(
        "job {}: committing '{}' into '{}'",
        job.id(),
        top.name(),
        base.name()
    );
    handle.run(move || uring::spawn(commit.run()));
    Ok(())
}

/// The graph changes of a starting commit (inside the caller's drain).
fn install(
    job: &Arc<Job>,
    top: &Arc<Node>,
    base: &Arc<Node>,
    filter_name: Option<String>,
) -> Result<Arc<Commit>, Error> {
    let base_was_read_only = base.is_read_only();
    base.reopen(false)
        .map_err(|e| Error::io(format!("Cannot commit into '{}': {e}", base.name())))?;
    let dirty = Arc::new(DirtyMap::new(top.size(), GRANULE_BITS));
    let g = top.graph();
    let filter = Node::new(
        g,
        &filter_name.unwrap_or_else(|| g.auto_node_name()),
        Box::new(CommitTop {
            top: top.clone(),
            dirty: dirty.clone(),
        }),
        vec![Child {
            role: ChildRole::Backing,
            node: top.clone(),
        }],
    );
    let commit = Arc::new(Commit {
        job: job.clone(),
        top: top.clone(),
        base: base.clone(),
        base_was_read_only,
        filter: Mutex::new(Some(filter.clone())),
        dirty,
        paused: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        completing: Mutex::new(None),
        busy: InFlightCounter::new(),
        edges: Mutex::new(Vec::new()),
        io: Mutex::new(None),
    });
    let me: Weak<dyn Parent> = Arc::downgrade(&commit) as Weak<dyn Parent>;
    for n in [top, base] {
        let edge = n.parents.attach(me.clone(), n.quiesce_counter() > 0);
        commit.edges().push((n.clone(), edge));
    }
    move_users(top, &filter);
    Ok(commit)
}

impl Commit {
    fn edges(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<Node>, u64)>> {
        self.edges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait while paused; None once the job is stopping. The returned
    /// guard makes a drain wait for the copy it covers. SeqCst with
    /// `drained_begin`: either the drain sees us busy, or we see it.
    fn enter(&self) -> Option<InFlight<'_>> {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let g = self.busy.guard();
            if self.paused.load(Ordering::SeqCst) == 0 {
                return Some(g);
            }
            drop(g);
            self.dirty.wait_until(|| {
                self.paused.load(Ordering::SeqCst) == 0 || self.stop.load(Ordering::SeqCst)
            });
        }
    }

    /// Whether some layer above the base holds the data at `offset`.
    async fn allocated_above_base(&self, offset: u64) -> io::Result<bool> {
        let mut layer = self.top.clone();
        while !Arc::ptr_eq(&layer, &self.base) {
            if layer.is_allocated(offset).await? {
                return Ok(true);
            }
            match layer.child(ChildRole::Backing) {
                Some(b) => layer = b,
                None => break,
            }
        }
        Ok(false)
    }

    async fn copy(&self, offset: u64, len: u64) -> io::Result<()> {
        let buf = IoVec::from_buf(AlignedBuf::zeroed(len as usize, 4096));
        self.top.read(offset, &buf).await?;
        self.base.write(offset, &buf).await
    }

    /// The job thread: mark what the overlays hold, then copy until told
    /// to stop. An error ends the job (from another thread: winding up
    /// joins this one).
    async fn run(self: Arc<Self>) {
        if let Err(e) = self.copy_until_stopped().await {
            let (job, g) = (self.job.clone(), self.top.graph().clone());
            std::thread::spawn(move || super::job::fail(&g, job, e));
        }
    }

    async fn copy_until_stopped(&self) -> Result<(), Error> {
        let gran = self.dirty.granularity();
        let granules = self.dirty.granules();
        let mut g = 0;
        while g < granules {
            let Some(_busy) = self.enter() else {
                return Ok(());
            };
            for g in g..(g + SCAN_BATCH).min(granules) {
                let allocated = self.allocated_above_base(g * gran).await.map_err(|e| {
                    Error::io(format!(
                        "reading the allocation at offset {}: {e}",
                        g * gran
                    ))
                })?;
                if allocated {
                    self.dirty.mark(g * gran, gran);
                }
            }
            g += SCAN_BATCH;
        }
        let mut ready = false;
        loop {
            let Some(busy) = self.enter() else {
                return Ok(());
            };
            match self.dirty.take_run() {
                Some((offset, len)) => {
                    if let Err(e) = self.copy(offset, len).await {
                        self.dirty.mark(offset, len);
                        return Err(Error::io(format!(
                            "copying {len} bytes at offset {offset}: {e}"
                        )));
                    }
                    drop(busy);
                    self.job.add_progress(len);
                }
                None => {
                    drop(busy);
                    if !ready {
                        ready = true;
                        self.job.ready();
                    }
                    self.dirty
                        .sleep_while_clean(|| !self.stop.load(Ordering::SeqCst));
                }
            }
        }
    }

    /// Stop the job thread and wait for it (never from the job thread).
    fn stop_thread(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.dirty.notify();
        let io = self.io.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(io) = io {
            io.stop();
        }
    }

    /// Leave the parent lists of the top and the base.
    fn detach(&self) {
        for (n, edge) in std::mem::take(&mut *self.edges()) {
            n.parents.detach(edge);
        }
    }

    fn take_filter(&self) -> Option<Arc<Node>> {
        self.filter.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn completing(&self) -> std::sync::MutexGuard<'_, Option<Drained>> {
        self.completing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copy what is still dirty (the top and the base drained).
    fn catch_up(&self) -> Result<(), Error> {
        let r = uring::block_on(|| async {
            while let Some((offset, len)) = self.dirty.take_run() {
                self.copy(offset, len).await.map_err(|e| {
                    Error::io(format!("copying {len} bytes at offset {offset}: {e}"))
                })?;
                self.job.add_progress(len);
            }
            Ok(())
        });
        r.map_err(|e| Error::io(e.to_string())).and_then(|r| r)
    }

    /// Make what was copied into the base durable (no drained section
    /// needed: the guest may go on meanwhile).
    fn flush_base(&self) -> Result<(), Error> {
        let base = self.base.clone();
        let r = uring::block_on(move || async move { base.flush().await });
        r.and_then(|r| r)
            .map_err(|e| Error::io(format!("flushing '{}': {e}", self.base.name())))
    }
}

impl JobDriver for Commit {
    fn prepare_completion(&self) -> Result<(), Error> {
        // The slow part first, with the guest running: what the job copied
        // so far reaches the disk. The drained section, of this disk's
        // nodes only, then covers just the copy of what the guest wrote
        // since; the flush of that comes after the pivot.
        self.flush_base().inspect_err(|_| self.abort())?;
        let section = Drained::begin(vec![self.top.clone(), self.base.clone()]);
        *self.completing() = Some(section);
        self.catch_up().inspect_err(|_| self.abort())
    }

    fn finalize(&self) {
        let filter = self.take_filter();
        if let Some(f) = &filter {
            move_users(f, &self.base);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.detach();
        drop(self.completing().take());
        self.stop_thread();
        // The last copies, before the job reports that it completed.
        if let Err(e) = self.flush_base() {
            log::error!("job {}: {e}", self.job.id());
        }
        log::info!(
            "job {}: '{}' committed; the disk is on '{}' now",
            self.job.id(),
            self.top.name(),
            self.base.name()
        );
        // The filter goes, and with it the overlays nobody else holds.
        drop(filter);
    }

    fn abort(&self) {
        let section = Drained::begin(vec![self.top.clone(), self.base.clone()]);
        self.stop.store(true, Ordering::SeqCst);
        let filter = self.take_filter();
        if let Some(f) = &filter {
            move_users(f, &self.top);
        }
        if self.base_was_read_only {
            if let Err(e) = self.base.reopen(true) {
                log::warn!("job {}: {e}; it stays writable", self.job.id());
            }
        }
        self.detach();
        drop(section);
        drop(self.completing().take());
        self.stop_thread();
        // What was copied reaches the disk, so that the base is
        // consistent there too (a read-only node flushes as well).
        if let Err(e) = self.flush_base() {
            log::error!("job {}: {e}", self.job.id());
        }
        drop(filter);
    }

    fn remaining(&self) -> u64 {
        self.dirty.dirty_bytes()
    }

    fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) > 0
    }

    fn busy(&self) -> bool {
        self.busy.get() > 0
    }
}

/// Draining the top or the base pauses the job between copies.
impl Parent for Commit {
    fn drained_begin(&self) {
        self.paused.fetch_add(1, Ordering::SeqCst);
    }
    fn drained_end(&self) {
        if self.paused.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.dirty.notify();
        }
    }
    fn drained_poll(&self, parked: u64) -> bool {
        self.busy.get() > parked
    }
    fn resized(&self) {}
}

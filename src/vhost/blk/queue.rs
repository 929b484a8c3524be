//! One virtqueue served on its iothread: pop chains on kicks, run each
//! request as a task, put completions on the used ring and notify the guest
//! once per loop turn.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::future::{poll_fn, Future};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Poll, Waker};
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::chain;
use super::request::{self, Op, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use super::ring::RingView;
use super::state::{ExportState, QueueInFlight};
use super::stats::OpKind;
use crate::error::Error;
use crate::graph::HeldRoot;
use crate::os::ratelimit::LogLimiter;
use crate::uring::{self, ops};
use crate::vhost::device::RunningQueue;
use crate::vhost::dirty_log::{self, DirtyLog};
use crate::vhost::inflight::{self, QueueInflight};
use crate::vhost::memory::{GuestRam, SharedMemory};
use crate::vhost::published::LocalCopy;
use crate::vhost::vring::{ring_sizes, CallFd, QueueSetup};

/// How often a queue slow to stop says so.
const STOP_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Shared between the vhost thread and the queue's task.
pub(crate) struct QueueControl {
    index: u16,
    stop: AtomicBool,
    /// Set by `wake`: look at the avail ring again.
    woken: AtomicBool,
    /// The task's waker while it waits for a kick. Waking goes through it,
    /// never through the kick eventfd, which the frontend shares and may
    /// have saturated or made blocking.
    waker: Mutex<Option<Waker>>,
    /// Set by the task when it has stopped: the next avail index.
    stopped: Mutex<Option<u16>>,
    stopped_cv: Condvar,
    /// The rings' guest-physical ranges: memory they need while running.
    rings: [(u64, u64); 3],
}

impl QueueControl {
    /// Make the queue look at its avail ring again (to stop, or after a
    /// drained section).
    pub(crate) fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl RunningQueue for Arc<QueueControl> {
    fn ring_ranges(&self) -> [(u64, u64); 3] {
        self.rings
    }

    fn stop_and_wait(&self) -> u16 {
        self.stop.store(true, Ordering::Release);
        // Wake the task if it waits for a kick.
        self.wake();
        // Nothing the frontend does can hold the task now (its fds are
        // non-blocking eventfds, its memory faults are absorbed): what we
        // wait for is the backend finishing in-flight requests, which we
        // must not abandon. Say so if that takes long.
        let started = Instant::now();
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(idx) = *stopped {
                return idx;
            }
            let (guard, timeout) = self
                .stopped_cv
                .wait_timeout(stopped, STOP_REPORT_INTERVAL)
                .unwrap_or_else(|e| e.into_inner());
            stopped = guard;
            if timeout.timed_out() && stopped.is_none() {
                log::warn!(
                    "queue {}: still stopping after {} s: waiting for its in-flight requests",
                    self.index,
                    started.elapsed().as_secs()
                );
            }
        }
    }
}

struct Worker {
    index: u16,
    queue: RefCell<Queue>,
    shared_mem: Arc<SharedMemory>,
    /// The current guest memory, wrapped in an `Rc` of this queue's own:
    /// requests clone that one (to keep their buffers mapped), a plain add
    /// on memory only this iothread touches, instead of a locked one on
    /// the count every queue of the frontend shares.
    mem: LocalCopy<Arc<GuestRam>>,
    /// The avail and used rings in our mapping of `mem` (None: not looked
    /// up yet). See [`Worker::rings`].
    rings: Cell<Option<RingView>>,
    /// Used entries added since the last notification check.
    used_added: Cell<u16>,
    indirect: bool,
    kick: Arc<File>,
    call: Arc<CallFd>,
    /// This iothread's copy of `call`.
    call_copy: LocalCopy<Option<Arc<File>>>,
    control: Arc<QueueControl>,
    export: Arc<ExportState>,
    idle: RefCell<Option<Waker>>,
    signal_scheduled: Cell<bool>,
    /// The guest broke the ring (e.g. avail index beyond the queue size);
    /// nothing more is popped until the ring is set up again.
    broken: Cell<bool>,
    /// Guest notifications are off because the iothread is polling us.
    polling: Cell<bool>,
    /// Whether the driver reaps by polling the used ring; while it does,
    /// `driver_polls` counts its spinning CPU against our spinning budget.
    poll_detector: RefCell<uring::DriverPollDetector>,
    driver_polls: RefCell<Option<uring::PollingDriver>>,
    /// A chain walked and parsed without awaiting in between, kept so its
    /// buffers' capacity serves every request (no allocation per walk).
    scratch: Cell<chain::Chain>,
    log: LogLimiter,
    /// Inflight tracking (INFLIGHT_SHMFD): heads are marked when popped
    /// and cleared around their used entry.
    inflight: Option<QueueInflight>,
    /// Requests a previous daemon left in flight, in pop order: run
    /// before anything new is popped.
    resubmit: RefCell<Vec<u16>>,
    /// Migration: guest pages we write are marked here while it is on.
    dirty_log: Arc<DirtyLog>,
    event_idx: bool,
}

impl uring::Poller for Worker {
    fn poll(self: Rc<Self>) -> bool {
        if self.stopped() {
            return false;
        }
        let pending = self
            .avail_idx_now()
            .is_some_and(|idx| idx != self.queue.borrow().next_avail());
        pending && self.process_avail(false)
    }

    fn poll_end(self: Rc<Self>) -> bool {
        if !self.polling.get() {
            return false;
        }
        self.process_avail(true)
    }

    fn io_in_flight(&self) -> bool {
        self.in_flight().get() > 0
    }

    fn driver_polls(&self) -> bool {
        self.driver_polls.borrow().is_some()
    }
}

/// Build the queue on the calling (vhost) thread and start it on `thread`.
/// Signal `call` once, from the current iothread, without ever waiting;
/// a counter the frontend left full is not an error worth a log line.
pub(crate) fn signal_once(call: Arc<File>, index: usize) {
    uring::spawn(async move {
        let fd = call.as_raw_fd();
        if let Err(e) = ops::signal_eventfd_nowait(fd, call).await {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("vring {index}: signalling the new call fd: {e}");
            }
        }
    });
}

pub(crate) fn start(
    setup: QueueSetup,
    shared_mem: Arc<SharedMemory>,
    export: Arc<ExportState>,
    thread: &uring::IoThreadHandle,
) -> Result<Arc<QueueControl>, Error> {
    let mut q = Queue::new(setup.size)
        .map_err(|e| Error::invalid(format!("queue {}: {e}", setup.index)))?;
    q.set_size(setup.size);
    q.try_set_desc_table_address(GuestAddress(setup.desc_table))
        .and_then(|_| q.try_set_avail_ring_address(GuestAddress(setup.avail_ring)))
        .and_then(|_| q.try_set_used_ring_address(GuestAddress(setup.used_ring)))
        .map_err(|e| Error::invalid(format!("queue {}: bad ring address: {e}", setup.index)))?;
    q.set_event_idx(setup.event_idx);
    q.set_next_avail(setup.next_avail);
    let (gen, mem) = shared_mem.load();
    let sz = ring_sizes(setup.size, setup.event_idx);
    let rings = [
        (setup.desc_table, sz.desc),
        (setup.avail_ring, sz.avail),
        (setup.used_ring, sz.used),
    ];
    if let Some((gpa, len)) = rings.iter().find(|(g, l)| mem.host_range(*g, *l).is_none()) {
        return Err(Error::invalid(format!(
            "queue {}: ring at gpa {gpa:#x} ({len} bytes) is not inside one memory region",
            setup.index
        )));
    }
    // The used index lives in guest memory; resume from it.
    let used = q.used_idx(mem.mmap(), Ordering::Acquire).map_err(|e| {
        Error::invalid(format!(
            "queue {}: used ring not in guest memory: {e}",
            setup.index
        ))
    })?;
    q.set_next_used(used.0);
    // A region from a previous daemon says what was popped and has no used
    // entry: those run again, and popping resumes after them.
    let mut resubmit = Vec::new();
    if let Some(t) = &setup.inflight {
        let rec = t.recover(used.0);
        for what in &rec.repaired {
            log::warn!("queue {}: inflight region: {what}", setup.index);
        }
        if let Some(next) = rec.next_avail {
            if next != setup.next_avail || !rec.resubmit.is_empty() {
                log::info!(
                    "queue {}: resuming at avail index {next} (frontend said {}), {} requests to resubmit",
                    setup.index,
                    setup.next_avail,
                    rec.resubmit.len()
                );
            }
            q.set_next_avail(next);
        }
        resubmit = rec.resubmit;
    }
    q.set_ready(true);
    if !q.is_valid(mem.mmap()) {
        return Err(Error::invalid(format!(
            "queue {}: rings are not inside guest memory",
            setup.index
        )));
    }
    let control = Arc::new(QueueControl {
        index: setup.index,
        stop: AtomicBool::new(false),
        woken: AtomicBool::new(false),
        waker: Mutex::new(None),
        stopped: Mutex::new(None),
        stopped_cv: Condvar::new(),
        rings,
    });
    export.add_running(&control);
    let ctl = control.clone();
    let (index, indirect, kick, call) = (setup.index, setup.indirect, setup.kick, setup.call);
    let tracker = setup.inflight;
    let (dirty_log, event_idx) = (setup.dirty_log, setup.event_idx);
    thread.run(move || {
        let worker = Rc::new(Worker {
            index,
            queue: RefCell::new(q),
            shared_mem,
            mem: LocalCopy::new((gen, mem)),
            rings: Cell::new(None),
            used_added: Cell::new(0),
            indirect,
            kick,
            call_copy: LocalCopy::new(call.load()),
            call,
            control: ctl,
            export,
            idle: RefCell::new(None),
            signal_scheduled: Cell::new(false),
            broken: Cell::new(false),
            polling: Cell::new(false),
            poll_detector: RefCell::default(),
            driver_polls: RefCell::new(None),
            scratch: Cell::new(chain::Chain::default()),
            log: LogLimiter::default(),
            inflight: tracker,
            resubmit: RefCell::new(resubmit),
            dirty_log,
            event_idx,
        });
        uring::spawn(worker.run());
    });
    Ok(control)
}

/// Guest memory as a queue holds it (see `Worker::mem`).
type QueueRam = Rc<Arc<GuestRam>>;

/// The next kick: the frontend signalled the kick eventfd.
async fn wait_kick(kick: Arc<File>) -> std::io::Result<()> {
    let fd = kick.as_raw_fd();
    match ops::read_eventfd(fd, kick.clone()).await {
        // A non-blocking eventfd read on a kernel that does not retry it in
        // the ring: wait for it in the ring, then read again.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            ops::wait_readable(fd, kick.clone()).await?;
            match ops::read_eventfd(fd, kick).await {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                r => r,
            }
        }
        r => r,
    }
}

impl Worker {
    fn memory(&self) -> QueueRam {
        self.mem.get(&self.shared_mem)
    }

    /// The avail index, as the polling loop reads it on every spin: one
    /// atomic load (translating the ring's address on each spin was ~14% of
    /// a polling profile). None if the ring is not in memory.
    fn avail_idx_now(&self) -> Option<u16> {
        self.rings().map(|r| r.avail_idx())
    }

    /// The rings in the current guest memory, looked up once per memory
    /// generation; None if they are not inside it (the frontend moved its
    /// memory from under them).
    fn rings(&self) -> Option<RingView> {
        if let Some(r) = self.rings.get() {
            if r.generation() == self.shared_mem.generation() {
                return Some(r);
            }
        }
        let mem = self.memory();
        let gen = self.mem.generation();
        let q = self.queue.borrow();
        // SAFETY: `self.mem` holds `mem`, the memory of generation `gen`,
        // until the shared generation moves past `gen` (it never goes
        // back), and the check above then makes a new view before this one
        // is used again. A frontend that shrinks that memory under us makes
        // accesses through the view guest-fault-absorbed ones.
        let view = unsafe {
            RingView::new(
                &mem,
                gen,
                q.avail_ring(),
                q.used_ring(),
                q.size(),
                self.event_idx,
            )
        };
        self.rings.set(view);
        view
    }

    async fn run(self: Rc<Self>) {
        log::info!(
            "queue {} started on {}",
            self.index,
            std::thread::current().name().unwrap_or("?")
        );
        let poller = uring::add_poller(self.clone());
        // The wait for the next kick outlives wake-ups (drained sections
        // ending); dropping it cancels it in the ring.
        let mut next_kick = None;
        while !self.control.stop.load(Ordering::Acquire) {
            self.process_avail(true);
            let kick = next_kick.get_or_insert_with(|| Box::pin(wait_kick(self.kick.clone())));
            let kicked = poll_fn(|cx| {
                *self.control.waker.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(cx.waker().clone());
                // After publishing the waker: a wake before it is seen here.
                if self.control.woken.swap(false, Ordering::AcqRel) {
                    return Poll::Ready(None);
                }
                kick.as_mut().poll(cx).map(Some)
            })
            .await;
            match kicked {
                None => {}
                Some(Ok(())) => next_kick = None,
                Some(Err(e)) => {
                    log::error!(
                        "queue {}: kick eventfd failed: {e}; stopping the queue",
                        self.index
                    );
                    break;
                }
            }
        }
        drop(next_kick);
        *self.control.waker.lock().unwrap_or_else(|e| e.into_inner()) = None;
        uring::remove_poller(poller);
        self.driver_polls.replace(None);
        // Let every request finish before reporting where we stopped.
        poll_fn(|cx| {
            if self.in_flight().get() == 0 {
                Poll::Ready(())
            } else {
                *self.idle.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        self.signal_guest();
        let next_avail = self.queue.borrow().next_avail();
        log::debug!("queue {} stopped at avail index {next_avail}", self.index);
        *self
            .control
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(next_avail);
        self.control.stopped_cv.notify_all();
    }

    fn stopped(&self) -> bool {
        self.broken.get() || self.control.stop.load(Ordering::Acquire)
    }

    /// Pop every available chain and start a task for each. With
    /// `reenable`, guest notifications are turned back on afterwards (and
    /// chains that raced with that are popped too); without, they stay off
    /// because the iothread keeps polling. Returns whether anything was popped.
    fn process_avail(self: &Rc<Self>, reenable: bool) -> bool {
        if self.stopped() {
            return false;
        }
        let in_flight = self.in_flight();
        in_flight.reserve();
        let found = self.pop_all(reenable);
        in_flight.sub();
        // Turning notifications off and on wrote used->flags or
        // avail_event into the used ring.
        self.log_used(None);
        found
    }

    fn pop_all(self: &Rc<Self>, reenable: bool) -> bool {
        if self.export.is_quiesced() {
            return false;
        }
        let Some(mem) = self.usable_memory() else {
            return false;
        };
        let mut found = self.resubmit_pending(&mem);
        let Some(rings) = self.rings() else {
            log::error!(
                "queue {}: rings are not inside guest memory any more; the queue stops until it is set up again",
                self.index
            );
            self.broken.set(true);
            return found;
        };
        let mut heads = Vec::new();
        loop {
            let mut q = self.queue.borrow_mut();
            let next = q.next_avail();
            rings.set_kicks(false, self.event_idx, next);
            let avail = rings.avail_idx();
            let count = avail.wrapping_sub(next);
            if count > q.size() {
                log::error!(
                    "queue {}: avail index {avail} is {count} entries past {next}, more than the queue's {}; the queue stops until it is set up again",
                    self.index,
                    q.size()
                );
                self.broken.set(true);
                return found;
            }
            heads.extend((0..count).map(|i| rings.avail_head(next.wrapping_add(i))));
            q.set_next_avail(avail);
            let more = reenable && rings.set_kicks(true, self.event_idx, avail);
            self.polling.set(!reenable);
            drop(q);
            found |= !heads.is_empty();
            // Latency is measured from the pop, at loop-turn precision
            // (uring::now: one clock read per turn, none per request).
            let popped_at = uring::now();
            if let Some(t) = &self.inflight {
                // In pop order, before any of them is submitted.
                heads.iter().for_each(|&h| t.mark(h));
            }
            if !heads.is_empty() {
                // The memory table as of now, not as of before the avail
                // index was read: a frontend adds a region (ADD_MEM_REG,
                // acknowledged) and then puts requests into it, so requests
                // we just saw may use memory the earlier view lacks.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                let Some(mem) = self.usable_memory() else {
                    return found;
                };
                let q = self.queue.borrow();
                chain::prefetch_heads(&mem, GuestAddress(q.desc_table()), q.size(), &heads);
                drop(q);
                self.start_requests(&mem, heads.drain(..), popped_at);
            }
            if !more {
                return found;
            }
        }
    }

    /// The current guest memory, unless the frontend shrank it under us
    /// (its session hangs up on that): then the queue stops reading rings
    /// that now read as zeros.
    fn usable_memory(&self) -> Option<QueueRam> {
        let mem = self.memory();
        if mem.poisoned() {
            log::error!(
                "queue {}: guest memory shrank under us; the queue stops",
                self.index
            );
            self.broken.set(true);
            return None;
        }
        Some(mem)
    }

    /// Start the requests a previous daemon left in flight (once, at the
    /// first pop outside a drained section). Returns whether there were any.
    fn resubmit_pending(self: &Rc<Self>, mem: &QueueRam) -> bool {
        let heads = std::mem::take(&mut *self.resubmit.borrow_mut());
        if heads.is_empty() {
            return false;
        }
        self.start_requests(mem, heads, uring::now());
        true
    }

    /// Start a task for each of a batch of popped `heads`, all on the
    /// BlockBackend's root as it is now (see [`HeldRoot`]).
    fn start_requests(
        self: &Rc<Self>,
        mem: &QueueRam,
        heads: impl IntoIterator<Item = u16>,
        popped_at: Instant,
    ) {
        let root = Rc::new(self.export.backend.hold_root());
        for head in heads {
            self.in_flight().add();
            uring::spawn_with(|| {
                self.clone()
                    .handle(mem.clone(), root.clone(), head, popped_at)
            });
        }
    }

    /// Run the request at `head` on `root` (its batch's; see [`HeldRoot`]).
    async fn handle(
        self: Rc<Self>,
        mem: QueueRam,
        root: Rc<HeldRoot>,
        head: u16,
        popped_at: Instant,
    ) {
        let (table, size) = {
            let q = self.queue.borrow();
            (GuestAddress(q.desc_table()), q.size())
        };
        let max = self.export.max_descs;
        let mut chain = self.scratch.take();
        let walked = chain::walk_into(&mut chain, &mem, table, size, head, self.indirect, max);
        // The request takes over `mem` (the task's reference): no clone.
        let parsed = walked.map(|()| request::parse(mem, &chain, &self.export.limits));
        // Back before the first await: no other request can hold it.
        self.scratch.set(chain);
        let used_len = match parsed {
            Err(e) => {
                self.stats().record_invalid();
                if self.log.allow("bad descriptor chain") {
                    log::warn!("queue {}: descriptor chain {head}: {e}", self.index);
                }
                0
            }
            Ok((req, action)) => {
                let status = match action {
                    Err(reject) => {
                        self.stats().record_invalid();
                        if self.log.allow("rejected request") {
                            log::warn!("queue {}: request {head}: {}", self.index, reject.reason);
                        }
                        reject.status
                    }
                    Ok(op) => self.execute(op, &root, popped_at).await,
                };
                if !req.has_status() && self.log.allow("missing status") {
                    log::warn!(
                        "queue {}: request {head} has no usable status byte",
                        self.index
                    );
                }
                let used_len = req.finish(status);
                // Migration: the data and the status byte are in guest
                // memory; log them before the used entry says so. The
                // whole writable part: a failed read may have written some.
                // The chain went back to the scratch before the I/O, so it
                // is walked again, only while logging.
                if let Some(log) = self.dirty_log.current() {
                    let mut chain = self.scratch.take();
                    let mem = req.memory();
                    let again =
                        chain::walk_into(&mut chain, mem, table, size, head, self.indirect, max);
                    if again.is_ok() {
                        chain
                            .writable
                            .iter()
                            .for_each(|b| log.mark(b.addr.0, b.len as u64));
                    }
                    self.scratch.set(chain);
                }
                used_len
            }
        };
        self.complete(head, used_len);
    }

    fn in_flight(&self) -> &QueueInFlight {
        &self.export.queue_in_flight[self.index as usize]
    }

    fn stats(&self) -> &super::stats::QueueStats {
        &self.export.stats[self.index as usize]
    }

    /// Run a request and record it; its latency counts from the pop to the
    /// start of the loop turn that completes it (so a request completed in
    /// the turn that popped it counts as 0).
    async fn execute(&self, op: Op, root: &HeldRoot, popped_at: Instant) -> u8 {
        let (kind, bytes) = OpKind::of(&op);
        let status = self.execute_op(op, root).await;
        let latency = uring::now().saturating_duration_since(popped_at);
        self.stats()
            .record(kind, bytes, status == VIRTIO_BLK_S_OK, latency);
        status
    }

    async fn execute_op(&self, op: Op, root: &HeldRoot) -> u8 {
        let (b, root) = (&self.export.backend, Some(root));
        let name = op.name();
        let r = match &op {
            Op::Read { offset, data } => b.read_on(root, *offset, data).await,
            Op::Write { offset, data } => {
                let r = b.write_on(root, *offset, data).await;
                if r.is_ok() && !self.export.writeback.load(Ordering::Relaxed) {
                    b.flush_on(root).await
                } else {
                    r
                }
            }
            Op::Flush => b.flush_on(root).await,
            Op::GetId { data } => {
                data.copy_from(&self.export.limits.serial);
                Ok(())
            }
            Op::Discard { offset, len } => b.discard_on(root, *offset, *len).await,
            Op::WriteZeroes { offset, len, unmap } => {
                b.write_zeroes_on(root, *offset, *len, *unmap).await
            }
        };
        match r {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                if self.log.allow("request failed") {
                    log::warn!("queue {}: {name} failed: {e}", self.index);
                }
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    fn complete(self: &Rc<Self>, head: u16, len: u32) {
        let rings = self.rings();
        let mut q = self.queue.borrow_mut();
        let slot = q.next_used();
        match rings {
            Some(rings) if head < q.size() => {
                let put = inflight::put_used(self.inflight.as_ref(), head, || {
                    rings.put_used(slot, head, len);
                    slot.wrapping_add(1)
                });
                if put {
                    q.set_next_used(slot.wrapping_add(1));
                    self.used_added.set(self.used_added.get().wrapping_add(1));
                }
            }
            _ => log::error!(
                "queue {}: cannot put request {head} on the used ring: {}",
                self.index,
                if rings.is_some() {
                    "head beyond the queue size"
                } else {
                    "ring not inside guest memory"
                }
            ),
        }
        drop(q);
        self.log_used(Some(slot));
        self.poll_detector.borrow_mut().completed();
        let in_flight = self.in_flight();
        in_flight.sub();
        if in_flight.get() == 0 {
            if let Some(w) = self.idle.borrow_mut().take() {
                w.wake();
            }
        }
        // The first completion of a loop turn notifies at once (if the
        // driver's used_event asks for it), so the driver can start reaping
        // while we finish the turn; the rest of the turn's completions are
        // covered by one check at its end.
        if !self.signal_scheduled.replace(true) {
            self.notify_if_needed();
            let me = self.clone();
            uring::on_turn_end(move || me.signal_guest());
        }
    }

    /// Migration: mark the used ring's header, element `slot` and (with
    /// EVENT_IDX) avail_event in the dirty log, at the ring's log address
    /// (VHOST_VRING_F_LOG). One flag load while logging is off.
    fn log_used(&self, slot: Option<u16>) {
        let Some(log) = self.dirty_log.current() else {
            return;
        };
        if let Some(used) = self.dirty_log.used_log(self.index as usize) {
            let size = self.queue.borrow().size();
            dirty_log::mark_used(&log, used, size, slot, self.event_idx);
        }
    }

    /// Signal the guest's call eventfd. Never blocks, whatever the
    /// frontend does to the eventfd it shares with us: the write goes
    /// through the ring with RWF_NOWAIT. It fails (EAGAIN) when the counter
    /// is saturated, which already reads as signalled, or when the frontend
    /// made the eventfd blocking again; either way only that notification
    /// is dropped, so the result is not waited for.
    fn signal_call(&self) {
        let call = self.call_copy.get(&self.call);
        let Some(fd) = (*call).as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        // `call` keeps the fd open until the write completes.
        drop(ops::signal_eventfd_nowait(fd, call));
    }

    fn signal_guest(&self) {
        self.signal_scheduled.set(false);
        self.notify_if_needed();
    }

    fn notify_if_needed(&self) {
        let added = self.used_added.replace(0);
        if added == 0 {
            // Nothing put on the used ring since the last check (the turn's
            // first completion was checked at once): nothing to tell the
            // driver, and no fence to pay (at queue depth 1 this is every
            // turn's end). `added` cannot wrap to 0: every loop turn that
            // adds to the used ring checks at its end, and a turn adds at
            // most a queue's worth (32768).
            return;
        }
        let new = self.queue.borrow().next_used();
        let old = new.wrapping_sub(added);
        let needed = self
            .rings()
            .is_none_or(|r| r.wants_notification(self.event_idx, old, new));
        if needed {
            self.signal_call();
        }
        let polls = self.poll_detector.borrow_mut().checked(needed);
        let mut counted = self.driver_polls.borrow_mut();
        if polls != counted.is_some() && !self.control.stop.load(Ordering::Acquire) {
            *counted = polls.then(uring::PollingDriver::new);
        }
    }
}

//! A single-threaded executor per iothread: the Rust counterpart of QEMU's
//! coroutines. Tasks are `async` blocks polled on the thread that owns them;
//! wakers from other threads post to the owner's message eventfd.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, types};

use super::poll::{PollWindow, Poller, BUDGET};
use super::reactor::{Reactor, MESSAGE_TOKEN};
use super::task::{Task, TaskMemory};

pub(super) type Job = Box<dyn FnOnce() + Send>;

pub(super) enum Message {
    Wake(usize),
    Run(Job),
}

/// The part of an iothread other threads may touch.
pub(super) struct Remote {
    queue: Mutex<Vec<Message>>,
    notified: AtomicBool,
    eventfd: OwnedFd,
}

impl Remote {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Remote {
            queue: Mutex::new(Vec::new()),
            notified: AtomicBool::new(false),
            // SAFETY: fd was just created and is owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub(super) fn post(&self, msg: Message) {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg);
        if !self.notified.swap(true, Ordering::AcqRel) {
            if let Err(e) = super::signal_eventfd(self.eventfd.as_raw_fd()) {
                log::error!("iothread message eventfd write failed: {e}");
            }
        }
    }

    fn take(&self) -> Vec<Message> {
        self.notified.store(false, Ordering::Release);
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct TaskWaker {
    id: usize,
    remote: Arc<Remote>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let local = try_with_runtime(|rt| {
            if Arc::ptr_eq(&rt.remote, &self.remote) {
                rt.ready.borrow_mut().push_back(self.id);
                true
            } else {
                false
            }
        });
        if local != Some(true) {
            self.remote.post(Message::Wake(self.id));
        }
    }
}

pub(super) struct Runtime {
    pub(super) reactor: Reactor,
    tasks: RefCell<Vec<Option<Task>>>,
    task_memory: TaskMemory,
    /// One waker per task slot, made once. Behind an `Rc` so that polling
    /// takes one without touching the waker's atomic count (a clone and
    /// drop of it per poll were ~5% of a polling-client profile).
    wakers: RefCell<Vec<Rc<Waker>>>,
    free_tasks: RefCell<Vec<usize>>,
    live_tasks: Cell<usize>,
    ready: RefCell<VecDeque<usize>>,
    turn_end: RefCell<Vec<Box<dyn FnOnce()>>>,
    pub(super) remote: Arc<Remote>,
    stop: Cell<bool>,
    /// The read on the message eventfd is queued (it could not be when the
    /// ring refused it; then messages are looked for every turn).
    message_armed: Cell<bool>,
    message_buf: *mut u64,
    pollers: RefCell<Vec<(usize, Rc<dyn Poller>)>>,
    /// Reused list of the pollers one polling phase looks at (a copy, so
    /// that a poller may add or remove pollers while it runs).
    poll_scratch: Cell<Vec<Rc<dyn Poller>>>,
    next_poller: Cell<usize>,
    /// Adaptive windows for two kinds of wait, kept apart because their
    /// lengths differ by orders of magnitude on a real disk: new requests
    /// (nothing of ours in flight) come a few µs after the client reaped,
    /// while a disk read takes ~100 µs, and spinning through that only
    /// takes a CPU from the kernel's completion work and the client.
    kick_window: RefCell<PollWindow>,
    io_window: RefCell<PollWindow>,
    /// The current wait began with I/O in flight (uses `io_window`).
    io_wait: Cell<bool>,
    /// The task being polled, if any (see [`own_task`]).
    polling: Cell<Option<usize>>,
    /// When this loop turn started (after the wait or poll that ended the
    /// previous one): see [`now`].
    turn_started: Cell<std::time::Instant>,
    /// Time spent busy-polling and asleep, for metrics.
    pub(super) times: Arc<LoopTimes>,
}

/// How an iothread spent its time, in nanoseconds since it started: busy
/// polling for work, and asleep in the ring waiting for some. Written by
/// the iothread only (one plain store per poll or sleep), read by anyone.
#[derive(Default)]
pub struct LoopTimes {
    polled_ns: AtomicU64,
    slept_ns: AtomicU64,
}

impl LoopTimes {
    fn add(total: &AtomicU64, d: std::time::Duration) {
        let v = total.load(Ordering::Relaxed) + d.as_nanos() as u64;
        total.store(v, Ordering::Relaxed);
    }

    pub fn polled(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.polled_ns.load(Ordering::Relaxed))
    }

    pub fn slept(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.slept_ns.load(Ordering::Relaxed))
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Runtime>>> = const { RefCell::new(None) };
}

fn try_with_runtime<R>(f: impl FnOnce(&Runtime) -> R) -> Option<R> {
    let rt = CURRENT.with(|c| c.borrow().clone())?;
    Some(f(&rt))
}

fn with_runtime<R>(f: impl FnOnce(&Runtime) -> R) -> R {
    try_with_runtime(f).expect("not on an iothread")
}

pub(super) fn with_reactor<R>(f: impl FnOnce(&Reactor) -> R) -> R {
    with_runtime(|rt| f(&rt.reactor))
}

pub(super) fn try_with_reactor<R>(f: impl FnOnce(&Reactor) -> R) -> Option<R> {
    try_with_runtime(|rt| f(&rt.reactor))
}

/// Whether the calling thread is an iothread (can spawn and sleep on a ring).
pub(crate) fn on_iothread() -> bool {
    try_with_runtime(|_| ()).is_some()
}

/// Run `fut` as a task on the current iothread. Panics off an iothread.
pub(crate) fn spawn(fut: impl Future<Output = ()> + 'static) {
    with_runtime(|rt| rt.spawn(|| fut))
}

/// Run the future `make` returns as a task on the current iothread,
/// building it in the task's memory rather than moving it there (for
/// large futures spawned per request). Panics off an iothread.
pub(crate) fn spawn_with<F: Future<Output = ()> + 'static>(make: impl FnOnce() -> F) {
    with_runtime(|rt| rt.spawn(make))
}

/// The id of the task being polled on this iothread, if `waker` is that
/// task's own waker. An I/O operation keeps the id instead of a clone of
/// the waker and is woken by the id: cloning and dropping a waker are an
/// atomic count each, and every locked instruction waits for the
/// request's earlier stores to drain.
pub(super) fn own_task(waker: &Waker) -> Option<usize> {
    try_with_runtime(|rt| {
        let id = rt.polling.get()?;
        rt.wakers
            .borrow()
            .get(id)
            .filter(|w| w.will_wake(waker))
            .map(|_| id)
    })
    .flatten()
}

/// Register a poller on the current iothread; returns an id for removal.
pub(crate) fn add_poller(p: Rc<dyn Poller>) -> usize {
    with_runtime(|rt| {
        let id = rt.next_poller.get();
        rt.next_poller.set(id + 1);
        rt.pollers.borrow_mut().push((id, p));
        id
    })
}

pub(crate) fn remove_poller(id: usize) {
    with_runtime(|rt| rt.pollers.borrow_mut().retain(|(i, _)| *i != id))
}

/// The time the current loop turn started, for timestamps that need no
/// more precision than a turn (per-request latency statistics): one clock
/// read per turn instead of two per request. Off an iothread, the clock.
pub(crate) fn now() -> std::time::Instant {
    try_with_runtime(|rt| rt.turn_started.get()).unwrap_or_else(std::time::Instant::now)
}

/// Run `f` once, after the tasks made ready in this loop turn have run and
/// before the thread sleeps: used to batch guest notifications.
pub(crate) fn on_turn_end(f: impl FnOnce() + 'static) {
    with_runtime(|rt| rt.turn_end.borrow_mut().push(Box::new(f)))
}

/// Let the other tasks made ready in this loop turn run before this one
/// goes on: a task that is about to write back state many tasks change
/// (qcow2 metadata) yields once, so that one write covers them all.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

impl Runtime {
    pub(super) fn new(entries: u32, poll_max: std::time::Duration) -> io::Result<Rc<Self>> {
        let rt = Rc::new(Runtime {
            reactor: Reactor::new(entries)?,
            tasks: RefCell::new(Vec::new()),
            task_memory: TaskMemory::default(),
            wakers: RefCell::new(Vec::new()),
            free_tasks: RefCell::new(Vec::new()),
            live_tasks: Cell::new(0),
            ready: RefCell::new(VecDeque::new()),
            turn_end: RefCell::new(Vec::new()),
            remote: Arc::new(Remote::new()?),
            stop: Cell::new(false),
            message_armed: Cell::new(false),
            // The kernel may still own this buffer when the ring is torn
            // down, so it is deliberately never freed (8 bytes per iothread).
            message_buf: Box::into_raw(Box::new(0u64)),
            pollers: RefCell::new(Vec::new()),
            poll_scratch: Cell::new(Vec::new()),
            next_poller: Cell::new(0),
            kick_window: RefCell::new(PollWindow::new(poll_max)),
            io_window: RefCell::new(PollWindow::new(poll_max)),
            io_wait: Cell::new(false),
            turn_started: Cell::new(std::time::Instant::now()),
            polling: Cell::new(None),
            times: Arc::new(LoopTimes::default()),
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(rt.clone()));
        Ok(rt)
    }

    fn spawn<F: Future<Output = ()> + 'static>(&self, make: impl FnOnce() -> F) {
        let fut = self.task_memory.spawn(make);
        let id = match self.free_tasks.borrow_mut().pop() {
            Some(id) => {
                self.tasks.borrow_mut()[id] = Some(fut);
                id
            }
            None => {
                let mut tasks = self.tasks.borrow_mut();
                tasks.push(Some(fut));
                let id = tasks.len() - 1;
                self.wakers
                    .borrow_mut()
                    .push(Rc::new(Waker::from(Arc::new(TaskWaker {
                        id,
                        remote: self.remote.clone(),
                    }))));
                id
            }
        };
        self.live_tasks.set(self.live_tasks.get() + 1);
        self.ready.borrow_mut().push_back(id);
    }

    fn poll_task(&self, id: usize) {
        // Take the future out so it can spawn or wake while being polled.
        let Some(mut fut) = self.tasks.borrow_mut().get_mut(id).and_then(Option::take) else {
            return; // spurious wake of a finished task
        };
        let waker = self.wakers.borrow()[id].clone();
        let mut cx = Context::from_waker(&waker);
        let outer = self.polling.replace(Some(id));
        let res = fut.poll(&mut cx);
        self.polling.set(outer);
        match res {
            Poll::Ready(()) => {
                fut.finish(&self.task_memory);
                self.free_tasks.borrow_mut().push(id);
                self.live_tasks.set(self.live_tasks.get() - 1);
            }
            Poll::Pending => self.tasks.borrow_mut()[id] = Some(fut),
        }
    }

    fn arm_message_read(&self) {
        let entry = opcode::Read::new(
            types::Fd(self.remote.eventfd.as_raw_fd()),
            self.message_buf as *mut u8,
            8,
        )
        .build()
        .user_data(MESSAGE_TOKEN);
        let armed = match self.reactor.push(&entry) {
            Ok(()) => true,
            Err(e) => {
                log::error!("iothread: cannot wait for messages ({e}); retrying next turn");
                false
            }
        };
        self.message_armed.set(armed);
    }

    fn handle_messages(&self) {
        for msg in self.remote.take() {
            match msg {
                Message::Wake(id) => self.ready.borrow_mut().push_back(id),
                Message::Run(job) => job(),
            }
        }
    }

    /// The adaptive window of the current wait's kind.
    fn window(&self) -> &RefCell<PollWindow> {
        if self.io_wait.get() {
            &self.io_window
        } else {
            &self.kick_window
        }
    }

    /// Busy-poll the pollers and the ring for up to the adaptive window, if
    /// the process-wide budget has a CPU to spin on.
    /// Returns true if work was found (the caller then skips sleeping).
    fn poll_for_work(&self) -> bool {
        /// Spins between clock reads: a vDSO clock read costs about as much
        /// as looking at a few rings, so reading it on every spin would
        /// make polling mostly clock reads.
        const SPINS_PER_CLOCK: u32 = 16;
        /// Far longer than SPINS_PER_CLOCK spins take (under a µs) or an
        /// interrupt handler runs: a gap this long means we were
        /// descheduled while spinning.
        const DESCHEDULED: std::time::Duration = std::time::Duration::from_micros(30);
        let mut pollers = self.poll_scratch.take();
        pollers.extend(self.pollers.borrow().iter().map(|(_, p)| p.clone()));
        self.io_wait.set(pollers.iter().any(|p| p.io_in_flight()));
        if pollers.is_empty() {
            return false;
        }
        let window = self.window().borrow().current();
        let mut found = false;
        let slot = if window.is_zero() || pollers.iter().all(|p| p.driver_polls()) {
            None
        } else {
            BUDGET.claim()
        };
        if slot.is_some() {
            // Hand this turn's SQEs to the kernel so their completions can
            // arrive while we poll.
            self.reactor.flush();
            let start = std::time::Instant::now();
            let mut last_clock = start;
            let mut spins = 0u32;
            loop {
                found = self.reactor.has_completions();
                for p in &pollers {
                    found |= p.clone().poll();
                }
                if found {
                    self.window().borrow_mut().adjust(start.elapsed());
                    break;
                }
                spins += 1;
                if spins.is_multiple_of(SPINS_PER_CLOCK) {
                    let now = std::time::Instant::now();
                    if now - last_clock >= DESCHEDULED {
                        // Something else ran on this CPU meanwhile (another
                        // thread, or the hypervisor ran another vCPU): the
                        // CPU is contended and our spinning takes from it.
                        self.window().borrow_mut().shrink();
                        break;
                    }
                    if now - start >= window {
                        break;
                    }
                    last_clock = now;
                }
                std::hint::spin_loop();
            }
            LoopTimes::add(&self.times.polled_ns, start.elapsed());
        }
        drop(slot);
        if !found {
            // About to sleep: notifications back on; catch what raced with that.
            for p in &pollers {
                found |= p.clone().poll_end();
            }
        }
        pollers.clear();
        self.poll_scratch.replace(pollers);
        found
    }

    pub(super) fn request_stop(&self) {
        self.stop.set(true);
    }

    /// The event loop: run ready tasks, run turn-end hooks, submit and sleep.
    /// Returns once a stop was requested and every task has finished.
    pub(super) fn run(&self) {
        self.arm_message_read();
        loop {
            loop {
                let next = self.ready.borrow_mut().pop_front();
                match next {
                    Some(id) => self.poll_task(id),
                    None => break,
                }
            }
            let hooks = std::mem::take(&mut *self.turn_end.borrow_mut());
            for h in hooks {
                h();
            }
            if !self.ready.borrow().is_empty() {
                continue;
            }
            if self.stop.get() && self.live_tasks.get() == 0 {
                break;
            }
            let started = std::time::Instant::now();
            if !self.message_armed.get() {
                // Nothing would wake us for messages: look for them each turn.
                self.arm_message_read();
                self.handle_messages();
            }
            if !self.poll_for_work() {
                self.reactor
                    .submit_and_wait(self.message_armed.get() as usize);
                let waited = started.elapsed();
                self.window().borrow_mut().adjust(waited);
                LoopTimes::add(&self.times.slept_ns, waited);
            }
            self.turn_started.set(std::time::Instant::now());
            let mut got_message = false;
            self.reactor.reap(
                |id| self.ready.borrow_mut().push_back(id),
                |res| {
                    if res < 0 && res != -libc::EINTR {
                        log::error!("iothread message eventfd read failed: {res}");
                    }
                    got_message = true;
                },
            );
            if got_message {
                self.arm_message_read();
                self.handle_messages();
            }
        }
        self.reactor.leak_pending();
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}

pub(super) fn request_stop_current() {
    with_runtime(|rt| rt.request_stop())
}

/// Run the future `make` builds to completion on a short-lived thread with
/// its own ring, and return its output. For the control thread's I/O (image
/// open and close), which may happen on any thread, iothreads included.
pub fn block_on<R, F>(make: impl FnOnce() -> F + Send) -> io::Result<R>
where
    R: Send,
    F: Future<Output = R>,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            let rt = Runtime::new(256, std::time::Duration::ZERO)?;
            let out: Rc<RefCell<Option<R>>> = Rc::new(RefCell::new(None));
            let slot = out.clone();
            let fut = make();
            // SAFETY: the future lives on this thread's runtime, which runs it
            // to completion below before `make`'s borrows end; erasing the
            // lifetime lets it sit in the runtime's task list meanwhile.
            let fut: Pin<Box<dyn Future<Output = ()> + '_>> = Box::pin(async move {
                *slot.borrow_mut() = Some(fut.await);
            });
            let fut: Pin<Box<dyn Future<Output = ()>>> = unsafe { std::mem::transmute(fut) };
            rt.spawn(|| fut);
            rt.request_stop();
            rt.run();
            let v = out.borrow_mut().take();
            v.ok_or_else(|| io::Error::other("future did not complete"))
        })
        .join()
        .map_err(|_| io::Error::other("block_on thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::future::poll_fn;
    use std::sync::mpsc;
    use std::task::Poll;
    use std::time::Duration;

    use crate::uring::IoThread;

    #[test]
    fn tasks_spawned_from_tasks_all_run() {
        let t = IoThread::start("exec-spawn", Duration::ZERO).unwrap();
        let n = t.handle().block_on(|| async {
            let count = std::rc::Rc::new(Cell::new(0));
            for _ in 0..100 {
                let c = count.clone();
                super::spawn(async move { c.set(c.get() + 1) });
            }
            // Yield once so the spawned tasks run before we look.
            let mut yielded = false;
            poll_fn(|cx| {
                if yielded {
                    Poll::Ready(())
                } else {
                    yielded = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            })
            .await;
            count.get()
        });
        assert_eq!(n, 100);
    }

    #[test]
    fn a_waker_used_on_another_thread_resumes_the_task() {
        let t = IoThread::start("exec-wake", Duration::ZERO).unwrap();
        let (waker_tx, waker_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        t.handle().run(move || {
            super::spawn(async move {
                let mut sent = false;
                poll_fn(|cx| {
                    if sent {
                        return Poll::Ready(());
                    }
                    sent = true;
                    waker_tx.send(cx.waker().clone()).unwrap();
                    Poll::Pending
                })
                .await;
                done_tx.send(()).unwrap();
            })
        });
        let waker = waker_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            done_rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "ran before the wake"
        );
        std::thread::spawn(move || waker.wake()).join().unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    /// A waker that counts its wakes and passes them on.
    struct Counting {
        wakes: std::sync::atomic::AtomicUsize,
        inner: std::task::Waker,
    }

    impl std::task::Wake for Counting {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref()
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.wakes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.wake_by_ref();
        }
    }

    #[test]
    fn an_operation_wakes_its_own_task_by_id_and_any_other_waker_through_it() {
        use std::future::Future;
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        use std::task::{Context, Waker};

        let t = IoThread::start("exec-own", Duration::ZERO).unwrap();
        let (own, foreign, wakes) = t.handle().block_on(|| async {
            // SAFETY: plain syscall; checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            let signal = || {
                let one = 1u64;
                // SAFETY: 8-byte write from a valid u64.
                let n = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
                assert_eq!(n, 8);
            };
            // Awaited by the task itself: recognised as the task's waker.
            let own = poll_fn(|cx| Poll::Ready(super::own_task(cx.waker()).is_some())).await;
            signal();
            crate::uring::ops::read_eventfd(fd, ()).await.unwrap();
            // Polled under a waker of its own, as a combinator would:
            // that waker must be the one woken.
            let mut read = std::pin::pin!(crate::uring::ops::read_eventfd(fd, ()));
            let mut counting = None;
            let mut foreign = None;
            let mut signalled = false;
            poll_fn(|cx| {
                let c = counting.get_or_insert_with(|| {
                    Arc::new(Counting {
                        wakes: 0.into(),
                        inner: cx.waker().clone(),
                    })
                });
                let waker = Waker::from(c.clone());
                foreign.get_or_insert(super::own_task(&waker));
                let mut inner = Context::from_waker(&waker);
                match read.as_mut().poll(&mut inner) {
                    Poll::Ready(r) => Poll::Ready(r),
                    Poll::Pending => {
                        if !signalled {
                            signalled = true;
                            signal();
                        }
                        Poll::Pending
                    }
                }
            })
            .await
            .unwrap();
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
            let wakes = counting.map_or(0, |c| c.wakes.load(Ordering::Relaxed));
            (own, foreign.flatten(), wakes)
        });
        assert!(own, "a task's own waker was not recognised");
        assert_eq!(foreign, None, "a foreign waker was taken for the task's");
        assert!(wakes >= 1, "the foreign waker was never woken");
        assert_eq!(
            super::own_task(std::task::Waker::noop()),
            None,
            "off an iothread"
        );
    }

    #[test]
    fn stop_waits_for_running_tasks() {
        let t = IoThread::start("exec-stop", Duration::ZERO).unwrap();
        let (tx, rx) = mpsc::channel();
        // SAFETY: plain syscall; checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        t.handle().run(move || {
            super::spawn(async move {
                crate::uring::ops::read_eventfd(fd, ()).await.unwrap();
                tx.send(()).unwrap();
            })
        });
        let stopper = std::thread::spawn(move || t.stop());
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        let one = 1u64;
        // SAFETY: 8-byte write from a valid u64.
        assert_eq!(
            unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) },
            8
        );
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        stopper.join().unwrap();
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    }
}

//! The ring itself: submission of SQEs and the slots that remember who waits
//! for which completion.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, IoUring};

use super::executor;
use super::iovec::{IoVec, KeepAlive};

/// user_data of the read on the iothread's message eventfd.
pub(super) const MESSAGE_TOKEN: u64 = u64::MAX;
/// user_data of cancellations (their own completions are not waited for).
const CANCEL_TOKEN: u64 = u64::MAX - 1;

/// Who waits for an operation's completion.
enum Waiter {
    /// A task of this iothread, made ready by id (see
    /// [`executor::own_task`]): no waker is cloned and dropped, so
    /// an operation costs no atomic count.
    Task(usize),
    /// Any other waker (a future polled under a combinator's own waker).
    Waker(Waker),
}

enum SlotState {
    Free,
    Waiting(Option<Waiter>),
    Done(i32),
    /// The future was dropped before its completion arrived; the slot keeps
    /// the operation's buffers alive until the kernel is done with them.
    Abandoned,
}

struct Slot {
    state: SlotState,
    keep: Option<Box<dyn Any>>,
    /// A readv's or writev's iovec array, which the kernel reads when the
    /// SQE is submitted (maybe after its future was dropped), and what
    /// keeps the buffers it points to mapped. The array keeps its capacity
    /// when the slot is reused: a request's own list is not copied into a
    /// fresh allocation (two mallocs and frees per request were 7% of an
    /// iothread's time on a disk).
    iov: Vec<libc::iovec>,
    mapped: Option<KeepAlive>,
}

/// Longest iovec array a free slot keeps its room for (1 KiB): longer
/// lists, up to IOV_MAX pieces, are rare, and keeping their room would let
/// a guest that sent some pin 16 KiB in each slot for the iothread's life.
const KEPT_IOV_CAPACITY: usize = 64;

impl Slot {
    /// The operation is over: drop what kept its buffers alive.
    fn release(&mut self) {
        self.state = SlotState::Free;
        self.keep = None;
        self.mapped = None;
        if self.iov.capacity() > KEPT_IOV_CAPACITY {
            self.iov = Vec::new();
        }
    }
}

pub(super) struct Reactor {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    /// The wakers of one reap, kept between reaps so that reaping a batch
    /// of completions allocates nothing.
    woken: RefCell<Vec<Waker>>,
}

impl Reactor {
    pub(super) fn new(entries: u32) -> io::Result<Self> {
        // Single issuer + deferred task run keeps completion work on this
        // thread, run when we enter the ring to wait; older kernels lack them.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
            .or_else(|_| IoUring::new(entries))?;
        Ok(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::with_capacity(entries as usize)),
            free: RefCell::new(Vec::new()),
            woken: RefCell::new(Vec::new()),
        })
    }

    /// Queue one SQE; it goes to the kernel with the rest of this loop turn's.
    /// When the submission queue is full and the kernel keeps refusing to
    /// take it (CQ overflow, no memory), this gives up after a few tries
    /// instead of spinning: the caller fails its operation.
    pub(super) fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        const SUBMIT_TRIES: u32 = 8;
        let mut ring = self.ring.borrow_mut();
        let mut last = None;
        for _ in 0..SUBMIT_TRIES {
            // SAFETY: every buffer an entry points to is owned by its slot
            // (`keep`, `iov`, `mapped`) or by the runtime, and outlives the
            // completion.
            if unsafe { ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what we have to the kernel now.
            if let Err(e) = ring.submit() {
                last = Some(e);
            }
        }
        Err(match last {
            Some(e) => io::Error::new(e.kind(), format!("io_uring submit: {e}")),
            None => io::Error::other("io_uring submission queue stays full"),
        })
    }

    /// Start an operation whose buffers are owned by `keep`.
    pub(super) fn start(&self, entry: squeue::Entry, keep: Option<Box<dyn Any>>) -> Op {
        let idx = self.take_slot();
        self.slots.borrow_mut()[idx].keep = keep;
        self.queue(idx, entry)
    }

    /// Start a readv or writev of `buf`: `build` makes its SQE from the
    /// iovec array's address and length, which the slot owns (a copy).
    pub(super) fn start_vectored(
        &self,
        buf: &IoVec,
        build: impl FnOnce(*const libc::iovec, u32) -> squeue::Entry,
    ) -> Op {
        let idx = self.take_slot();
        let entry = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[idx];
            slot.iov.clear();
            slot.iov.extend_from_slice(buf.iovecs());
            slot.mapped = buf.keepalive().cloned();
            // The caller checked the length against IOV_MAX (1024).
            build(slot.iov.as_ptr(), slot.iov.len() as u32)
        };
        self.queue(idx, entry)
    }

    /// A free slot, now waiting for its operation.
    fn take_slot(&self) -> usize {
        let mut slots = self.slots.borrow_mut();
        match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i].state = SlotState::Waiting(None);
                i
            }
            None => {
                slots.push(Slot {
                    state: SlotState::Waiting(None),
                    keep: None,
                    iov: Vec::new(),
                    mapped: None,
                });
                slots.len() - 1
            }
        }
    }

    /// Queue the SQE of the operation in slot `idx`.
    fn queue(&self, idx: usize, entry: squeue::Entry) -> Op {
        if let Err(e) = self.push(&entry.user_data(idx as u64)) {
            log::error!("cannot start an I/O operation: {e}");
            // The kernel never saw the entry: its buffers can go now.
            let mut slots = self.slots.borrow_mut();
            slots[idx].release();
            slots[idx].state = SlotState::Done(-e.raw_os_error().unwrap_or(libc::EAGAIN));
        }
        Op {
            idx,
            done: false,
            cancel_on_drop: false,
        }
    }

    /// Ask the kernel to cancel the operation in slot `idx` (best effort:
    /// if the request cannot be queued, the operation stays pending until
    /// it completes or the ring goes). The slot stays taken until the
    /// operation's own completion, so `idx` names no other operation.
    fn cancel(&self, idx: usize) {
        let e = opcode::AsyncCancel::new(idx as u64)
            .build()
            .user_data(CANCEL_TOKEN);
        if let Err(e) = self.push(&e) {
            log::warn!("cannot cancel an abandoned I/O operation: {e}");
        }
    }

    /// Hand everything queued to the kernel now, without waiting.
    pub(super) fn submit_now(&self) {
        if let Err(e) = self.ring.borrow().submit() {
            if e.raw_os_error() != Some(libc::EBUSY) {
                log::error!("io_uring_enter failed: {e}");
            }
        }
    }

    /// Submit everything queued and sleep until at least `want` completions.
    pub(super) fn submit_and_wait(&self, want: usize) {
        let ring = self.ring.borrow();
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => log::error!("io_uring_enter failed: {e}"),
        }
    }

    /// Hand queued SQEs to the kernel and run deferred completion work,
    /// without waiting; no system call when there is neither (a polling
    /// loop turn that started no I/O costs nothing here).
    pub(super) fn flush(&self) {
        let needed = {
            let mut ring = self.ring.borrow_mut();
            let sq = ring.submission();
            !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
        };
        if needed {
            self.submit_and_wait(0);
        }
    }

    /// True if completions are waiting. Completions still held as deferred
    /// task work (the kernel set IORING_SQ_TASKRUN) are run into the
    /// completion queue first, so that the caller can reap them at once.
    pub(super) fn has_completions(&self) -> bool {
        let deferred = self.ring.borrow_mut().submission().taskrun();
        if deferred {
            // Also submits what is queued, as any enter does.
            self.submit_and_wait(0);
        }
        let empty = self.ring.borrow_mut().completion().is_empty();
        !empty
    }

    /// Hand every available completion to its waiter: a task of this
    /// iothread goes to `wake_task`, the message eventfd's completion to
    /// `on_message`.
    pub(super) fn reap(&self, mut wake_task: impl FnMut(usize), mut on_message: impl FnMut(i32)) {
        // Taken out rather than borrowed while the wakers run: a waker
        // not ours may run any code.
        let mut wakers = self.woken.take();
        loop {
            let mut message = None;
            {
                let mut ring = self.ring.borrow_mut();
                let mut slots = self.slots.borrow_mut();
                for cqe in ring.completion() {
                    let ud = cqe.user_data();
                    if ud == MESSAGE_TOKEN {
                        message = Some(cqe.result());
                        continue;
                    }
                    if ud == CANCEL_TOKEN {
                        // The cancelled operation completes on its own
                        // (with -ECANCELED, or its result if it won).
                        continue;
                    }
                    let Some(slot) = slots.get_mut(ud as usize) else {
                        log::error!("completion for unknown slot {ud}");
                        continue;
                    };
                    match std::mem::replace(&mut slot.state, SlotState::Done(cqe.result())) {
                        SlotState::Waiting(Some(Waiter::Task(id))) => wake_task(id),
                        SlotState::Waiting(Some(Waiter::Waker(w))) => wakers.push(w),
                        SlotState::Waiting(None) => {}
                        SlotState::Abandoned => {
                            slot.release();
                            self.free.borrow_mut().push(ud as usize);
                        }
                        SlotState::Done(_) | SlotState::Free => {
                            log::error!("unexpected completion for slot {ud}")
                        }
                    }
                }
            }
            for w in wakers.drain(..) {
                w.wake();
            }
            match message {
                Some(res) => on_message(res),
                None => break,
            }
        }
        self.woken.replace(wakers);
    }

    /// Drop the buffers of operations still owned by the kernel without
    /// freeing them: called when the ring goes away with requests pending.
    pub(super) fn leak_pending(&self) {
        for slot in self.slots.borrow_mut().iter_mut() {
            if !matches!(slot.state, SlotState::Free | SlotState::Done(_)) {
                if let Some(k) = slot.keep.take() {
                    std::mem::forget(k);
                }
                std::mem::forget(slot.mapped.take());
                std::mem::forget(std::mem::take(&mut slot.iov));
            }
        }
    }
}

/// A pending io_uring operation; resolves to the CQE's result (>= 0 or -errno).
pub(super) struct Op {
    idx: usize,
    done: bool,
    /// Dropping it before completion cancels it in the kernel: for waits
    /// that may never end (a kick nobody sends).
    cancel_on_drop: bool,
}

impl Op {
    /// Cancel the operation if it is dropped before it completes.
    pub(super) fn cancel_on_drop(mut self) -> Self {
        self.cancel_on_drop = true;
        self
    }
}

impl Future for Op {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let idx = self.idx;
        let res = executor::with_reactor(|r| {
            let mut slots = r.slots.borrow_mut();
            let slot = &mut slots[idx];
            match &mut slot.state {
                SlotState::Done(res) => {
                    let res = *res;
                    slot.release();
                    r.free.borrow_mut().push(idx);
                    Poll::Ready(res)
                }
                SlotState::Waiting(w) => {
                    let kept = matches!(w, Some(Waiter::Waker(old)) if old.will_wake(cx.waker()));
                    if !kept {
                        *w = Some(match executor::own_task(cx.waker()) {
                            Some(id) => Waiter::Task(id),
                            None => Waiter::Waker(cx.waker().clone()),
                        });
                    }
                    Poll::Pending
                }
                SlotState::Abandoned | SlotState::Free => Poll::Ready(-libc::ECANCELED),
            }
        });
        if res.is_ready() {
            self.done = true;
        }
        res
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let idx = self.idx;
        executor::try_with_reactor(|r| {
            let mut slots = r.slots.borrow_mut();
            let slot = &mut slots[idx];
            if let SlotState::Done(_) = slot.state {
                slot.release();
                r.free.borrow_mut().push(idx);
            } else {
                slot.state = SlotState::Abandoned;
                drop(slots);
                if self.cancel_on_drop {
                    r.cancel(idx);
                }
            }
        });
    }
}

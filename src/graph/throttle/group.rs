//! A throttle group (QEMU's `throttle-group` object): one budget, kept as
//! leaky buckets, shared by the `throttle` filter nodes that name the
//! group. Requests over the budget wait in their member's queue; the
//! members take turns (round-robin per direction), so a member with a long
//! queue does not starve the others, whichever iothreads they run on.
//!
//! Waiting costs no thread: a queued request's future sleeps, and the
//! group's timer is a `sleep_until` on the ring of the iothread that armed
//! it. A timer that fires, or any queued request that is polled, grants
//! what the budget allows: under the group's lock it takes the request out
//! of its queue, charges the buckets, and wakes it on its own iothread.
//!
//! Drain: a member whose node is drained grants nothing. Its queued
//! requests are *parked* (`Member::parked`): counted as in flight by the
//! filter node and everything above it, but not waited for by the drained
//! section, which thus begins as soon as the requests already dispatched
//! below the filter have completed. On the section's end they resume with
//! the budget they had.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::bucket::{Buckets, Direction};
use super::limits::Limits;
use crate::graph::in_flight::kick_waiters;
use crate::uring::{self, fence, ops};

/// One queued request.
pub(super) struct Waiter {
    bytes: u64,
    state: Mutex<WaiterState>,
}

#[derive(Default)]
struct WaiterState {
    granted: bool,
    waker: Option<Waker>,
}

impl Waiter {
    pub(super) fn granted(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).granted
    }

    /// Remember `waker` unless granted meanwhile; true if granted.
    pub(super) fn granted_or_wait(&self, waker: &Waker) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.granted {
            s.waker = Some(waker.clone());
        }
        s.granted
    }

    fn grant(&self) {
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.granted = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Wake the request without granting it: it looks at the group again.
    fn nudge(&self) {
        let waker = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waker
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A filter node's membership in a group: its drain state and its parked
/// requests, read without the group's lock.
pub(crate) struct Member {
    /// Nesting depth of drained sections over the filter node.
    quiesced: AtomicU32,
    /// Requests in this member's queues (see the module comment).
    parked: AtomicU64,
    /// Requests that had to wait, and the time they waited, in total.
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Member {
    pub(crate) fn parked(&self) -> u64 {
        self.parked.load(Ordering::SeqCst)
    }

    pub(super) fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst) > 0
    }

    pub(crate) fn throttled(&self) -> (u64, u64) {
        (
            self.throttled.load(Ordering::Relaxed),
            self.throttled_ns.load(Ordering::Relaxed),
        )
    }

    pub(super) fn add_throttled(&self, waited: Duration) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        self.throttled_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }
}

struct MemberQueues {
    member: Weak<Member>,
    queues: [VecDeque<Arc<Waiter>>; 2],
}

struct State {
    limits: Limits,
    buckets: Buckets,
    members: Vec<MemberQueues>,
    /// Per direction: the member whose turn it is next.
    turn: [usize; 2],
    /// Per direction: the generation of the armed timer, if one is armed.
    /// A timer whose generation is no longer current does nothing.
    timer: [Option<u64>; 2],
    generation: u64,
}

impl State {
    /// Where `member`'s queues are (`join` put them there; a member that
    /// somehow is not listed gets them now).
    fn member_index(&mut self, member: &Arc<Member>) -> usize {
        if let Some(i) = self
            .members
            .iter()
            .position(|m| m.member.as_ptr() == Arc::as_ptr(member))
        {
            return i;
        }
        self.members.push(MemberQueues {
            member: Arc::downgrade(member),
            queues: [VecDeque::new(), VecDeque::new()],
        });
        self.members.len() - 1
    }
}

pub(crate) struct ThrottleGroup {
    name: String,
    state: Mutex<State>,
    /// Any limit set: without one, requests pass without the lock.
    limited: AtomicBool,
    /// Shutdown: the limits no longer apply, so that the daemon stops
    /// promptly and loses nothing.
    released: AtomicBool,
}

impl ThrottleGroup {
    pub(crate) fn new(name: &str, limits: Limits) -> Arc<Self> {
        let limited = limits.enabled();
        Arc::new(ThrottleGroup {
            name: name.to_string(),
            state: Mutex::new(State {
                buckets: Buckets::new(&limits, Instant::now()),
                limits,
                members: Vec::new(),
                turn: [0; 2],
                timer: [None; 2],
                generation: 0,
            }),
            limited: AtomicBool::new(limited),
            released: AtomicBool::new(false),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn limits(&self) -> Limits {
        self.state().limits.clone()
    }

    /// How many filter nodes use the group.
    pub(crate) fn member_count(&self) -> usize {
        self.state()
            .members
            .iter()
            .filter(|m| m.member.strong_count() > 0)
            .count()
    }

    /// New limits (`qom-set`), valid already. The buckets start empty
    /// under them; queued requests are looked at again at once.
    pub(crate) fn set_limits(&self, limits: Limits) {
        let mut s = self.state();
        s.buckets = Buckets::new(&limits, Instant::now());
        self.limited.store(limits.enabled(), Ordering::SeqCst);
        s.limits = limits;
        self.restart(&mut s);
    }

    /// Shutdown: grant every queued request, and every later one, without
    /// limits.
    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        let mut s = self.state();
        self.restart(&mut s);
    }

    /// Forget armed timers and wake the head of every queue: each looks
    /// at the group again (grants, or arms a timer on its own iothread).
    fn restart(&self, s: &mut State) {
        s.generation += 1;
        s.timer = [None; 2];
        for m in &s.members {
            for q in &m.queues {
                if let Some(w) = q.front() {
                    w.nudge();
                }
            }
        }
    }

    pub(crate) fn join(self: &Arc<Self>) -> Arc<Member> {
        let member = Arc::new(Member {
            quiesced: AtomicU32::new(0),
            parked: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        });
        let mut s = self.state();
        s.members.retain(|m| m.member.strong_count() > 0);
        s.members.push(MemberQueues {
            member: Arc::downgrade(&member),
            queues: [VecDeque::new(), VecDeque::new()],
        });
        member
    }

    /// Whether a request of `member` may skip the lock: nothing to limit,
    /// or the limits released, and the member not drained. The caller's
    /// request is counted in the filter node already; the fence orders
    /// that count before the load of the drain state (see `grant_one`).
    pub(super) fn passes_freely(&self, member: &Member) -> bool {
        fence::light();
        (!self.limited.load(Ordering::Relaxed) || self.released.load(Ordering::Relaxed))
            && !member.is_quiesced()
    }

    /// A request of `member` arrives: either it may go now (charged to the
    /// budget; None) or it is queued, parked, and the waiter returned.
    pub(super) fn arrive(
        self: &Arc<Self>,
        member: &Arc<Member>,
        dir: Direction,
        bytes: u64,
    ) -> Option<Arc<Waiter>> {
        let mut s = self.state();
        let released = self.released.load(Ordering::SeqCst);
        let now = Instant::now();
        s.buckets.leak(now);
        let queued_anywhere = s.members.iter().any(|m| !m.queues[dir as usize].is_empty());
        if !member.is_quiesced() && !queued_anywhere && (released || s.buckets.wait(dir).is_zero())
        {
            if !released {
                s.buckets.account(dir, bytes);
            }
            return None;
        }
        let waiter = Arc::new(Waiter {
            bytes,
            state: Mutex::new(WaiterState::default()),
        });
        let i = s.member_index(member);
        s.members[i].queues[dir as usize].push_back(waiter.clone());
        member.parked.fetch_add(1, Ordering::SeqCst);
        // A drain may have counted this request as dispatched (it was in
        // the filter node's count, not yet parked): let it look again.
        kick_waiters();
        self.schedule(&mut s, dir);
        Some(waiter)
    }

    /// A queued request is polled and not granted yet: grant what the
    /// budget allows, or make sure a timer will.
    pub(super) fn poll_queue(self: &Arc<Self>, dir: Direction) {
        let mut s = self.state();
        self.schedule(&mut s, dir);
    }

    /// A queued request went away before it was granted (its future was
    /// dropped): take it out of the queue.
    pub(super) fn cancel(&self, member: &Member, dir: Direction, waiter: &Arc<Waiter>) {
        let mut s = self.state();
        for m in &mut s.members {
            let q = &mut m.queues[dir as usize];
            if let Some(i) = q.iter().position(|w| Arc::ptr_eq(w, waiter)) {
                q.remove(i);
                member.parked.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Grant requests while the budget allows, taking members in turn;
    /// then arm a timer for the next one if any waits and none is armed.
    fn schedule(self: &Arc<Self>, s: &mut State, dir: Direction) {
        let released = self.released.load(Ordering::SeqCst);
        loop {
            s.buckets.leak(Instant::now());
            let wait = if released {
                Duration::ZERO
            } else {
                s.buckets.wait(dir)
            };
            if !wait.is_zero() {
                if s.timer[dir as usize].is_none() && self.any_eligible(s, dir) {
                    self.arm_timer(s, dir, Instant::now() + wait);
                }
                return;
            }
            if !self.grant_one(s, dir, released) {
                return;
            }
        }
    }

    fn any_eligible(&self, s: &State, dir: Direction) -> bool {
        s.members.iter().any(|m| {
            !m.queues[dir as usize].is_empty()
                && m.member.upgrade().is_some_and(|mb| !mb.is_quiesced())
        })
    }

    /// Grant the next request, the members taking turns; false if no
    /// member that is not drained has one queued.
    fn grant_one(&self, s: &mut State, dir: Direction, released: bool) -> bool {
        let n = s.members.len();
        for k in 0..n {
            let i = (s.turn[dir as usize] + k) % n;
            let Some(member) = s.members[i].member.upgrade() else {
                continue;
            };
            let Some(waiter) = s.members[i].queues[dir as usize].pop_front() else {
                continue;
            };
            // Unpark, then look at the drain state: either a drain that
            // starts now sees the request unparked (and waits for it), or
            // we see the drain and park it again.
            member.parked.fetch_sub(1, Ordering::SeqCst);
            fence::light();
            if member.is_quiesced() {
                s.members[i].queues[dir as usize].push_front(waiter);
                member.parked.fetch_add(1, Ordering::SeqCst);
                kick_waiters();
                continue;
            }
            if !released {
                s.buckets.account(dir, waiter.bytes);
            }
            s.turn[dir as usize] = (i + 1) % n;
            waiter.grant();
            return true;
        }
        false
    }

    /// A timer on the calling iothread's ring: at `deadline` it grants
    /// what the budget allows then. Outside an iothread (a control thread
    /// restarting the group) none is armed: queued requests arm their own
    /// when woken.
    fn arm_timer(self: &Arc<Self>, s: &mut State, dir: Direction, deadline: Instant) {
        if !uring::on_iothread() {
            return;
        }
        let generation = s.generation;
        s.timer[dir as usize] = Some(generation);
        let group = Arc::downgrade(self);
        uring::spawn(async move {
            if let Err(e) = ops::sleep_until(deadline).await {
                log::error!("throttle timer: {e}");
            }
            let Some(group) = group.upgrade() else {
                return;
            };
            let mut s = group.state();
            if s.timer[dir as usize] != Some(generation) {
                return;
            }
            s.timer[dir as usize] = None;
            group.schedule(&mut s, dir);
        });
    }

    /// The filter node entered a drained section: nothing of `member` is
    /// granted until it ends.
    pub(super) fn member_drained_begin(&self, member: &Member) {
        member.quiesced.fetch_add(1, Ordering::SeqCst);
    }

    /// The section ended: the member's queued requests go on with the
    /// budget the group has.
    pub(super) fn member_drained_end(&self, member: &Arc<Member>) {
        if member.quiesced.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let mut s = self.state();
        let i = s.member_index(member);
        for q in &s.members[i].queues {
            if let Some(w) = q.front() {
                w.nudge();
            }
        }
    }
}

//! Adaptive busy-polling before the iothread sleeps, as QEMU's AioContext
//! does (poll-max-ns): a kick or completion that arrives within the polling
//! window costs no sleep/wake-up, and while we poll the guest need not kick.
//!
//! Spinning costs a CPU, which on a small machine is one the client or the
//! kernel needed, so it is rationed: a process-wide [`SpinBudget`], no
//! spinning for queues whose driver polls itself ([`DriverPollDetector`]),
//! separate windows for waits on new requests and on our own I/O (the
//! executor), so slow disk I/O does not teach the thread to spin, and a
//! window that halves when spinning gets descheduled (a contended CPU).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Something an iothread can poll for work without blocking (a virtqueue).
pub(crate) trait Poller {
    /// Look for new work and start it; true if any was found.
    fn poll(self: std::rc::Rc<Self>) -> bool;
    /// Polling is over and the thread will sleep: re-enable notifications.
    /// True if work turned up while they were off (it has been started).
    fn poll_end(self: std::rc::Rc<Self>) -> bool;
    /// Requests it started are still running (so the wait is likely for
    /// their I/O to complete rather than for new work).
    fn io_in_flight(&self) -> bool;
    /// Its driver busy-polls for our completions: then spinning for its
    /// requests only takes a CPU from it (it is awake and submits without
    /// waiting, and it kicks once per sleep of ours, which batches its
    /// requests), so the iothread does not spin for this poller.
    fn driver_polls(&self) -> bool;
}

/// The iothreads of this process that may busy-poll at the same time.
/// Spinning only pays when whoever will hand us work (the client, the
/// kernel completing our I/O) runs on another CPU meanwhile; on a small
/// machine every spinning iothread takes a CPU from them. So spinning
/// needs a slot, and there are `cpus - max(1, polling drivers)`: one CPU
/// is always left for the clients and the kernel, and a driver that polls
/// its used ring (it asked for no notifications) spins on a CPU of its
/// own, which is one fewer for us. A thread that gets no slot sleeps at
/// once, as with a zero window.
pub(super) struct SpinBudget {
    spinning: AtomicUsize,
    polling_drivers: AtomicUsize,
}

/// The process-wide budget.
pub(super) static BUDGET: SpinBudget = SpinBudget::new();

/// How many iothreads may spin at once on `cpus` CPUs while
/// `polling_drivers` virtqueue drivers spin on theirs.
pub(super) fn spin_slots(cpus: usize, polling_drivers: usize) -> usize {
    cpus.saturating_sub(polling_drivers.max(1))
}

/// The CPUs this process may run on (affinity and cgroup quota), read once.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl SpinBudget {
    pub(super) const fn new() -> Self {
        SpinBudget {
            spinning: AtomicUsize::new(0),
            polling_drivers: AtomicUsize::new(0),
        }
    }

    /// A slot to spin in on this machine, if one is free.
    pub(super) fn claim(&self) -> Option<SpinSlot<'_>> {
        self.claim_on(cpus())
    }

    fn claim_on(&self, cpus: usize) -> Option<SpinSlot<'_>> {
        let slots = spin_slots(cpus, self.polling_drivers.load(Ordering::Relaxed));
        self.spinning
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < slots).then_some(n + 1)
            })
            .ok()
            .map(|_| SpinSlot(self))
    }
}

/// A claimed spinning slot, given back when dropped.
pub(super) struct SpinSlot<'a>(&'a SpinBudget);

impl Drop for SpinSlot<'_> {
    fn drop(&mut self) {
        self.0.spinning.fetch_sub(1, Ordering::Release);
    }
}

/// Held while a virtqueue's driver polls its used ring instead of waiting
/// for notifications: such a driver keeps a CPU busy, see [`SpinBudget`].
pub(crate) struct PollingDriver(&'static SpinBudget);

impl PollingDriver {
    pub(crate) fn new() -> Self {
        Self::counted_in(&BUDGET)
    }

    fn counted_in(budget: &'static SpinBudget) -> Self {
        budget.polling_drivers.fetch_add(1, Ordering::Relaxed);
        PollingDriver(budget)
    }
}

impl Default for PollingDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PollingDriver {
    fn drop(&mut self) {
        self.0.polling_drivers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells a driver that polls the used ring from one that waits for
/// notifications: an interrupt-driven driver asks to be notified again
/// after every batch it reaps (EVENT_IDX used_event moves, or
/// VRING_AVAIL_F_NO_INTERRUPT is clear), so at least once a queue's worth
/// of completions. A driver that needed no notification for many queues'
/// worth reaps by polling.
#[derive(Default)]
pub(crate) struct DriverPollDetector {
    unnotified: u32,
}

impl DriverPollDetector {
    /// Completions without a needed notification after which the driver
    /// counts as polling (several full 1024-entry queues' worth).
    const POLLING_AFTER: u32 = 4096;

    /// A completion was put on the used ring.
    pub(crate) fn completed(&mut self) {
        self.unnotified = self.unnotified.saturating_add(1);
    }

    /// The used ring was checked for whether the driver wants a
    /// notification (`needed`). Returns whether the driver seems to poll.
    pub(crate) fn checked(&mut self, needed: bool) -> bool {
        if needed {
            self.unnotified = 0;
        }
        self.unnotified >= Self::POLLING_AFTER
    }
}

/// QEMU's adaptive window: grow when sleeps are short, shrink when long.
pub(super) struct PollWindow {
    max: Duration,
    current: Duration,
}

const START: Duration = Duration::from_micros(4);

impl PollWindow {
    pub(super) fn new(max: Duration) -> Self {
        PollWindow {
            max,
            current: Duration::ZERO,
        }
    }

    pub(super) fn current(&self) -> Duration {
        self.current
    }

    /// Adjust after a wait (polling plus sleeping) that took `waited`.
    pub(super) fn adjust(&mut self, waited: Duration) {
        if waited <= self.current {
            // Polling found the work: the window is right.
        } else if waited > self.max {
            // Polling would have had to last too long: poll less.
            self.shrink();
        } else if self.current < self.max {
            // The work came soon after we gave up polling: poll longer.
            self.current = if self.current.is_zero() {
                START
            } else {
                (self.current * 2).min(self.max)
            };
        }
    }

    /// Poll less: halve the window (closing it below the start size).
    /// After a wait too long to poll through, and when we were descheduled
    /// while spinning (others want this CPU).
    pub(super) fn shrink(&mut self) {
        self.current /= 2;
        if self.current < START {
            self.current = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_on_short_waits_and_shrinks_on_long_ones() {
        let mut w = PollWindow::new(Duration::from_micros(32));
        w.adjust(Duration::from_micros(10));
        assert_eq!(w.current(), START);
        w.adjust(Duration::from_micros(10));
        w.adjust(Duration::from_micros(10));
        assert_eq!(w.current(), Duration::from_micros(16));
        w.adjust(Duration::from_micros(12));
        assert_eq!(
            w.current(),
            Duration::from_micros(16),
            "success inside the window keeps it"
        );
        w.adjust(Duration::from_micros(20));
        w.adjust(Duration::from_micros(20));
        assert_eq!(
            w.current(),
            Duration::from_micros(32),
            "capped at the maximum"
        );
        w.adjust(Duration::from_millis(5));
        assert_eq!(w.current(), Duration::from_micros(16));
        for _ in 0..4 {
            w.adjust(Duration::from_millis(5));
        }
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn one_cpu_is_left_to_clients_and_each_polling_driver_takes_one() {
        assert_eq!(spin_slots(1, 0), 0, "one CPU: whoever kicks us needs it");
        assert_eq!(spin_slots(2, 0), 1);
        assert_eq!(spin_slots(2, 1), 1);
        assert_eq!(spin_slots(2, 2), 0, "two polling clients fill two CPUs");
        assert_eq!(spin_slots(8, 3), 5);
        assert_eq!(spin_slots(2, 5), 0);
    }

    #[test]
    fn slots_are_claimed_and_given_back() {
        static B: SpinBudget = SpinBudget::new();
        let a = B.claim_on(3).expect("first of two slots");
        let b = B.claim_on(3).expect("second of two slots");
        assert!(B.claim_on(3).is_none(), "budget spent");
        drop(a);
        let c = B.claim_on(3).expect("a given-back slot");
        // A driver that starts polling takes a slot from new claims.
        let d = PollingDriver::counted_in(&B);
        let e = PollingDriver::counted_in(&B);
        drop((b, c));
        let f = B.claim_on(3).expect("3 CPUs - 2 polling drivers");
        assert!(B.claim_on(3).is_none());
        drop((d, e, f));
        assert_eq!(B.spinning.load(Ordering::Relaxed), 0);
        assert_eq!(B.polling_drivers.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_driver_that_never_asks_for_notifications_polls() {
        let mut d = DriverPollDetector::default();
        // An interrupt-driven driver asks again after each batch it reaps.
        for _ in 0..100 {
            for _ in 0..32 {
                d.completed();
                assert!(!d.checked(false));
            }
            d.completed();
            assert!(!d.checked(true));
        }
        // A polling one never does.
        for _ in 1..DriverPollDetector::POLLING_AFTER {
            d.completed();
            assert!(!d.checked(false));
        }
        d.completed();
        assert!(d.checked(false));
        // Batched checks count every completion since the last one.
        assert!(d.checked(false));
        assert!(!d.checked(true), "asking again ends it at once");
    }

    #[test]
    fn contention_shrinks_the_window_and_short_waits_regrow_it() {
        let mut w = PollWindow::new(Duration::from_micros(32));
        for _ in 0..4 {
            w.adjust(Duration::from_micros(20));
        }
        assert_eq!(w.current(), Duration::from_micros(32));
        w.shrink();
        assert_eq!(w.current(), Duration::from_micros(16));
        for _ in 0..3 {
            w.shrink();
        }
        assert_eq!(w.current(), Duration::ZERO);
        w.adjust(Duration::from_micros(20));
        assert_eq!(w.current(), START);
    }

    #[test]
    fn disabled_when_max_is_zero() {
        let mut w = PollWindow::new(Duration::ZERO);
        w.adjust(Duration::from_micros(1));
        assert_eq!(w.current(), Duration::ZERO);
    }
}

//! In-flight counters and the wait-until-idle primitive drain is built on.
//!
//! Counters are plain atomics touched by iothreads on every request. A
//! thread that must wait for them to reach zero (the control thread during
//! a drain) registers an eventfd first; every 1 -> 0 transition kicks the
//! registered eventfds, so the waiter sleeps instead of spinning and
//! re-checks its condition on each kick.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::uring::signal_eventfd;

/// Waiters registered right now; read on every 1 -> 0 transition so the
/// common case (nobody draining) costs one load.
static WAITER_COUNT: AtomicUsize = AtomicUsize::new(0);
static WAITERS: Mutex<Vec<Arc<EventFd>>> = Mutex::new(Vec::new());

/// Shards per counter. Each thread counts in one shard (chosen once per
/// thread, round robin), so iothreads serving queues of one BlockBackend
/// or node do not bounce one cache line between them on every request;
/// readers (drain, statistics) sum the shards.
pub(super) const SHARDS: usize = 8;

/// One shard on a cache line of its own (128 bytes: adjacent-line
/// prefetching pairs 64-byte lines on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    started: AtomicU64,
    finished: AtomicU64,
}

impl Shard {
    const fn new() -> Self {
        Shard {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

pub(super) fn my_shard() -> usize {
    MY_SHARD.with(|s| *s)
}

/// Requests in flight somewhere (a node, a BlockBackend), kept as two
/// totals, started and finished, so the number started since open comes
/// for free. Sharded per thread (see [`SHARDS`]).
#[derive(Debug, Default)]
pub struct InFlightCounter {
    shards: [Shard; SHARDS],
}

impl InFlightCounter {
    pub const fn new() -> Self {
        InFlightCounter {
            shards: [const { Shard::new() }; SHARDS],
        }
    }

    pub fn get(&self) -> u64 {
        // Every finish counted was preceded by its start: summing the
        // finished totals first and the started ones after (all SeqCst)
        // never goes negative, wherever each request was counted.
        let finished: u64 = self
            .shards
            .iter()
            .map(|s| s.finished.load(Ordering::SeqCst))
            .sum();
        let started: u64 = self
            .shards
            .iter()
            .map(|s| s.started.load(Ordering::SeqCst))
            .sum();
        started.wrapping_sub(finished)
    }

    /// Requests started since the counter was made.
    pub fn started(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.started.load(Ordering::Relaxed))
            .sum()
    }

    /// SeqCst pairs with `poll_while`: either the waiter sees this request,
    /// or the request's owner sees the drain that started (see callers).
    pub fn inc(&self) {
        self.inc_in(my_shard());
    }

    fn inc_in(&self, shard: usize) {
        self.shards[shard].started.fetch_add(1, Ordering::SeqCst);
    }

    pub fn dec(&self) {
        self.dec_in(my_shard());
    }

    fn dec_in(&self, shard: usize) {
        self.shards[shard].finished.fetch_add(1, Ordering::SeqCst);
        // Nobody waits (the common case): one load. A waiter registers
        // before it checks the counters (both SeqCst), so either it sees
        // this finish or we see it registered.
        if WAITER_COUNT.load(Ordering::SeqCst) == 0 {
            return;
        }
        // Idle now (a request started since will kick when it finishes).
        if self.get() == 0 {
            kick_waiters();
        }
    }

    /// Count one request for as long as the guard lives.
    pub fn guard(&self) -> InFlight<'_> {
        let shard = my_shard();
        self.inc_in(shard);
        InFlight(self, shard)
    }
}

/// One request counted in an `InFlightCounter` (in the shard it started in).
pub struct InFlight<'a>(&'a InFlightCounter, usize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec_in(self.1);
    }
}

/// Wake every thread sleeping in `poll_while` so it re-checks.
pub fn kick_waiters() {
    if WAITER_COUNT.load(Ordering::SeqCst) == 0 {
        return;
    }
    for fd in WAITERS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if let Err(e) = signal_eventfd(fd.as_raw_fd()) {
            log::error!("cannot wake a drain waiter: {e}");
        }
    }
}

thread_local! {
    static MY_EVENTFD: RefCell<Option<Arc<EventFd>>> = const { RefCell::new(None) };
}

/// Registration of the calling thread's eventfd; removed on drop.
struct Registration(Arc<EventFd>);

impl Registration {
    fn new() -> std::io::Result<Self> {
        let fd = MY_EVENTFD.with(|slot| -> std::io::Result<Arc<EventFd>> {
            let mut slot = slot.borrow_mut();
            if let Some(fd) = slot.as_ref() {
                return Ok(fd.clone());
            }
            let fd = Arc::new(EventFd::new(libc::EFD_CLOEXEC)?);
            *slot = Some(fd.clone());
            Ok(fd)
        })?;
        WAITERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fd.clone());
        WAITER_COUNT.fetch_add(1, Ordering::SeqCst);
        Ok(Registration(fd))
    }

    fn wait(&self) {
        if let Err(e) = self.0.read() {
            log::error!("drain waiter eventfd: {e}");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        WAITER_COUNT.fetch_sub(1, Ordering::SeqCst);
        let mut w = WAITERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = w.iter().position(|f| Arc::ptr_eq(f, &self.0)) {
            w.swap_remove(i);
        }
    }
}

/// Block the calling (control) thread while `busy()` holds. `busy` is
/// re-evaluated after every 1 -> 0 transition of any counter, so it must
/// walk the graph afresh each time: nodes may come and go while we wait.
/// Never call this on an iothread: the requests it waits for run there.
pub fn poll_while(mut busy: impl FnMut() -> bool) {
    if !busy() {
        return;
    }
    let reg = match Registration::new() {
        Ok(r) => r,
        Err(e) => {
            // Without an eventfd, fall back to yielding; correctness first.
            log::error!("cannot create a drain eventfd ({e}); polling instead");
            while busy() {
                std::thread::yield_now();
            }
            return;
        }
    };
    // Registered before this check: a transition after it kicks us.
    while busy() {
        reg.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waiter_wakes_when_the_counter_reaches_zero() {
        let c = Arc::new(InFlightCounter::new());
        c.inc();
        c.inc();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            // Completions arrive while the waiter sleeps.
            std::thread::sleep(Duration::from_millis(20));
            c2.dec();
            std::thread::sleep(Duration::from_millis(20));
            c2.dec();
        });
        poll_while(|| c.get() > 0);
        assert_eq!(c.get(), 0);
        t.join().unwrap();
    }

    #[test]
    fn idle_counter_returns_at_once_without_registering() {
        let c = InFlightCounter::new();
        let g = c.guard();
        assert_eq!(c.get(), 1);
        drop(g);
        poll_while(|| c.get() > 0);
    }
}

//! The memory O_DIRECT bounce buffers may use on one iothread.
//!
//! A guest buffer the kernel will not take directly (misaligned) is copied
//! through aligned host memory one chunk of at most [`CHUNK`] bytes at a
//! time, whatever the request's size, and each bouncing request first takes
//! a lease of its chunk from its iothread's budget. So, per iothread:
//!
//! ```text
//! bounce memory <= BUDGET                       (= 16 × CHUNK = 4 MiB)
//! per request   <= CHUNK                        (= 256 KiB)
//! ```
//!
//! however many queues, requests or guests share the iothread; requests
//! beyond the budget wait (asynchronously, in arrival order of wakeups)
//! holding no bounce memory. One caveat: if a request's future were dropped
//! while its chunk is in the kernel, the ring keeps that chunk until the
//! completion after the lease ended; request futures run to completion, so
//! this only happens when an iothread is torn down.
//!
//! The budget is thread-local: the non-bounce path never touches it, and
//! the bounce path takes no lock.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Largest bounce chunk; a multiple of every O_DIRECT alignment we accept
/// (at most the 4 KiB block size).
pub(crate) const CHUNK: usize = 256 << 10;
/// Bounce memory one iothread may have out at once.
pub(crate) const BUDGET: usize = 16 * CHUNK;

#[derive(Default)]
struct Budget {
    in_use: Cell<usize>,
    waiters: RefCell<Vec<Waker>>,
    /// For tests and diagnostics: the most ever in use, and how many
    /// leases were granted and had to wait.
    peak: Cell<usize>,
    leases: Cell<u64>,
    waited: Cell<u64>,
}

thread_local! {
    static BUDGET_HERE: Budget = Budget::default();
}

/// Bytes of this iothread's bounce budget, returned on drop.
pub(crate) struct Lease {
    bytes: usize,
}

/// Wait until `bytes` (at most [`CHUNK`]) of this thread's budget are free
/// and take them.
pub(crate) async fn lease(bytes: usize) -> Lease {
    let bytes = bytes.min(CHUNK);
    let mut waited = false;
    poll_fn(|cx| {
        BUDGET_HERE.with(|b| {
            // Cannot overflow: in_use <= BUDGET and bytes <= CHUNK.
            if b.in_use.get() + bytes <= BUDGET {
                b.in_use.set(b.in_use.get() + bytes);
                b.peak.set(b.peak.get().max(b.in_use.get()));
                b.leases.set(b.leases.get() + 1);
                b.waited.set(b.waited.get() + waited as u64);
                Poll::Ready(Lease { bytes })
            } else {
                waited = true;
                b.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
    })
    .await
}

impl Drop for Lease {
    fn drop(&mut self) {
        let waiters = BUDGET_HERE.with(|b| {
            b.in_use.set(b.in_use.get().saturating_sub(self.bytes));
            std::mem::take(&mut *b.waiters.borrow_mut())
        });
        // Everyone waiting looks again; those that still do not fit queue up anew.
        for w in waiters {
            w.wake();
        }
    }
}

#[cfg(test)]
/// This thread's budget figures: (in use, peak, leases granted, leases
/// that waited).
pub(crate) fn usage() -> (usize, usize, u64, u64) {
    BUDGET_HERE.with(|b| (b.in_use.get(), b.peak.get(), b.leases.get(), b.waited.get()))
}

//! Thread slots: a small number of indices, each held by at most one
//! iothread at a time. A counter kept per slot has one writer, so the
//! writer bumps it with a plain load and store instead of a locked
//! read-modify-write (which on x86 also waits for every earlier store of
//! the request, a 4 KiB buffer fill for instance, to drain). Threads
//! without a slot (more iothreads than slots, the control thread, short
//! `block_on` threads) share one extra index with atomic updates.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

/// Slots to hand out; the shared index is `THREAD_SLOTS`.
pub(crate) const THREAD_SLOTS: usize = 16;

/// Bit i set: slot i is held.
static TAKEN: AtomicU32 = AtomicU32::new(0);

thread_local! {
    static MINE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The slot the calling thread holds, if any: only this thread writes
/// per-slot counters at that index.
pub(crate) fn thread_slot() -> Option<usize> {
    MINE.with(Cell::get)
}

/// A held slot; released on drop. Held by an iothread from before its
/// runtime starts until after the runtime and every task on it are gone,
/// so nothing that counted in the slot outlives the lease.
pub(super) struct SlotLease(usize);

impl SlotLease {
    /// Take a free slot for the calling thread; None if all are held.
    pub(super) fn acquire() -> Option<SlotLease> {
        let mut taken = TAKEN.load(Ordering::Relaxed);
        loop {
            let free = (!taken).trailing_zeros() as usize;
            if free >= THREAD_SLOTS {
                return None;
            }
            // Acquire: the previous holder's last counts happen before ours.
            match TAKEN.compare_exchange_weak(
                taken,
                taken | 1 << free,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    MINE.with(|m| m.set(Some(free)));
                    return Some(SlotLease(free));
                }
                Err(now) => taken = now,
            }
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        MINE.with(|m| m.set(None));
        // Release: our counts happen before the next holder's.
        TAKEN.fetch_and(!(1 << self.0), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_held_by_one_thread_at_a_time_and_freed_on_drop() {
        let lease = SlotLease::acquire().expect("a free slot");
        let mine = thread_slot().expect("the lease is this thread's");
        assert_eq!(mine, lease.0);
        let other = std::thread::spawn(move || {
            let l = SlotLease::acquire();
            (thread_slot(), l.as_ref().map(|l| l.0))
        })
        .join()
        .unwrap();
        assert_eq!(other.0, other.1, "the other thread sees its own slot");
        assert_ne!(other.1, Some(mine), "a held slot is not handed out again");
        drop(lease);
        assert_eq!(thread_slot(), None);
    }
}

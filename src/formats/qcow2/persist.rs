//! Metadata that reaches the image file before a request completes.
//!
//! ringblk promises that a write the guest saw complete survives the death
//! of the daemon (SIGKILL, a panic, the OOM killer), not only a clean stop.
//! For qcow2 that means the metadata making the data reachable (refcount
//! blocks, L2 entries) must be in the image file (the page cache is
//! enough: the kernel keeps it when the process dies) before the request's
//! used entry is written. A host crash still needs a flush (fdatasync).
//!
//! Changes are counted in generations. Every change to the cached tables
//! happens under the metadata lock in the open generation. A write-back
//! closes that generation under the lock, takes a snapshot of the changed
//! chunks of every dirty table, and writes it *without* the lock (refcount
//! blocks first, then L2 tables: QEMU's order), so allocations go on
//! meanwhile; once written, the generation is persisted. A request that
//! changed metadata, or that used a mapping someone else changed, waits
//! until the newest changed generation is persisted before it completes.
//! Requests of one loop turn share one write-back: the first to get there
//! yields once, so the others add their changes before it takes the
//! snapshot (group commit), and whoever arrives while one is in flight
//! usually finds its generation persisted by the next.
//!
//! At most one write-back is in flight ([`WriteBack`]). Its tables are
//! marked as writing: they are not evicted (a reload would read the file
//! before the write lands), and every other write of a table under the
//! lock first waits until the write-back is done, so two writes of one
//! table never race. Finishing one needs no lock, so code holding the
//! lock may wait for it. A failed write-back leaves its tables for the
//! next one to mark dirty again; its generation is not persisted.
//!
//! Allocated clusters cost two atomic loads: nothing changed, nothing to
//! wait for.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use super::cache::Changed;

#[derive(Debug)]
pub(crate) struct Generations {
    /// The newest generation in which a cached table changed.
    changed: AtomicU64,
    /// The newest generation whose changes are all in the file.
    persisted: AtomicU64,
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            changed: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
        }
    }
}

impl Generations {
    /// A table changed in generation `gen` (under the metadata lock). The
    /// Release store comes before the change itself is published (an L2
    /// entry's own Release store), so whoever sees the new entry sees a
    /// `changed` at least this new.
    pub(crate) fn note_change(&self, gen: u64) {
        self.changed.fetch_max(gen, Ordering::Release);
    }

    /// Every change of `gen` and before is in the file.
    pub(crate) fn mark_persisted(&self, gen: u64) {
        self.persisted.fetch_max(gen, Ordering::Release);
    }

    pub(crate) fn is_persisted(&self, gen: u64) -> bool {
        self.persisted.load(Ordering::Acquire) >= gen
    }

    /// The generation a completing request must see persisted, if any is
    /// not yet: the newest changed one (a request cannot tell which change
    /// made its data reachable, and waiting for newer ones costs at most
    /// the one write-back it would have joined anyway).
    pub(crate) fn pending(&self) -> Option<u64> {
        let changed = self.changed.load(Ordering::Acquire);
        (!self.is_persisted(changed)).then_some(changed)
    }
}

/// Tables of a failed write-back, to be marked dirty again under the lock.
#[derive(Default)]
pub(crate) struct Failed {
    pub refcounts: Vec<Changed>,
    pub l2: Vec<Changed>,
}

#[derive(Default)]
struct State {
    busy: bool,
    waiters: Vec<Waker>,
    failed: Failed,
}

/// The write-back in flight, if any.
#[derive(Default)]
pub(crate) struct WriteBack {
    state: Mutex<State>,
}

impl WriteBack {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no write-back is in flight.
    pub(crate) fn idle(&self) -> Idle<'_> {
        Idle { wb: self }
    }

    /// A write-back starts (under the metadata lock, after `idle`).
    pub(crate) fn begin(&self) {
        self.state().busy = true;
    }

    /// The write-back in flight ended; `failed` holds what it could not
    /// write. Needs no metadata lock.
    pub(crate) fn end(&self, failed: Failed) {
        let waiters = {
            let mut st = self.state();
            st.busy = false;
            st.failed.refcounts.extend(failed.refcounts);
            st.failed.l2.extend(failed.l2);
            std::mem::take(&mut st.waiters)
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// The refcount blocks failed write-backs left (under the metadata
    /// lock, after `idle`).
    pub(crate) fn take_failed_refcounts(&self) -> Vec<Changed> {
        std::mem::take(&mut self.state().failed.refcounts)
    }

    /// The L2 tables failed write-backs left (as above).
    pub(crate) fn take_failed_l2(&self) -> Vec<Changed> {
        std::mem::take(&mut self.state().failed.l2)
    }
}

pub(crate) struct Idle<'a> {
    wb: &'a WriteBack,
}

impl Future for Idle<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.wb.state();
        if !st.busy {
            return Poll::Ready(());
        }
        if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            st.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_pending_until_its_generation_is_persisted() {
        let g = Generations::default();
        assert_eq!(g.pending(), None);
        g.note_change(1);
        assert_eq!(g.pending(), Some(1));
        g.note_change(2);
        g.mark_persisted(1);
        assert_eq!(g.pending(), Some(2), "generation 2 is not written yet");
        g.mark_persisted(2);
        assert_eq!(g.pending(), None);
        // An older write-back finishing late does not undo a newer one.
        g.mark_persisted(1);
        assert!(g.is_persisted(2));
    }

    #[test]
    fn idle_waits_for_the_write_back_in_flight() {
        use std::sync::Arc;
        let wb = Arc::new(WriteBack::default());
        crate::uring::block_on(|| async {
            wb.idle().await; // nothing in flight
            wb.begin();
            let ender = {
                let wb = wb.clone();
                std::thread::spawn(move || wb.end(Failed::default()))
            };
            wb.idle().await;
            assert!(!wb.state().busy);
            ender.join().unwrap();
        })
        .unwrap();
    }
}

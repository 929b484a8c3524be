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
//! happens under the metadata lock in the open generation; a write-back
//! (`Meta::flush`, also under the lock) closes that generation, writes
//! every dirty table (refcount blocks first, then L2 tables: QEMU's order)
//! and then says the generation is persisted. A request that changed
//! metadata, or that used a mapping someone else changed, waits until the
//! newest changed generation is persisted before it completes. Requests of
//! one loop turn share one write-back: the first to get there yields once,
//! so the others add their changes before it writes (group commit), and
//! whoever waits for the lock behind a write-back usually finds its
//! generation persisted by it.
//!
//! Allocated clusters cost two atomic loads: nothing changed, nothing to
//! wait for.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Generations {
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
    pub fn note_change(&self, gen: u64) {
        self.changed.fetch_max(gen, Ordering::Release);
    }

    /// Every change of `gen` and before is in the file.
    pub fn mark_persisted(&self, gen: u64) {
        self.persisted.fetch_max(gen, Ordering::Release);
    }

    pub fn is_persisted(&self, gen: u64) -> bool {
        self.persisted.load(Ordering::Acquire) >= gen
    }

    /// The generation a completing request must see persisted, if any is
    /// not yet: the newest changed one (a request cannot tell which change
    /// made its data reachable, and waiting for newer ones costs at most
    /// the one write-back it would have joined anyway).
    pub fn pending(&self) -> Option<u64> {
        let changed = self.changed.load(Ordering::Acquire);
        (!self.is_persisted(changed)).then_some(changed)
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
}

//! A dirty bitmap written by iothreads and drained by a job: one bit per
//! granule, set after a guest write completes, cleared by the copier just
//! before it copies that granule. A write that completes after the copier
//! read the granule sets the bit again, so the granule is copied again:
//! nothing written is ever left behind.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

pub(super) struct DirtyMap {
    gran_bits: u32,
    size: u64,
    words: Vec<AtomicU64>,
    /// The copier sleeps on `wake` while there is nothing to do; set
    /// before it checks a last time, so a marker knows to notify it.
    sleeping: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Granules copied at once, at most (1 MiB at the 64 KiB granularity).
const MAX_RUN: u64 = 16;

impl DirtyMap {
    /// A clean map of a `size`-byte disk in granules of `1 << gran_bits`.
    pub(super) fn new(size: u64, gran_bits: u32) -> DirtyMap {
        let granules = size.div_ceil(1 << gran_bits);
        DirtyMap {
            gran_bits,
            size,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            sleeping: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    pub(super) fn granularity(&self) -> u64 {
        1 << self.gran_bits
    }

    pub(super) fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Mark `[offset, offset + len)` dirty (bytes past the map are
    /// ignored: the filter refuses to grow the disk during a job).
    pub(super) fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.gran_bits;
        let last = (end - 1) >> self.gran_bits;
        for g in first..=last {
            self.words[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::SeqCst);
        }
        // SeqCst with `sleep_while_clean`: either it sees our bits, or we
        // see that it sleeps.
        if self.sleeping.load(Ordering::SeqCst) {
            self.notify();
        }
    }

    /// Wake the copier (new dirt, a drained section ended, a stop).
    pub(super) fn notify(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    /// Bytes marked (whole granules: an estimate at the disk's end).
    pub(super) fn dirty_bytes(&self) -> u64 {
        let bits: u64 = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        bits << self.gran_bits
    }

    pub(super) fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::SeqCst) == 0)
    }

    /// Clear and return the next run of dirty granules, as a byte range.
    pub(super) fn take_run(&self) -> Option<(u64, u64)> {
        for (i, w) in self.words.iter().enumerate() {
            let bits = w.load(Ordering::SeqCst);
            if bits == 0 {
                continue;
            }
            let first = bits.trailing_zeros() as u64;
            // The contiguous set bits from `first`, up to MAX_RUN.
            let n = ((bits >> first).trailing_ones() as u64).min(MAX_RUN);
            // n <= MAX_RUN < 64, and first + n <= 64: no overflow.
            let mask = ((1u64 << n) - 1) << first;
            w.fetch_and(!mask, Ordering::SeqCst);
            let g = i as u64 * 64 + first;
            let start = g << self.gran_bits;
            let len = (n << self.gran_bits).min(self.size - start);
            return Some((start, len));
        }
        None
    }

    /// Sleep while nothing is dirty and `keep_sleeping` holds (whoever
    /// makes it false calls `notify`).
    pub(super) fn sleep_while_clean(&self, keep_sleeping: impl Fn() -> bool) {
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.store(true, Ordering::SeqCst);
        while self.is_clean() && keep_sleeping() {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Sleep until `done` holds; whoever changes it calls `notify`.
    pub(super) fn wait_until(&self, done: impl Fn() -> bool) {
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !done() {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_bounded_and_cleared() {
        let m = DirtyMap::new(10 << 20, 16); // 160 granules of 64 KiB
        assert!(m.is_clean());
        m.mark(65536 * 3, 1);
        m.mark(65536 * 4 + 5, 65536 * 30);
        m.mark(65536 * 60, 65536 * 8); // across a word boundary
        m.mark(65536 * 159, 1 << 30); // past the end: clipped
        assert_eq!(m.dirty_bytes(), 65536 * (32 + 8 + 1));
        // Granules 3..=34: two runs of at most 16.
        assert_eq!(m.take_run(), Some((65536 * 3, 65536 * 16)));
        assert_eq!(m.take_run(), Some((65536 * 19, 65536 * 16)));
        // Runs stop at a word's end.
        assert_eq!(m.take_run(), Some((65536 * 60, 65536 * 4)));
        assert_eq!(m.take_run(), Some((65536 * 64, 65536 * 4)));
        assert_eq!(m.take_run(), Some((65536 * 159, 65536)));
        assert_eq!(m.take_run(), None);
        assert!(m.is_clean());
    }

    #[test]
    fn the_last_granule_of_an_odd_sized_disk_is_short() {
        let m = DirtyMap::new(65536 + 512, 16);
        m.mark(65536, 512);
        assert_eq!(m.take_run(), Some((65536, 512)));
    }

    #[test]
    fn a_mark_wakes_a_sleeping_copier() {
        let m = std::sync::Arc::new(DirtyMap::new(1 << 20, 16));
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            m2.sleep_while_clean(|| true);
            m2.take_run()
        });
        m.mark(0, 1);
        assert_eq!(t.join().unwrap(), Some((0, 65536)));
    }
}

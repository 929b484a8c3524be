//! Lookups of cached L2 entries without the metadata lock.
//!
//! Each thread that looks up through a driver owns a slot here (picked by
//! a thread-local number) that remembers, by L1 index, the L2 tables it
//! has used: `Arc`s of the very tables the metadata cache holds, so an
//! entry the allocator sets there (`Table::set`, under the lock) is seen
//! at once. A slot's mutex is only ever taken by its own thread (unless
//! more threads than slots collide), so a lookup writes nothing another
//! iothread reads: no shared lock word, no waker, no LRU tick.
//!
//! A slot keeps only tables that were in the metadata cache at its
//! generation. The metadata side bumps the generation whenever a table
//! leaves the cache (its later updates go to a fresh copy), and a slot that
//! sees a newer generation forgets everything. Entries of a table still
//! in the cache are never stale, so all a lock-free reader can miss is an
//! update racing with its own request, where either order is allowed.
//!
//! Why a lock-free reader may use an entry that is changing under it:
//! - An entry appears only after the cluster's data is in the file
//!   (`allocating_write` sets it last), and its Release store pairs with
//!   the Acquire load here: whoever sees it sees the data.
//! - An entry that goes away (discard, write zeroes) frees its host
//!   cluster, but the allocator never hands out a freed cluster again
//!   while the image is open (`Refcounts::next_free` only moves forward;
//!   a reopen that reloads refcounts runs drained). A request holding the
//!   old mapping therefore touches only that unreferenced cluster: it
//!   reads old data or zeros, or writes into nothing, as if it had run
//!   just before the discard. (`inflight::ClusterLocks` plays no part in
//!   this: it only keeps two allocations of one guest cluster apart.)
//! - Writes take this path only for `Data { copied: true }` (refcount one,
//!   no COW); everything else goes to the locked paths as before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::cache::Table;

/// Slots per driver; threads beyond that share slots (correct, slower).
const SLOTS: usize = 64;

/// Keeps each slot on its own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Default)]
struct Local {
    gen: u64,
    /// Direct-mapped by L1 index: (L1 index, table). Empty until first use.
    tables: Vec<Option<(usize, Arc<Table>)>>,
}

pub(super) struct FastMap {
    gen: Arc<AtomicU64>,
    /// Entries per slot, a power of two.
    ways: usize,
    slots: Box<[Padded<Mutex<Local>>]>,
}

fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    SLOT.with(|s| *s) % SLOTS
}

impl FastMap {
    /// `gen` is the metadata's `l2_gen`; `tables` how many tables a thread
    /// should remember (rounded to a power of two, at most 4096).
    pub(super) fn new(gen: Arc<AtomicU64>, tables: usize) -> Self {
        FastMap {
            gen,
            ways: tables.clamp(1, 4096).next_power_of_two(),
            slots: (0..SLOTS)
                .map(|_| Padded(Mutex::new(Local::default())))
                .collect(),
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.slots[thread_slot()]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Entry `l2i` of the L2 table for `l1i`, if this thread remembers it.
    pub(super) fn get(&self, l1i: usize, l2i: usize) -> Option<u64> {
        let gen = self.gen.load(Ordering::Acquire);
        let mut local = self.local();
        if local.gen != gen {
            local.tables.clear();
            local.gen = gen;
            return None;
        }
        match local.tables.get(l1i & (self.ways - 1)) {
            Some(Some((i, t))) if *i == l1i => {
                t.touch();
                Some(t.get(l2i))
            }
            _ => None,
        }
    }

    /// Remember `table` for `l1i`; `gen` is `l2_gen` as read under the
    /// metadata lock when the table was taken from the cache.
    pub(super) fn put(&self, gen: u64, l1i: usize, table: Arc<Table>) {
        let mut local = self.local();
        if gen < local.gen {
            // The table may have left the cache since: don't keep it.
            return;
        }
        if gen > local.gen {
            local.tables.clear();
            local.gen = gen;
        }
        if local.tables.is_empty() {
            local.tables.resize(self.ways, None);
        }
        let w = l1i & (self.ways - 1);
        local.tables[w] = Some((l1i, table));
    }
}

//! A cache of cluster-sized metadata tables (L2 tables, refcount blocks),
//! decoded to native u64 entries. Dirty tables are written back by the
//! owner, which knows the ordering rules between caches.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::keyed::U64Map;
use crate::formats::{ChildRef, IoFuture};
use crate::uring::{AlignedBuf, IoVec};

/// How a table's entries are stored on disk.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Encoding {
    /// Big-endian u64 (L1/L2 tables, refcount table).
    Be64,
    /// Refcount block with 2^order-bit entries.
    Refcounts { order: u32 },
}

impl Encoding {
    pub(crate) fn entries(&self, cluster_size: usize) -> usize {
        match self {
            Encoding::Be64 => cluster_size / 8,
            Encoding::Refcounts { order } => (cluster_size * 8) >> order,
        }
    }

    pub(crate) fn decode(&self, raw: &[u8]) -> Vec<u64> {
        match *self {
            Encoding::Be64 => raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Encoding::Refcounts { order } => {
                let bits = 1usize << order;
                (0..raw.len() * 8 / bits)
                    .map(|i| get_bits(raw, i, bits))
                    .collect()
            }
        }
    }

    pub(crate) fn encode(&self, entries: &[u64], raw: &mut [u8]) {
        self.encode_from(entries.iter().copied(), raw)
    }

    /// As `encode`, from any source of entries (a cached table's atomics).
    fn encode_from(&self, entries: impl Iterator<Item = u64>, raw: &mut [u8]) {
        match *self {
            Encoding::Be64 => {
                for (c, v) in raw.chunks_exact_mut(8).zip(entries) {
                    c.copy_from_slice(&v.to_be_bytes());
                }
            }
            Encoding::Refcounts { order } => {
                let bits = 1usize << order;
                for (i, v) in entries.enumerate() {
                    set_bits(raw, i, bits, v);
                }
            }
        }
    }

    /// The entry that starts at `byte` of a table (chunk boundaries are
    /// whole entries for every width).
    fn entry_at_byte(&self, byte: usize) -> usize {
        match *self {
            Encoding::Be64 => byte / 8,
            Encoding::Refcounts { order } => (byte * 8) >> order,
        }
    }

    #[cfg(test)]
    /// Largest value an entry can hold.
    pub(crate) fn max_value(&self) -> u64 {
        match *self {
            Encoding::Be64 => u64::MAX,
            Encoding::Refcounts { order } if order >= 6 => u64::MAX,
            Encoding::Refcounts { order } => (1u64 << (1 << order)) - 1,
        }
    }
}

/// Entry `i` of `bits` width: big-endian for whole bytes, and for sub-byte
/// widths bit 0 is the least significant bit of each byte.
fn get_bits(raw: &[u8], i: usize, bits: usize) -> u64 {
    if bits >= 8 {
        let n = bits / 8;
        raw[i * n..(i + 1) * n]
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | b as u64)
    } else {
        let per = 8 / bits;
        let byte = raw[i / per];
        let shift = (i % per) * bits;
        (byte as u64 >> shift) & ((1 << bits) - 1)
    }
}

fn set_bits(raw: &mut [u8], i: usize, bits: usize, v: u64) {
    if bits >= 8 {
        let n = bits / 8;
        for (k, b) in raw[i * n..(i + 1) * n].iter_mut().enumerate() {
            *b = (v >> (8 * (n - 1 - k))) as u8;
        }
    } else {
        let per = 8 / bits;
        let shift = (i % per) * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        let b = &mut raw[i / per];
        *b = (*b & !mask) | (((v as u8) << shift) & mask);
    }
}

/// The runs of changed chunks of a table, in order: (first chunk, count).
fn runs(chunks: &[bool]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut c = 0;
    std::iter::from_fn(move || {
        c += chunks.get(c..)?.iter().take_while(|d| !**d).count();
        let run = chunks.get(c..)?.iter().take_while(|d| **d).count();
        let start = c;
        c += run;
        (run > 0).then_some((start, run))
    })
}

/// Read `len` bytes at `offset` of `file` into a fresh buffer.
pub(crate) async fn read_bytes(file: &ChildRef, offset: u64, len: usize) -> io::Result<AlignedBuf> {
    let buf = IoVec::from_buf(AlignedBuf::zeroed(len, 4096));
    file.read(offset, &buf).await?;
    buf.into_buf()
        .ok_or_else(|| io::Error::other("read buffer still in use after the read"))
}

/// Write `bytes` at `offset` of `file`.
pub(crate) async fn write_bytes(file: &ChildRef, offset: u64, bytes: &[u8]) -> io::Result<()> {
    let mut buf = AlignedBuf::zeroed(bytes.len(), 4096);
    buf.as_mut_slice().copy_from_slice(bytes);
    file.write_metadata(offset, &IoVec::from_buf(buf)).await
}

/// Run `writes` at once and wait for all of them (a write-back's tables
/// do not depend on one another): the first error, once all are done.
pub(crate) async fn join_all(writes: Vec<IoFuture<'_>>) -> io::Result<()> {
    let mut pending: Vec<Option<IoFuture<'_>>> = writes.into_iter().map(Some).collect();
    let mut first_err = None;
    std::future::poll_fn(|cx| {
        let mut busy = false;
        for slot in pending.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => {
                        *slot = None;
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                    }
                    std::task::Poll::Pending => busy = true,
                }
            }
        }
        if busy {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    first_err.map_or(Ok(()), Err)
}

/// One cached table, shared (`Arc`) between the cache and the lock-free
/// lookup views of `super::fastmap`. Entries change only under the owner's
/// lock; anyone may read them at any time.
pub(crate) struct Table {
    entries: Box<[AtomicU64]>,
    /// Used since the eviction hand last passed (second-chance "clock").
    /// Set without the owner's lock, so lock-free readers keep their tables
    /// warm; only stored when it was clear, so a hot table's cache line
    /// stays shared between threads instead of bouncing.
    referenced: AtomicBool,
    /// A write-back of this table is in flight (or failed and is not yet
    /// marked dirty again): it must not be evicted, since the file does not
    /// hold what the cache does. Cleared without the owner's lock by the
    /// write-back that set it (see `persist`).
    writing: AtomicBool,
}

impl Table {
    fn new(data: Vec<u64>) -> Self {
        Table {
            entries: data.into_iter().map(AtomicU64::new).collect(),
            referenced: AtomicBool::new(true),
            writing: AtomicBool::new(false),
        }
    }

    pub(crate) fn done_writing(&self) {
        self.writing.store(false, Ordering::Release);
    }

    /// Entry `i` (0 past the end). Acquire: pairs with `set`, so whoever
    /// sees a new L2 entry also sees what was done before it was set.
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.entries.get(i).map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// Only the cache's owner, under its lock, calls this.
    pub(crate) fn set(&self, i: usize, v: u64) {
        if let Some(e) = self.entries.get(i) {
            e.store(v, Ordering::Release);
        }
    }

    pub(crate) fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    fn values(&self) -> Vec<u64> {
        self.values_in(0..self.entries.len())
    }

    fn values_in(&self, range: std::ops::Range<usize>) -> Vec<u64> {
        self.iter_in(range).collect()
    }

    /// Entries `range` as they are now (the owner's lock keeps them still).
    fn iter_in(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .get(range)
            .unwrap_or_default()
            .iter()
            .map(|e| e.load(Ordering::Relaxed))
    }
}

struct Slot {
    offset: u64,
    table: Arc<Table>,
    dirty: bool,
    /// Which chunks (see `TableCache::chunk`) changed (meaningful while `dirty`).
    dirty_chunks: Box<[bool]>,
}

/// What making room for one more table takes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Room {
    /// The cache is not full.
    Free,
    /// Drop this table first (writing it back first if dirty).
    Evict { offset: u64, dirty: bool },
    /// Every table has a write-back in flight: wait for it, then ask again.
    Busy,
}

/// Which chunks of the table at `offset` a write-back takes.
pub(crate) struct Changed {
    pub offset: u64,
    pub table: Arc<Table>,
    pub chunks: Box<[bool]>,
}

/// A snapshot of one table's changed chunks, taken under the owner's lock
/// and written without it (`TableCache::snapshot`).
pub(crate) struct TableWrite {
    pub changed: Changed,
    /// (file offset, bytes) per run of changed chunks.
    pub writes: Vec<(u64, IoVec)>,
}

/// Run every write of `tables` at once; on success they are done writing.
/// On failure the caller must mark them dirty again (`TableCache::redirty`).
pub(crate) async fn write_tables(file: &ChildRef, tables: &[TableWrite]) -> io::Result<()> {
    let writes = tables
        .iter()
        .flat_map(|t| t.writes.iter())
        .map(|(at, part)| file.write_metadata(*at, part))
        .collect();
    join_all(writes).await?;
    for t in tables {
        t.changed.table.done_writing();
    }
    Ok(())
}

/// Tables by file offset, at most `capacity` of them; eviction picks by
/// second chance ("clock"): the hand skips (and clears) referenced tables.
pub(crate) struct TableCache {
    encoding: Encoding,
    cluster_size: usize,
    capacity: usize,
    /// Bytes of a table written back as a unit (the file's write
    /// granularity): a write-back after one changed entry writes that
    /// much, not a whole (up to 2 MiB) cluster.
    chunk: usize,
    slots: Vec<Slot>,
    index: U64Map<usize>,
    hand: usize,
    /// Offsets of tables that became dirty (a superset: some may have been
    /// written or evicted since), so a write-back does not scan every slot
    /// of a cache of thousands.
    dirty_list: Vec<u64>,
    /// `store_dirty`'s encoding buffer, kept between write-backs.
    scratch: Vec<u8>,
}

impl TableCache {
    pub(crate) fn new(
        encoding: Encoding,
        cluster_size: usize,
        capacity: usize,
        chunk: usize,
    ) -> Self {
        TableCache {
            encoding,
            cluster_size,
            capacity: capacity.max(2),
            chunk: chunk.max(8),
            slots: Vec::new(),
            index: U64Map::default(),
            hand: 0,
            dirty_list: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.index.contains_key(&offset)
    }

    /// The table at `offset`, if cached.
    pub(crate) fn get(&self, offset: u64) -> Option<&Arc<Table>> {
        let slot = &self.slots[*self.index.get(&offset)?];
        slot.table.touch();
        Some(&slot.table)
    }

    fn chunk_len(&self) -> usize {
        self.chunk.min(self.cluster_size)
    }

    /// Entry `entry` of the table at `offset` changed.
    pub(crate) fn mark_dirty(&mut self, offset: u64, entry: usize) {
        let byte = match self.encoding {
            Encoding::Be64 => entry * 8,
            Encoding::Refcounts { order } => (entry << order) / 8,
        };
        let chunk = byte / self.chunk_len();
        if let Some(&i) = self.index.get(&offset) {
            let slot = &mut self.slots[i];
            if !slot.dirty {
                slot.dirty = true;
                slot.dirty_chunks.fill(false);
                self.dirty_list.push(offset);
            }
            if let Some(c) = slot.dirty_chunks.get_mut(chunk) {
                *c = true;
            }
        }
    }

    /// What inserting another table takes: nothing, an eviction (the
    /// victim, and whether it is dirty), or a wait for the write-back in
    /// flight (tables being written are never evicted). Moves the clock hand.
    pub(crate) fn victim(&mut self) -> Room {
        if self.slots.len() < self.capacity {
            return Room::Free;
        }
        let evict = |s: &Slot| Room::Evict {
            offset: s.offset,
            dirty: s.dirty,
        };
        // Two turns at most: the first clears every bit it passes.
        for _ in 0..2 * self.slots.len() {
            self.hand %= self.slots.len();
            let s = &self.slots[self.hand];
            if !s.table.writing.load(Ordering::Acquire)
                && !s.table.referenced.swap(false, Ordering::Relaxed)
            {
                return evict(s);
            }
            self.hand += 1;
        }
        match self
            .slots
            .iter()
            .find(|s| !s.table.writing.load(Ordering::Acquire))
        {
            Some(s) => evict(s),
            None => Room::Busy,
        }
    }

    /// Drop a clean table (the caller wrote it back if it was dirty).
    pub(crate) fn remove(&mut self, offset: u64) {
        let Some(i) = self.index.remove(&offset) else {
            return;
        };
        self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.offset, i);
        }
    }

    pub(crate) fn insert(&mut self, offset: u64, data: Vec<u64>, dirty: bool) {
        self.remove(offset);
        if dirty {
            self.dirty_list.push(offset);
        }
        self.index.insert(offset, self.slots.len());
        let chunks = self.cluster_size.div_ceil(self.chunk_len());
        self.slots.push(Slot {
            offset,
            table: Arc::new(Table::new(data)),
            dirty,
            dirty_chunks: vec![true; chunks].into_boxed_slice(),
        });
    }

    /// Load a table from disk (not cached yet; the caller inserts it).
    pub(crate) async fn load(&self, file: &ChildRef, offset: u64) -> io::Result<Vec<u64>> {
        let buf = read_bytes(file, offset, self.cluster_size).await?;
        Ok(self.encoding.decode(buf.as_slice()))
    }

    /// Offsets of dirty tables, in file order.
    pub(crate) fn dirty(&mut self) -> Vec<u64> {
        self.tidy_dirty_list();
        self.dirty_list.clone()
    }

    fn tidy_dirty_list(&mut self) {
        let (index, slots) = (&self.index, &self.slots);
        self.dirty_list
            .retain(|o| index.get(o).is_some_and(|&i| slots[i].dirty));
        self.dirty_list.sort_unstable();
        self.dirty_list.dedup();
    }

    /// Write one table back and mark it clean.
    pub(crate) async fn write_back(&mut self, file: &ChildRef, offset: u64) -> io::Result<()> {
        let Some(&i) = self.index.get(&offset) else {
            return Ok(());
        };
        let mut raw = vec![0u8; self.cluster_size];
        self.encoding
            .encode(&self.slots[i].table.values(), &mut raw);
        write_bytes(file, offset, &raw).await?;
        self.slots[i].dirty = false;
        Ok(())
    }

    /// Take the changed chunks of every dirty table for writing: the
    /// tables count as clean from now on, and as writing until the write
    /// is done (`write_tables`) or has failed and they are dirty again
    /// (`redirty`). No write-back of them may be in flight.
    pub(crate) fn snapshot(&mut self) -> Vec<TableWrite> {
        let dirty = self.dirty();
        let chunk = self.chunk_len();
        let mut out = Vec::with_capacity(dirty.len());
        for off in dirty {
            let Some(&i) = self.index.get(&off) else {
                continue;
            };
            let enc = self.encoding;
            let entry_at = |byte: usize| enc.entry_at_byte(byte);
            let slot = &mut self.slots[i];
            // One write per run of changed chunks, encoding only those.
            let mut writes = Vec::new();
            for (c, run) in runs(&slot.dirty_chunks) {
                let mut raw = AlignedBuf::zeroed(run * chunk, 4096);
                let entries = entry_at(c * chunk)..entry_at((c + run) * chunk);
                self.encoding
                    .encode(&slot.table.values_in(entries), raw.as_mut_slice());
                writes.push((off + (c * chunk) as u64, IoVec::from_buf(raw)));
            }
            slot.dirty = false;
            slot.table.writing.store(true, Ordering::Release);
            out.push(TableWrite {
                changed: Changed {
                    offset: off,
                    table: slot.table.clone(),
                    chunks: slot.dirty_chunks.clone(),
                },
                writes,
            });
        }
        self.dirty_list.clear();
        out
    }

    /// Store the changed chunks of every dirty table into the file at
    /// once, where it takes stores (`BlockIo::store_metadata`, a file in
    /// memory): no buffer, no future, no write-back in flight. Ok(false):
    /// some could not be stored, and stay dirty for `snapshot`. No
    /// write-back of these tables may be in flight.
    pub(crate) fn store_dirty(&mut self, file: &ChildRef) -> io::Result<bool> {
        let chunk = self.chunk_len();
        let enc = self.encoding;
        let mut all = true;
        let mut raw = std::mem::take(&mut self.scratch);
        self.tidy_dirty_list();
        let mut dirty = std::mem::take(&mut self.dirty_list);
        for &off in &dirty {
            let Some(&i) = self.index.get(&off) else {
                continue;
            };
            let slot = &mut self.slots[i];
            // Chunks below this are in the file (runs go in order).
            let mut stored_to = slot.dirty_chunks.len();
            let mut failed = None;
            for (c, run) in runs(&slot.dirty_chunks) {
                raw.clear();
                raw.resize(run * chunk, 0);
                let entries = enc.entry_at_byte(c * chunk)..enc.entry_at_byte((c + run) * chunk);
                enc.encode_from(slot.table.iter_in(entries), &mut raw);
                match file.store_metadata(off + (c * chunk) as u64, &raw) {
                    Some(Ok(())) => continue,
                    Some(Err(e)) => failed = Some(e),
                    None => all = false,
                }
                stored_to = c;
                break;
            }
            slot.dirty_chunks[..stored_to].fill(false);
            if let Some(e) = failed {
                self.scratch = raw;
                self.dirty_list = dirty;
                return Err(e);
            }
            if !all {
                break;
            }
            slot.dirty = false;
        }
        self.scratch = raw;
        if all {
            dirty.clear();
        }
        // Tables stored whole stay listed until the next tidy-up.
        self.dirty_list = dirty;
        Ok(all)
    }

    /// A write of `t` failed: its chunks are dirty again (and the table
    /// may be evicted once they are written).
    pub(crate) fn redirty(&mut self, t: &Changed) {
        for (c, _) in t.chunks.iter().enumerate().filter(|(_, d)| **d) {
            let entry = self.encoding.entry_at_byte(c * self.chunk_len());
            self.mark_dirty(t.offset, entry);
        }
        t.table.done_writing();
    }

    /// Write back the changed chunks of every dirty table, all at once;
    /// on failure they stay dirty.
    pub(crate) async fn write_back_all(&mut self, file: &ChildRef) -> io::Result<()> {
        let tables = self.snapshot();
        if let Err(e) = write_tables(file, &tables).await {
            tables.iter().for_each(|t| self.redirty(&t.changed));
            return Err(e);
        }
        Ok(())
    }

    pub(crate) fn encoding(&self) -> Encoding {
        self.encoding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that takes stores below `limit` and records them.
    struct Stores {
        limit: u64,
        got: std::sync::Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl crate::formats::BlockIo for Stores {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
            unreachable!("store_dirty never reads")
        }
        fn write<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
            unreachable!("store_dirty never writes")
        }
        fn store_metadata(&self, offset: u64, bytes: &[u8]) -> Option<io::Result<()>> {
            if offset >= self.limit {
                return None;
            }
            self.got.lock().unwrap().push((offset, bytes.to_vec()));
            Some(Ok(()))
        }
        fn flush(&self) -> IoFuture<'_> {
            unreachable!()
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_> {
            unreachable!()
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> IoFuture<'_> {
            unreachable!()
        }
    }

    fn stores(limit: u64) -> (Arc<Stores>, ChildRef) {
        let s = Arc::new(Stores {
            limit,
            got: Default::default(),
        });
        (s.clone(), s)
    }

    #[test]
    fn stored_at_once_the_changed_chunks_land_encoded_and_the_tables_are_clean() {
        let (seen, file) = stores(u64::MAX);
        let mut c = TableCache::new(Encoding::Be64, 16384, 4, 4096);
        c.insert(16384, (0..2048).collect(), false);
        c.mark_dirty(16384, 3); // chunk 0
        c.mark_dirty(16384, 1500); // chunks 2 and 3
        c.mark_dirty(16384, 1600);
        assert!(c.store_dirty(&file).unwrap());
        let got = seen.got.lock().unwrap().clone();
        let runs: Vec<(u64, usize)> = got.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(runs, vec![(16384, 4096), (16384 + 8192, 8192)]);
        assert_eq!(&got[0].1[24..32], &3u64.to_be_bytes());
        assert_eq!(&got[1].1[..8], &1024u64.to_be_bytes());
        assert!(c.dirty().is_empty());
        assert!(c.snapshot().is_empty(), "nothing left for a write-back");
    }

    #[test]
    fn what_the_file_cannot_store_stays_dirty_for_the_write_back() {
        // Refcount blocks of 16-bit entries; the file takes stores below 32 KiB.
        let (seen, file) = stores(32768);
        let mut c = TableCache::new(Encoding::Refcounts { order: 4 }, 4096, 4, 512);
        c.insert(16384, vec![1; 2048], false);
        c.insert(32768, vec![2; 2048], false);
        c.mark_dirty(32768, 5);
        c.mark_dirty(16384, 300); // bytes 600..602: sector 1
        assert!(!c.store_dirty(&file).unwrap());
        let got = seen.got.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 16384 + 512);
        assert_eq!(&got[0].1[88..90], &[0, 1], "entry 300 encoded big-endian");
        assert_eq!(c.dirty(), vec![32768], "the one not stored");
        let snap = c.snapshot();
        assert_eq!(runs_of(&snap[0]), vec![(32768, 512)]);
    }

    /// (file offset, length) of each write a snapshot of one table makes.
    fn runs_of(t: &TableWrite) -> Vec<(u64, usize)> {
        t.writes.iter().map(|(at, v)| (*at, v.len())).collect()
    }

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let enc = Encoding::Refcounts { order };
            let n = enc.entries(512);
            let max = enc.max_value();
            let vals: Vec<u64> = (0..n as u64)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & max)
                .collect();
            let mut raw = vec![0u8; 512];
            enc.encode(&vals, &mut raw);
            assert_eq!(enc.decode(&raw), vals, "order {order}");
        }
    }

    #[test]
    fn sixteen_bit_refcounts_are_big_endian() {
        let enc = Encoding::Refcounts { order: 4 };
        let mut raw = vec![0u8; 8];
        enc.encode(&[1, 0x0203, 0, 0], &mut raw);
        assert_eq!(&raw[..4], &[0, 1, 2, 3]);
    }

    #[test]
    fn eviction_spares_tables_used_since_the_hand_passed() {
        let mut c = TableCache::new(Encoding::Be64, 512, 2, 4096);
        c.insert(512, vec![1; 64], false);
        c.insert(1024, vec![2; 64], true);
        // Both are new: the hand clears both bits, then picks the first.
        assert_eq!(
            c.victim(),
            Room::Evict {
                offset: 512,
                dirty: false
            }
        );
        // 512 is used again (as a lock-free reader would), 1024 is not.
        if let Some(t) = c.get(512) {
            t.touch();
        }
        assert_eq!(
            c.victim(),
            Room::Evict {
                offset: 1024,
                dirty: true
            }
        );
        c.remove(1024);
        assert!(!c.contains(1024));
        assert_eq!(c.get(512).map(|t| t.get(5)), Some(1));
        c.insert(1536, vec![3; 64], true);
        assert_eq!(c.get(1536).map(|t| t.get(63)), Some(3));
        assert_eq!(c.dirty(), vec![1536]);
    }

    #[test]
    fn a_snapshot_takes_changed_chunks_and_keeps_its_tables_until_written() {
        // 16 KiB tables: four 4 KiB chunks of 512 entries each.
        let mut c = TableCache::new(Encoding::Be64, 16384, 2, 4096);
        c.insert(16384, vec![0; 2048], false);
        c.insert(32768, vec![0; 2048], false);
        c.mark_dirty(16384, 3); // chunk 0
        c.mark_dirty(16384, 1500); // chunk 2
        c.mark_dirty(16384, 1600); // chunk 3
        let snap = c.snapshot();
        assert_eq!(snap.len(), 1);
        let runs = runs_of(&snap[0]);
        assert_eq!(runs, vec![(16384, 4096), (16384 + 8192, 8192)]);
        assert!(c.dirty().is_empty(), "taken tables are clean");
        // Being written, the table is never the victim; the other one is.
        for _ in 0..4 {
            assert_eq!(
                c.victim(),
                Room::Evict {
                    offset: 32768,
                    dirty: false
                }
            );
        }
        c.remove(32768);
        c.insert(49152, vec![0; 2048], false);
        c.mark_dirty(49152, 0);
        assert_eq!(c.snapshot().len(), 1);
        assert_eq!(c.victim(), Room::Busy, "both tables are being written");
        // A failed write: the chunks are dirty again, the table evictable.
        c.redirty(&snap[0].changed);
        assert_eq!(c.dirty(), vec![16384]);
        let again = c.snapshot();
        let runs = runs_of(&again[0]);
        assert_eq!(runs, vec![(16384, 4096), (16384 + 8192, 8192)]);
    }

    #[test]
    fn a_file_that_takes_short_writes_gets_only_the_changed_sector() {
        // 64 KiB tables over a file whose write granularity is 512 bytes:
        // one changed entry writes its 512-byte sector, not 4 KiB.
        let mut c = TableCache::new(Encoding::Be64, 65536, 2, 512);
        c.insert(65536, vec![0; 8192], false);
        c.mark_dirty(65536, 70); // bytes 560..568: sector 1
        let snap = c.snapshot();
        let runs = runs_of(&snap[0]);
        assert_eq!(runs, vec![(65536 + 512, 512)]);
        // Refcount blocks of 16-bit entries: entry 300 is bytes 600..602.
        let mut r = TableCache::new(Encoding::Refcounts { order: 4 }, 65536, 2, 512);
        r.insert(0, vec![0; 32768], false);
        r.mark_dirty(0, 300);
        assert_eq!(runs_of(&r.snapshot()[0]), vec![(512, 512)]);
    }
}

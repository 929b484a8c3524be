//! Host cluster reference counts and cluster allocation.
//!
//! Crash-safety rules kept here: a refcount block is written before the
//! refcount table entry that points to it; a new refcount table is complete
//! on disk before the header points to it; single clusters (data, L2
//! tables) come from a reservation whose refcounts are already in the file,
//! so an L2 entry never waits for a refcount write; other changes stay in
//! the (write-back) cache, and the L2 side flushes these blocks before it
//! writes any L2 table that could point to them.

use std::io;
use std::sync::Arc;

use super::cache::{read_bytes, write_bytes, Encoding, Room, TableCache};
use super::header::{MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use super::persist::WriteBack;
use crate::formats::ChildRef;

/// The first bytes of the image, kept to rewrite header fields in place.
pub(crate) struct HeaderBlock {
    pub buf: Vec<u8>,
}

impl HeaderBlock {
    pub(crate) fn set_u32(&mut self, at: usize, v: u32) {
        self.buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn set_u64(&mut self, at: usize, v: u64) {
        self.buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    pub(crate) async fn write(&self, file: &ChildRef) -> io::Result<()> {
        write_bytes(file, 0, &self.buf).await
    }
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Most in-use clusters one allocation skips before calling the image
/// corrupt. Allocation starts at the end of the file, where a sound image
/// has only the few clusters a crash left allocated but unwritten; 2^18
/// cached lookups take milliseconds.
const MAX_ALLOC_SCAN: u64 = 1 << 18;

/// Bytes of clusters one reservation takes (see `Refcounts::reserved`),
/// within 16 to 256 clusters: what a crash may leak.
const RESERVE_BYTES: u64 = 4 << 20;

pub(crate) struct Refcounts {
    table: Vec<u64>,
    table_offset: u64,
    blocks: TableCache,
    cluster_bits: u32,
    /// Next cluster index to try when allocating; only moves forward, so
    /// a cluster freed while requests may still use it is never reused
    /// before the image is reopened (lock-free lookups rely on it, see
    /// `fastmap`).
    next_free: u64,
    /// Clusters whose refcount of 1 is already in the file and that nobody
    /// uses yet: single-cluster allocations take them, so making a new
    /// cluster reachable costs one L2 write, not a refcount write before
    /// it. A crash leaks what is left (qemu-img check: leaked clusters, no
    /// corruption); a close gives it back (`release_reserved`).
    reserved: std::ops::Range<u64>,
    /// The metadata's write-back in flight (see `persist`).
    wb: Arc<WriteBack>,
}

impl Refcounts {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open(
        wb: Arc<WriteBack>,
        file: &ChildRef,
        table_offset: u64,
        table_clusters: u32,
        order: u32,
        cluster_bits: u32,
        cache_tables: usize,
        file_len: u64,
    ) -> io::Result<Self> {
        let cs = 1u64 << cluster_bits;
        let raw = read_bytes(file, table_offset, (table_clusters as u64 * cs) as usize).await?;
        let table = Encoding::Be64.decode(raw.as_slice());
        Ok(Refcounts {
            table,
            table_offset,
            blocks: TableCache::new(
                Encoding::Refcounts { order },
                cs as usize,
                cache_tables,
                file.write_granularity(),
            ),
            cluster_bits,
            next_free: file_len.div_ceil(cs),
            reserved: 0..0,
            wb,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        self.blocks.encoding().entries(self.cs() as usize) as u64
    }

    /// The refcount block covering table index `ti`, if allocated.
    fn block_offset(&self, ti: u64) -> io::Result<Option<u64>> {
        let Some(&e) = self.table.get(ti as usize) else {
            return Ok(None);
        };
        if e == 0 {
            return Ok(None);
        }
        if e % self.cs() != 0 || e > MAX_HOST_OFFSET || e < self.cs() {
            return Err(corrupt(format!(
                "refcount table entry {ti} is invalid ({e:#x})"
            )));
        }
        Ok(Some(e))
    }

    /// Evict the least recently used block if the cache is full (refcount
    /// blocks depend on nothing, so a dirty one is simply written).
    async fn make_room(&mut self, file: &ChildRef) -> io::Result<()> {
        loop {
            match self.blocks.victim() {
                Room::Free => return Ok(()),
                Room::Evict { offset, dirty } => {
                    if dirty {
                        self.blocks.write_back(file, offset).await?;
                    }
                    self.blocks.remove(offset);
                    return Ok(());
                }
                Room::Busy => self.settle_write_back().await,
            }
        }
    }

    /// Wait for the write-back in flight, and take back what a failed one
    /// could not write: then no block is being written behind our back.
    pub(crate) async fn settle_write_back(&mut self) {
        self.wb.idle().await;
        for t in self.wb.take_failed_refcounts() {
            self.blocks.redirty(&t);
        }
    }

    /// The dirty blocks, for a write-back without the lock (`persist`);
    /// the caller has settled the write-back in flight.
    pub(crate) fn snapshot(&mut self) -> Vec<super::cache::TableWrite> {
        self.blocks.snapshot()
    }

    /// The dirty blocks stored at once where the file takes stores
    /// (`TableCache::store_dirty`); the caller has settled as above.
    pub(crate) fn store_dirty(&mut self, file: &ChildRef) -> io::Result<bool> {
        self.blocks.store_dirty(file)
    }

    /// Make the block at `off` cached, evicting (and writing back) another.
    async fn cache_block(&mut self, file: &ChildRef, off: u64) -> io::Result<()> {
        if self.blocks.contains(off) {
            return Ok(());
        }
        self.make_room(file).await?;
        let data = self.blocks.load(file, off).await?;
        self.blocks.insert(off, data, false);
        Ok(())
    }

    pub(crate) async fn get(&mut self, file: &ChildRef, cluster: u64) -> io::Result<u64> {
        let (ti, bi) = (
            cluster / self.per_block(),
            (cluster % self.per_block()) as usize,
        );
        let Some(off) = self.block_offset(ti)? else {
            return Ok(0);
        };
        self.cache_block(file, off).await?;
        Ok(self.blocks.get(off).map_or(0, |b| b.get(bi)))
    }

    /// Set a refcount whose block exists (callers use `ensure_block`).
    async fn set(&mut self, file: &ChildRef, cluster: u64, value: u64) -> io::Result<()> {
        let (ti, bi) = (
            cluster / self.per_block(),
            (cluster % self.per_block()) as usize,
        );
        let off = self
            .block_offset(ti)?
            .ok_or_else(|| corrupt(format!("no refcount block for cluster {cluster}")))?;
        self.cache_block(file, off).await?;
        if let Some(b) = self.blocks.get(off) {
            b.set(bi, value);
        }
        self.blocks.mark_dirty(off, bi);
        Ok(())
    }

    /// Fail an allocation that has skipped more in-use clusters than any
    /// image qemu-img or ringblk writes can have past its end of file: the
    /// refcounts are lying (a "refcount maze" would otherwise make one
    /// allocation scan for hours with the iothread stuck).
    fn check_scan(&self, scan_from: u64) -> io::Result<()> {
        if self.next_free - scan_from > MAX_ALLOC_SCAN {
            return Err(corrupt(format!(
                "refcounts mark the {MAX_ALLOC_SCAN} clusters after cluster {scan_from} in use, past the end of the image file"
            )));
        }
        Ok(())
    }

    /// Take a free cluster index for new metadata (no refcount set yet).
    async fn take_free(&mut self, file: &ChildRef) -> io::Result<u64> {
        let scan_from = self.next_free;
        loop {
            self.check_scan(scan_from)?;
            let c = self.next_free;
            if c.saturating_mul(self.cs()) >= MAX_HOST_OFFSET {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "image file is at its maximum size",
                ));
            }
            self.next_free += 1;
            if self.get(file, c).await? == 0 {
                return Ok(c);
            }
        }
    }

    /// Make sure the refcount block covering `cluster` exists.
    async fn ensure_block(
        &mut self,
        file: &ChildRef,
        header: &mut HeaderBlock,
        cluster: u64,
    ) -> io::Result<()> {
        let ti = cluster / self.per_block();
        if ti >= self.table.len() as u64 {
            self.grow_table(file, header, ti).await?;
        }
        if self.block_offset(ti)?.is_some() {
            return Ok(());
        }
        // Place the new block at the next free cluster. It describes itself
        // if it falls in its own range; otherwise the block covering it must
        // exist first.
        let mut at = self.take_free(file).await?;
        let self_describing = at / self.per_block() == ti;
        if !self_describing && self.block_offset(at / self.per_block())?.is_none() {
            Box::pin(self.ensure_block(file, header, at)).await?;
            if self.block_offset(ti)?.is_some() {
                return Ok(()); // created on the way
            }
            at = self.take_free(file).await?;
        }
        let mut entries = vec![0u64; self.per_block() as usize];
        if at / self.per_block() == ti {
            entries[(at % self.per_block()) as usize] = 1;
        } else {
            self.set(file, at, 1).await?;
            self.flush(file).await?;
        }
        let off = at * self.cs();
        let mut raw = vec![0u8; self.cs() as usize];
        self.blocks.encoding().encode(&entries, &mut raw);
        write_bytes(file, off, &raw).await?;
        self.table[ti as usize] = off;
        self.write_table_entry(file, ti).await?;
        self.make_room(file).await?;
        self.blocks.insert(off, entries, false);
        Ok(())
    }

    /// Write the sector of the refcount table that holds entry `ti`.
    async fn write_table_entry(&self, file: &ChildRef, ti: u64) -> io::Result<()> {
        let chunk = 4096.min(self.cs()) as usize;
        let per_chunk = chunk / 8;
        let first = (ti as usize / per_chunk) * per_chunk;
        let mut raw = vec![0u8; chunk];
        let end = (first + per_chunk).min(self.table.len());
        Encoding::Be64.encode(&self.table[first..end], &mut raw);
        write_bytes(file, self.table_offset + first as u64 * 8, &raw).await
    }

    /// Replace the refcount table with a larger one covering index `needed`.
    /// New table and the blocks describing it go at the end of the image;
    /// the header switches to them only once they are on disk.
    async fn grow_table(
        &mut self,
        file: &ChildRef,
        header: &mut HeaderBlock,
        needed: u64,
    ) -> io::Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let per_block = self.per_block();
        let mut entries = (self.table.len() as u64 * 2)
            .max(needed + 1)
            .div_ceil(per_cluster)
            * per_cluster;
        loop {
            let start = self.next_free;
            let table_clusters = entries / per_cluster;
            // Blocks needed to describe [start, start + table + blocks).
            let mut k = 0u64;
            let new_blocks = loop {
                let end = start + table_clusters + k;
                let missing: Vec<u64> = (start / per_block..=(end - 1) / per_block)
                    .filter(|&ti| self.table.get(ti as usize).is_none_or(|&e| e == 0))
                    .collect();
                if missing.len() as u64 == k {
                    break missing;
                }
                k = missing.len() as u64;
            };
            let end = start + table_clusters + k;
            if new_blocks.last().is_some_and(|&ti| ti >= entries) {
                entries =
                    (new_blocks[new_blocks.len() - 1] + 1).div_ceil(per_cluster) * per_cluster;
                continue;
            }
            if entries * 8 > MAX_REFTABLE_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "refcount table would exceed 8 MiB",
                ));
            }
            // Refcounts for the new area: in the new blocks, or in existing ones.
            let mut new_table = self.table.clone();
            new_table.resize(entries as usize, 0);
            let mut block_data: Vec<(u64, Vec<u64>)> = Vec::new();
            for (i, &ti) in new_blocks.iter().enumerate() {
                let at = start + table_clusters + i as u64;
                new_table[ti as usize] = at * cs;
                block_data.push((ti, vec![0u64; per_block as usize]));
            }
            for c in start..end {
                let ti = c / per_block;
                match block_data.iter_mut().find(|(t, _)| *t == ti) {
                    Some((_, d)) => d[(c % per_block) as usize] = 1,
                    None => self.set(file, c, 1).await?,
                }
            }
            for (ti, d) in &block_data {
                let mut raw = vec![0u8; cs as usize];
                self.blocks.encoding().encode(d, &mut raw);
                write_bytes(file, new_table[*ti as usize], &raw).await?;
            }
            let mut raw = vec![0u8; (table_clusters * cs) as usize];
            Encoding::Be64.encode(&new_table, &mut raw);
            write_bytes(file, start * cs, &raw).await?;
            self.flush(file).await?;
            file.flush().await?;
            header.set_u64(48, start * cs);
            header.set_u32(56, table_clusters as u32);
            header.write(file).await?;
            file.flush().await?;
            let (old_off, old_clusters) = (
                self.table_offset,
                (self.table.len() as u64 * 8).div_ceil(cs),
            );
            self.table = new_table;
            self.table_offset = start * cs;
            self.next_free = end;
            for c in 0..old_clusters {
                self.decrement(file, old_off / cs + c).await?;
            }
            log::debug!(
                "refcount table grown to {entries} entries at {:#x}",
                start * cs
            );
            return Ok(());
        }
    }

    /// Allocate one cluster whose refcount of 1 is in the file already
    /// (from the reservation, reserving more when it is used up); returns
    /// its byte offset.
    pub(crate) async fn alloc_one(
        &mut self,
        file: &ChildRef,
        header: &mut HeaderBlock,
    ) -> io::Result<u64> {
        if self.reserved.is_empty() {
            let n = (RESERVE_BYTES >> self.cluster_bits).clamp(16, 256);
            let start = self.alloc(file, header, n).await? >> self.cluster_bits;
            if let Err(e) = self.flush(file).await {
                // Not in the file: give them back in the cache, no leak.
                for c in start..start + n {
                    self.decrement(file, c).await?;
                }
                return Err(e);
            }
            self.reserved = start..start + n;
        }
        let c = self.reserved.start;
        self.reserved.start += 1;
        Ok(c << self.cluster_bits)
    }

    /// Give back the reserved clusters nobody used (in the cache; the
    /// next write-back takes it to the file): before a close or a
    /// read-only reopen, after which an unused reservation would be a leak.
    pub(crate) async fn release_reserved(&mut self, file: &ChildRef) -> io::Result<()> {
        while !self.reserved.is_empty() {
            let c = self.reserved.start;
            self.decrement(file, c).await?;
            self.reserved.start += 1;
        }
        Ok(())
    }

    /// Allocate `n` contiguous clusters with refcount 1 (in the cache) and
    /// return the byte offset of the first.
    pub(crate) async fn alloc(
        &mut self,
        file: &ChildRef,
        header: &mut HeaderBlock,
        n: u64,
    ) -> io::Result<u64> {
        let scan_from = self.next_free;
        'retry: loop {
            self.check_scan(scan_from)?;
            let start = self.next_free;
            for c in start..start + n {
                self.ensure_block(file, header, c).await?;
                if self.next_free != start {
                    continue 'retry; // a refcount block took the space
                }
                if self.get(file, c).await? != 0 {
                    self.next_free = c + 1;
                    continue 'retry;
                }
            }
            for c in start..start + n {
                self.set(file, c, 1).await?;
            }
            self.next_free = start + n;
            return Ok(start * self.cs());
        }
    }

    /// Drop one reference to the cluster at byte offset `host`; returns
    /// the references left.
    pub(crate) async fn free(&mut self, file: &ChildRef, host: u64) -> io::Result<u64> {
        let cluster = host / self.cs();
        self.decrement(file, cluster).await?;
        self.get(file, cluster).await
    }

    async fn decrement(&mut self, file: &ChildRef, cluster: u64) -> io::Result<()> {
        let v = self.get(file, cluster).await?;
        if v == 0 {
            return Err(corrupt(format!(
                "freeing cluster {cluster} whose refcount is already 0"
            )));
        }
        self.set(file, cluster, v - 1).await
    }

    /// Write every dirty refcount block.
    pub(crate) async fn flush(&mut self, file: &ChildRef) -> io::Result<()> {
        self.settle_write_back().await;
        self.blocks.write_back_all(file).await
    }
}

//! Guest-to-host mapping: the L1 table, cached L2 tables, and the metadata
//! state (`Meta`) that lives under the driver's lock.
//!
//! Ordering rules kept here (QEMU's): a refcount block reaches the file
//! before any L2 table that may point into clusters it counts; a new L2
//! table is on disk before its L1 entry; a cleared L2 entry is on disk
//! before the refcount of the cluster it pointed to drops.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cache::{
    read_bytes, write_bytes, write_tables, Encoding, Room, Table, TableCache, TableWrite,
};
use super::header::{Header, MAX_HOST_OFFSET};
use super::persist::{Failed, Generations, WriteBack};
use super::refcount::{HeaderBlock, Refcounts};
use crate::formats::ChildRef;

pub(crate) const L2_COPIED: u64 = 1 << 63;
pub(crate) const L2_COMPRESSED: u64 = 1 << 62;
pub(crate) const L2_ZERO: u64 = 1;
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of a standard L2 entry that must be zero (1-8 and 56-61).
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero (0-8 and 56-62).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// What a guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Read from the backing file (or zeros without one).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster if any.
    Zero { host: Option<u64> },
    /// Guest data at `host`; `copied` says its refcount is exactly one.
    Data { host: u64, copied: bool },
    /// zlib-compressed; the raw L2 entry.
    Compressed { entry: u64 },
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// What splitting a guest cluster into table indexes and decoding an L2
/// entry needs: fixed for the image's life, so usable without the lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub cluster_bits: u32,
    pub version: u32,
}

impl Layout {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// (L1 index, L2 index) of a guest cluster.
    pub(crate) fn split(&self, guest_cluster: u64) -> (usize, usize) {
        let l2_bits = self.cluster_bits - 3;
        (
            (guest_cluster >> l2_bits) as usize,
            (guest_cluster & ((1 << l2_bits) - 1)) as usize,
        )
    }

    /// Validate and decode an L2 entry (entries come from the image file).
    pub(crate) fn decode(&self, e: u64, guest_cluster: u64) -> io::Result<Mapping> {
        if e & L2_COMPRESSED != 0 {
            return Ok(Mapping::Compressed { entry: e });
        }
        if e & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "L2 entry for guest cluster {guest_cluster} has reserved bits ({e:#x})"
            )));
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(self.cs()) || host > MAX_HOST_OFFSET {
            return Err(corrupt(format!(
                "guest cluster {guest_cluster} maps to unaligned {host:#x}"
            )));
        }
        if e & L2_ZERO != 0 {
            if self.version < 3 {
                return Err(corrupt(format!(
                    "zero flag in a version 2 image (cluster {guest_cluster})"
                )));
            }
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        if host < self.cs() {
            return Err(corrupt(format!(
                "guest cluster {guest_cluster} maps onto the header"
            )));
        }
        Ok(Mapping::Data {
            host,
            copied: e & L2_COPIED != 0,
        })
    }
}

pub(crate) struct Meta {
    pub layout: Layout,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l2: TableCache,
    /// Bumped (under the lock) whenever a table leaves `l2`: lock-free
    /// lookup views drop the tables they took from it before (`fastmap`).
    pub l2_gen: Arc<AtomicU64>,
    /// Present on writable opens only.
    pub refcounts: Option<Refcounts>,
    pub header: HeaderBlock,
    /// The open generation: changes made now are written by the next
    /// `flush` (see `persist`).
    gen: u64,
    pub gens: Arc<Generations>,
    /// The write-back in flight, if any (shared with `refcounts`).
    pub wb: Arc<WriteBack>,
}

/// A write-back taken under the lock and written without it (`persist`).
pub(crate) struct Batch {
    gen: u64,
    refcounts: Vec<TableWrite>,
    l2: Vec<TableWrite>,
    gens: Arc<Generations>,
    wb: Arc<WriteBack>,
    done: bool,
}

impl Batch {
    /// Write the refcount blocks, then the L2 tables; then the batch's
    /// generation is persisted. A failure leaves the tables for the next
    /// write-back to mark dirty again.
    pub(crate) async fn write(mut self, file: &ChildRef) -> io::Result<()> {
        write_tables(file, &self.refcounts).await?;
        write_tables(file, &self.l2).await?;
        self.gens.mark_persisted(self.gen);
        self.done = true;
        self.wb.end(Failed::default());
        Ok(())
    }
}

impl Drop for Batch {
    /// Failed, or dropped unfinished: the next write-back takes its tables
    /// again (and the write-back in flight must end, or nothing would).
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let changed = |v: &mut Vec<TableWrite>| v.drain(..).map(|t| t.changed).collect();
        self.wb.end(Failed {
            refcounts: changed(&mut self.refcounts),
            l2: changed(&mut self.l2),
        });
    }
}

impl Meta {
    pub(crate) async fn open(
        file: &ChildRef,
        h: &Header,
        header_bytes: Vec<u8>,
        writable: bool,
        l2_cache_tables: usize,
        refcount_cache_tables: usize,
    ) -> io::Result<Self> {
        let l1_raw = read_bytes(file, h.l1_table_offset, h.l1_size as usize * 8).await?;
        let mut meta = Meta {
            layout: Layout {
                cluster_bits: h.cluster_bits,
                version: h.version,
            },
            l1: Encoding::Be64.decode(l1_raw.as_slice()),
            l1_offset: h.l1_table_offset,
            l2: TableCache::new(
                Encoding::Be64,
                h.cluster_size() as usize,
                l2_cache_tables,
                file.write_granularity(),
            ),
            l2_gen: Arc::new(AtomicU64::new(0)),
            refcounts: None,
            header: HeaderBlock { buf: header_bytes },
            gen: 1,
            gens: Arc::new(Generations::default()),
            wb: Arc::new(WriteBack::default()),
        };
        if writable {
            meta.load_refcounts(file, h, refcount_cache_tables).await?;
        }
        Ok(meta)
    }

    /// Read the refcount table, which writing needs (at open, or when an
    /// image opened read-only is reopened read-write).
    pub(crate) async fn load_refcounts(
        &mut self,
        file: &ChildRef,
        h: &Header,
        cache_tables: usize,
    ) -> io::Result<()> {
        if self.refcounts.is_some() {
            return Ok(());
        }
        self.refcounts = Some(
            Refcounts::open(
                self.wb.clone(),
                file,
                h.refcount_table_offset,
                h.refcount_table_clusters,
                h.refcount_order,
                h.cluster_bits,
                cache_tables,
                file.size(),
            )
            .await?,
        );
        Ok(())
    }

    fn cs(&self) -> u64 {
        self.layout.cs()
    }

    fn refcounts(&mut self) -> io::Result<&mut Refcounts> {
        self.refcounts.as_mut().ok_or_else(|| {
            io::Error::new(io::ErrorKind::PermissionDenied, "image is open read-only")
        })
    }

    /// The L2 table offset for L1 index `i`, validated; None if unallocated.
    fn l2_offset(&self, i: usize) -> io::Result<Option<u64>> {
        let Some(&e) = self.l1.get(i) else {
            return Ok(None);
        };
        if e & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {i} has reserved bits set ({e:#x})"
            )));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) || off < self.cs() {
            return Err(corrupt(format!("L1 entry {i} points to {off:#x}")));
        }
        Ok(Some(off))
    }

    /// Evict the least recently used L2 table if the cache is full, writing
    /// it back first if dirty (after the refcounts it may depend on).
    async fn make_room_l2(&mut self, file: &ChildRef) -> io::Result<()> {
        let (victim, dirty) = loop {
            match self.l2.victim() {
                Room::Free => return Ok(()),
                Room::Evict { offset, dirty } => break (offset, dirty),
                Room::Busy => self.settle_write_back().await,
            }
        };
        if dirty {
            if let Some(r) = self.refcounts.as_mut() {
                r.flush(file).await?;
            }
            self.l2.write_back(file, victim).await?;
        }
        self.l2.remove(victim);
        // From here on the table's updates go to a fresh copy.
        self.l2_gen.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Wait for the write-back in flight, and take back what a failed one
    /// could not write: then no table is being written behind our back.
    async fn settle_write_back(&mut self) {
        self.wb.idle().await;
        if let Some(r) = self.refcounts.as_mut() {
            r.settle_write_back().await;
        }
        for t in self.wb.take_failed_l2() {
            self.l2.redirty(&t);
        }
    }

    /// Close the open generation and take everything dirty for writing
    /// without the lock, unless generation `need` is persisted by the time
    /// the write-back in flight is done, or the file took every dirty
    /// table as stores at once (a file in memory: cheaper than a batch).
    pub(crate) async fn begin_write_back(
        &mut self,
        file: &ChildRef,
        need: u64,
    ) -> io::Result<Option<Batch>> {
        self.settle_write_back().await;
        if self.gens.is_persisted(need) {
            return Ok(None);
        }
        let gen = self.gen;
        self.gen += 1;
        // Refcounts before L2 tables, here as in a batch: L2 tables are
        // stored only once every refcount block is.
        let refcounts_stored = match self.refcounts.as_mut() {
            Some(r) => r.store_dirty(file)?,
            None => true,
        };
        if refcounts_stored && self.l2.store_dirty(file)? {
            self.gens.mark_persisted(gen);
            return Ok(None);
        }
        let refcounts = self
            .refcounts
            .as_mut()
            .map(|r| r.snapshot())
            .unwrap_or_default();
        let l2 = self.l2.snapshot();
        self.wb.begin();
        Ok(Some(Batch {
            gen,
            refcounts,
            l2,
            gens: self.gens.clone(),
            wb: self.wb.clone(),
            done: false,
        }))
    }

    /// Cache the L2 table at `off`.
    async fn cache_l2(&mut self, file: &ChildRef, off: u64) -> io::Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        self.make_room_l2(file).await?;
        let data = self.l2.load(file, off).await?;
        self.l2.insert(off, data, false);
        Ok(())
    }

    /// The cached L2 table for L1 index `l1i` (loaded if need be); None
    /// where the L1 entry is empty or past the table.
    pub(crate) async fn l2_table(
        &mut self,
        file: &ChildRef,
        l1i: usize,
    ) -> io::Result<Option<Arc<Table>>> {
        let Some(off) = self.l2_offset(l1i)? else {
            return Ok(None);
        };
        self.cache_l2(file, off).await?;
        Ok(self.l2.get(off).cloned())
    }

    pub(crate) async fn lookup(
        &mut self,
        file: &ChildRef,
        guest_cluster: u64,
    ) -> io::Result<Mapping> {
        let (l1i, l2i) = self.layout.split(guest_cluster);
        let e = match self.l2_table(file, l1i).await? {
            Some(t) => t.get(l2i),
            None => 0,
        };
        self.layout.decode(e, guest_cluster)
    }

    /// Make sure guest cluster's L2 table exists, creating it if needed:
    /// refcount on disk, then the zeroed table, then the L1 entry.
    pub(crate) async fn ensure_l2(
        &mut self,
        file: &ChildRef,
        guest_cluster: u64,
    ) -> io::Result<u64> {
        let (l1i, _) = self.layout.split(guest_cluster);
        if l1i >= self.l1.len() {
            return Err(corrupt(format!(
                "guest cluster {guest_cluster} is beyond the L1 table"
            )));
        }
        if let Some(off) = self.l2_offset(l1i)? {
            self.cache_l2(file, off).await?;
            return Ok(off);
        }
        let cs = self.cs();
        let mut header = std::mem::replace(&mut self.header, HeaderBlock { buf: Vec::new() });
        let r = async {
            let refcounts = self.refcounts()?;
            let off = refcounts.alloc_one(file, &mut header).await?;
            write_bytes(file, off, &vec![0u8; cs as usize]).await?;
            Ok::<u64, io::Error>(off)
        }
        .await;
        self.header = header;
        let off = r?;
        self.l1[l1i] = off | L2_COPIED;
        self.write_l1_entry(file, l1i).await?;
        self.make_room_l2(file).await?;
        self.l2.insert(off, vec![0u64; (cs / 8) as usize], false);
        Ok(off)
    }

    async fn write_l1_entry(&self, file: &ChildRef, i: usize) -> io::Result<()> {
        let chunk = 4096.min(self.cs()) as usize;
        let per = chunk / 8;
        let first = i / per * per;
        let end = (first + per).min(self.l1.len());
        let mut raw = vec![0u8; chunk];
        Encoding::Be64.encode(&self.l1[first..end], &mut raw);
        write_bytes(file, self.l1_offset + first as u64 * 8, &raw).await
    }

    /// Set the L2 entry of a guest cluster whose table exists (dirty in
    /// the cache). Returns the table's offset.
    pub(crate) async fn set_l2(
        &mut self,
        file: &ChildRef,
        guest_cluster: u64,
        entry: u64,
    ) -> io::Result<u64> {
        let off = self.ensure_l2(file, guest_cluster).await?;
        let (_, l2i) = self.layout.split(guest_cluster);
        // Noted before the entry is published (see `Generations`).
        self.gens.note_change(self.gen);
        if let Some(t) = self.l2.get(off) {
            // Lock-free readers see the new entry from now on.
            t.set(l2i, entry);
        }
        self.l2.mark_dirty(off, l2i);
        Ok(off)
    }

    /// Write an L2 table now (refcounts first): used before freeing clusters
    /// it no longer points to.
    pub(crate) async fn write_l2(&mut self, file: &ChildRef, off: u64) -> io::Result<()> {
        self.settle_write_back().await;
        if let Some(r) = self.refcounts.as_mut() {
            r.flush(file).await?;
        }
        self.l2.write_back(file, off).await
    }

    pub(crate) async fn alloc_cluster(&mut self, file: &ChildRef) -> io::Result<u64> {
        self.gens.note_change(self.gen);
        let mut header = std::mem::replace(&mut self.header, HeaderBlock { buf: Vec::new() });
        let r = match self.refcounts.as_mut() {
            Some(rc) => rc.alloc_one(file, &mut header).await,
            None => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is open read-only",
            )),
        };
        self.header = header;
        r
    }

    /// Drop a reference to a host cluster; returns the references left.
    pub(crate) async fn free_cluster(&mut self, file: &ChildRef, host: u64) -> io::Result<u64> {
        self.gens.note_change(self.gen);
        self.refcounts()?.free(file, host).await
    }

    /// Give back the clusters reserved for allocations (before a close or
    /// a read-only reopen, whose flush then writes the refcounts back).
    pub(crate) async fn release_reserved(&mut self, file: &ChildRef) -> io::Result<()> {
        match self.refcounts.as_mut() {
            Some(r) => r.release_reserved(file).await,
            None => Ok(()),
        }
    }

    /// Write back everything dirty, refcounts before L2 tables, which
    /// persists every generation up to the open one (closed here; later
    /// changes belong to the next).
    pub(crate) async fn flush(&mut self, file: &ChildRef) -> io::Result<()> {
        self.settle_write_back().await;
        let gen = self.gen;
        self.gen += 1;
        if let Some(r) = self.refcounts.as_mut() {
            r.flush(file).await?;
        }
        self.l2.write_back_all(file).await?;
        self.gens.mark_persisted(gen);
        Ok(())
    }

    /// Grow the virtual size: a bigger L1 table if needed (written, then the
    /// header switched to it, then the old one freed), then the size field.
    pub(crate) async fn grow(
        &mut self,
        file: &ChildRef,
        h: &Header,
        new_size: u64,
    ) -> io::Result<()> {
        let need = h.l1_entries_for(new_size) as usize;
        if need as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "size needs an L1 table over 32 MiB",
            ));
        }
        let cs = self.cs();
        if need > self.l1.len() {
            let clusters = (need as u64 * 8).div_ceil(cs);
            let mut header = std::mem::replace(&mut self.header, HeaderBlock { buf: Vec::new() });
            let r = async {
                let rc = self.refcounts()?;
                let at = rc.alloc(file, &mut header, clusters).await?;
                rc.flush(file).await?;
                Ok::<u64, io::Error>(at)
            }
            .await;
            self.header = header;
            let at = r?;
            let mut l1 = self.l1.clone();
            l1.resize(need, 0);
            let mut raw = vec![0u8; (clusters * cs) as usize];
            Encoding::Be64.encode(&l1, &mut raw);
            write_bytes(file, at, &raw).await?;
            file.flush().await?;
            let (old_off, old_clusters) = (self.l1_offset, (self.l1.len() as u64 * 8).div_ceil(cs));
            self.header.set_u64(24, new_size);
            self.header.set_u32(36, need as u32);
            self.header.set_u64(40, at);
            self.header.write(file).await?;
            file.flush().await?;
            self.l1 = l1;
            self.l1_offset = at;
            for c in 0..old_clusters {
                self.free_cluster(file, old_off + c * cs).await?;
            }
        } else {
            self.header.set_u64(24, new_size);
            self.header.write(file).await?;
        }
        Ok(())
    }
}

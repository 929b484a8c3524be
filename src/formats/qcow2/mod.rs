//! qcow2 ("lite"): v2 and v3 images as qemu-img makes them.
//!
//! - `header`: parsing and validating the header and extensions
//! - `cache`: the metadata table cache (L2 tables, refcount blocks)
//! - `mapping`: L1/L2 lookups and updates under the metadata lock
//! - `fastmap`: lookups of cached L2 entries without it (the data path)
//! - `refcount`: reference counts and cluster allocation
//! - `inflight`: one allocation per guest cluster at a time
//! - `persist`: metadata in the file before a request completes
//! - `create`: making new images
//!
//! Data moves outside the metadata lock; the lock covers metadata updates
//! and lookups that miss the per-thread views of the L2 cache.

pub(crate) mod cache;
mod compressed;
pub mod create;
mod fastmap;
pub(crate) mod header;
mod inflight;
mod keyed;
pub(crate) mod mapping;
mod persist;
pub(crate) mod refcount;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use self::cache::read_bytes;
use self::fastmap::FastMap;
use self::header::Header;
use self::inflight::ClusterLocks;
use self::mapping::{Layout, Mapping, Meta, L2_COPIED, L2_ZERO};
use self::persist::{Generations, WriteBack};
use super::driver::{BlockDriver, BlockIo, BoolFuture, ChildRef, IoFuture};
use crate::error::Error;
use crate::uring::{AlignedBuf, AsyncMutex, IoVec};

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("not a qcow2 image")]
    NotQcow2,
    #[error("the image uses {0}, which ringblk does not support")]
    Unsupported(String),
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Cache sizes, in bytes of metadata.
#[derive(Clone, Copy, Debug)]
pub struct Qcow2Options {
    pub l2_cache_bytes: u64,
    pub refcount_cache_bytes: u64,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        // 32 MiB of L2 tables maps 256 GiB with 64 KiB clusters.
        Qcow2Options {
            l2_cache_bytes: 32 << 20,
            refcount_cache_bytes: 4 << 20,
        }
    }
}

/// Read and validate the header of the image behind `file`.
pub async fn read_header(file: &ChildRef) -> Result<(Header, Vec<u8>), Qcow2Error> {
    let file_len = file.size();
    let first = file_len.min(65536) as usize;
    if first < header::V2_HEADER_LEN as usize {
        return Err(Qcow2Error::NotQcow2);
    }
    let mut bytes = read_bytes(file, 0, first).await?.as_slice().to_vec();
    let h = Header::parse(&bytes, file_len)?;
    let cs = h.cluster_size().min(file_len) as usize;
    if cs > bytes.len() {
        bytes = read_bytes(file, 0, cs).await?.as_slice().to_vec();
        return Ok((Header::parse(&bytes, file_len)?, bytes));
    }
    Ok((h, bytes))
}

pub struct Qcow2Driver {
    name: String,
    file: ChildRef,
    /// Replaced only in drained sections (blockdev-snapshot); read on the
    /// paths that reach the backing image, never on allocated clusters.
    backing: RwLock<Option<ChildRef>>,
    read_only: AtomicBool,
    /// The backing image took writes that were never flushed (it was the
    /// active layer until a snapshot put us above it): our next flush
    /// flushes it first, so a guest's flush covers them.
    backing_unflushed: AtomicBool,
    /// Refcount cache size, for loading refcounts on a read-write reopen.
    refcount_cache_tables: usize,
    header: Header,
    size: AtomicU64,
    meta: AsyncMutex<Meta>,
    /// What of `meta`'s changes is in the file, and the write-back in
    /// flight (shared with `meta`).
    gens: Arc<Generations>,
    wb: Arc<WriteBack>,
    /// Per-thread views of `meta.l2`, read without the lock.
    fast: FastMap,
    layout: Layout,
    allocating: ClusterLocks,
    /// One cluster of zeros, the copy-on-write source without a backing file.
    zeros: Arc<AlignedBuf>,
}

enum ZeroAction {
    Nothing,
    WriteZeros,
    /// New L2 entry, and host clusters that each lose one reference.
    SetEntry {
        entry: u64,
        free: Vec<u64>,
    },
}

fn err(what: String) -> io::Error {
    io::Error::other(what)
}

impl Qcow2Driver {
    /// Open the image behind `file` (`name` is for messages). `backing` is
    /// the already opened backing image when the header names one.
    pub async fn open(
        name: &str,
        file: ChildRef,
        backing: Option<ChildRef>,
        read_only: bool,
        opts: Qcow2Options,
    ) -> Result<Self, Qcow2Error> {
        let (h, bytes) = read_header(&file).await?;
        h.check_features(!read_only)?;
        if backing.is_some() && h.backing_file.is_none() {
            // The header names no backing file: a crash would lose the link.
            log::warn!("{name}: given a backing image its header does not name");
        }
        let cs = h.cluster_size();
        let header_bytes = bytes[..4096.min(cs as usize).min(bytes.len())].to_vec();
        let tables = |bytes: u64| (bytes / cs).max(4) as usize;
        let mut meta = Meta::open(
            &file,
            &h,
            header_bytes,
            !read_only,
            tables(opts.l2_cache_bytes),
            tables(opts.refcount_cache_bytes),
        )
        .await?;
        if !read_only && h.version >= 3 && h.autoclear_features != 0 {
            // We maintain none of the autoclear features (bitmaps...): clear
            // them so QEMU knows their data is stale.
            log::info!(
                "{name}: clearing autoclear feature bits {:#x}",
                h.autoclear_features
            );
            meta.header.set_u64(88, 0);
            meta.header.write(&file).await?;
        }
        let fast = FastMap::new(meta.l2_gen.clone(), tables(opts.l2_cache_bytes));
        Ok(Qcow2Driver {
            name: name.to_string(),
            fast,
            layout: meta.layout,
            size: AtomicU64::new(h.size),
            zeros: Arc::new(AlignedBuf::zeroed(cs as usize, 4096)),
            file,
            backing: RwLock::new(backing),
            read_only: AtomicBool::new(read_only),
            backing_unflushed: AtomicBool::new(false),
            refcount_cache_tables: tables(opts.refcount_cache_bytes),
            header: h,
            gens: meta.gens.clone(),
            wb: meta.wb.clone(),
            meta: AsyncMutex::new(meta),
            allocating: ClusterLocks::default(),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    fn bits(&self) -> u32 {
        self.header.cluster_bits
    }

    /// Where guest cluster `c` is: from this thread's view of the L2
    /// cache if it has the table (no lock), else under the metadata lock,
    /// which then adds the table to the view.
    async fn lookup(&self, c: u64) -> io::Result<Mapping> {
        let (l1i, l2i) = self.layout.split(c);
        let entry = match self.fast.get(l1i, l2i) {
            Some(e) => e,
            None => {
                let mut meta = self.meta.lock().await;
                let Some(table) = meta.l2_table(&self.file, l1i).await? else {
                    return Ok(Mapping::Unallocated);
                };
                let e = table.get(l2i);
                self.fast
                    .put(meta.l2_gen.load(Ordering::Acquire), l1i, table);
                e
            }
        };
        self.layout.decode(entry, c)
    }

    /// Visit `[offset, offset + len)` cluster by cluster: (guest cluster,
    /// offset in cluster, position in the request, length).
    fn chunks(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let (cs, bits) = (self.cs(), self.bits());
        let mut done = 0;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(len - done);
            let item = (pos >> bits, in_off, done, n);
            done += n;
            Some(item)
        })
    }

    fn backing(&self) -> Option<ChildRef> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn has_backing(&self) -> bool {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn is_ro(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    async fn read_backing(&self, pos: u64, part: &IoVec) -> io::Result<()> {
        let Some(b) = self.backing() else {
            part.fill_zero();
            return Ok(());
        };
        let bsize = b.size();
        let have = bsize.saturating_sub(pos).min(part.len() as u64) as usize;
        if have > 0 {
            b.read(pos, &part.slice(0, have)).await?;
        }
        part.tail(have).fill_zero();
        Ok(())
    }

    async fn do_read(&self, offset: u64, buf: &IoVec) -> io::Result<()> {
        for (c, in_off, at, n) in self.chunks(offset, buf.len() as u64) {
            let mut sliced = None;
            let part = part_of(buf, at, n, &mut sliced);
            match self.lookup(c).await? {
                Mapping::Data { host, .. } => self.file.read(host + in_off, part).await?,
                Mapping::Zero { .. } => part.fill_zero(),
                Mapping::Unallocated => self.read_backing(offset + at, part).await?,
                Mapping::Compressed { entry } => {
                    let data = compressed::read_cluster(&self.file, entry, self.bits())
                        .await
                        .map_err(|e| {
                            err(format!("{}: guest offset {}: {e}", self.name, offset + at))
                        })?;
                    part.copy_from(&data[in_off as usize..(in_off + n) as usize]);
                }
            }
        }
        Ok(())
    }

    /// Contents for the part of a new cluster the write does not cover.
    async fn cow_source(&self, pos: u64, len: usize, from_backing: bool) -> io::Result<IoVec> {
        if !from_backing {
            return Ok(IoVec::from_shared(self.zeros.clone()).slice(0, len));
        }
        let buf = IoVec::from_buf(AlignedBuf::zeroed(len, 4096));
        self.read_backing(pos, &buf).await?;
        Ok(buf)
    }

    /// Write `data` at `in_off` of guest cluster `c`, which has no host
    /// cluster of its own yet (or only a preallocated zero one).
    async fn allocating_write(&self, c: u64, in_off: u64, data: &IoVec) -> io::Result<()> {
        let _alloc = self.allocating.lock(c).await;
        // Someone may have allocated it while we waited for the guard.
        let prev = self.lookup(c).await?;
        let (host, fresh) = match prev {
            Mapping::Data { host, .. } => return self.file.write(host + in_off, data).await,
            Mapping::Compressed { .. } => return Err(self.compressed_write()),
            Mapping::Zero { host: Some(h) } => (h, false),
            Mapping::Zero { host: None } | Mapping::Unallocated => {
                let mut meta = self.meta.lock().await;
                meta.ensure_l2(&self.file, c).await?;
                (meta.alloc_cluster(&self.file).await?, true)
            }
        };
        let cs = self.cs();
        let from_backing = prev == Mapping::Unallocated && self.has_backing();
        let base = c << self.bits();
        let tail_off = in_off + data.len() as u64;
        let head = self.cow_source(base, in_off as usize, from_backing).await?;
        let tail = self
            .cow_source(base + tail_off, (cs - tail_off) as usize, from_backing)
            .await?;
        let whole = IoVec::concat(&[&head, data, &tail]);
        if let Err(e) = self.file.write(host, &whole).await {
            if fresh {
                let _ = self.meta.lock().await.free_cluster(&self.file, host).await;
            }
            return Err(e);
        }
        // Only now, with the data in the file, does the mapping appear.
        self.meta
            .lock()
            .await
            .set_l2(&self.file, c, host | L2_COPIED)
            .await?;
        Ok(())
    }

    fn compressed_write(&self) -> io::Error {
        err(format!(
            "{}: writing to compressed clusters is not supported",
            self.name
        ))
    }

    async fn do_write(&self, offset: u64, buf: &IoVec) -> io::Result<()> {
        if self.is_ro() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: read-only", self.name),
            ));
        }
        for (c, in_off, at, n) in self.chunks(offset, buf.len() as u64) {
            let mut sliced = None;
            let part = part_of(buf, at, n, &mut sliced);
            match self.lookup(c).await? {
                Mapping::Data { host, copied } => {
                    if !copied {
                        let refs = {
                            let mut meta = self.meta.lock().await;
                            match meta.refcounts.as_mut() {
                                Some(r) => r.get(&self.file, host >> self.bits()).await?,
                                None => 0,
                            }
                        };
                        if refs != 1 {
                            return Err(err(format!(
                                "{}: cluster {host:#x} is shared (refcount {refs})",
                                self.name
                            )));
                        }
                    }
                    self.file.write(host + in_off, part).await?
                }
                Mapping::Compressed { .. } => return Err(self.compressed_write()),
                Mapping::Zero { .. } | Mapping::Unallocated => {
                    self.allocating_write(c, in_off, part).await?
                }
            }
        }
        self.settle().await
    }

    /// Complete only once the metadata this request made, or may rely on
    /// (someone else's allocation of the cluster it wrote in place), is in
    /// the file: see `persist`.
    async fn settle(&self) -> io::Result<()> {
        let Some(gen) = self.gens.pending() else {
            return Ok(());
        };
        // The other requests of this loop turn add their changes first,
        // and the write-back in flight (which may cover them) ends, without
        // the lock, which allocations need meanwhile.
        crate::uring::yield_now().await;
        self.wb.idle().await;
        if self.gens.is_persisted(gen) {
            return Ok(());
        }
        let context = |e: io::Error| err(format!("{}: writing back metadata: {e}", self.name));
        let batch = {
            let mut meta = self.meta.lock().await;
            // The generation open now is at least `gen`: one batch covers it.
            match meta
                .begin_write_back(&self.file, gen)
                .await
                .map_err(context)?
            {
                Some(b) => b,
                // Stored at once, or written by whoever came before us.
                None => return Ok(()),
            }
        };
        batch.write(&self.file).await.map_err(context)
    }

    /// Discard (`zeroes == None`) or write zeroes (`Some(may_unmap)`).
    /// Whole clusters change their L2 entry (zero flag on v3, unallocated
    /// where no backing file shows through); partial clusters get explicit
    /// zeros, or nothing for a discard.
    async fn do_zero(&self, offset: u64, len: u64, zeroes: Option<bool>) -> io::Result<()> {
        if self.is_ro() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: read-only", self.name),
            ));
        }
        let cs = self.cs();
        let mut freed = Vec::new();
        let mut touched = Vec::new();
        for (c, _, at, n) in self.chunks(offset, len) {
            let explicit = if n < cs {
                zeroes.is_some()
            } else {
                let _alloc = self.allocating.lock(c).await;
                let mut meta = self.meta.lock().await;
                match self.zero_entry(meta.lookup(&self.file, c).await?, zeroes) {
                    ZeroAction::Nothing => false,
                    ZeroAction::WriteZeros => true,
                    ZeroAction::SetEntry { entry, free } => {
                        let off = meta.set_l2(&self.file, c, entry).await?;
                        if !touched.contains(&off) {
                            touched.push(off);
                        }
                        freed.extend(free);
                        false
                    }
                }
            };
            if explicit {
                let z = IoVec::from_shared(self.zeros.clone()).slice(0, n as usize);
                self.do_write(offset + at, &z).await?;
            }
        }
        if !freed.is_empty() {
            let mut meta = self.meta.lock().await;
            // The cleared entries reach the file before the refcounts drop.
            for off in touched {
                meta.write_l2(&self.file, off).await?;
            }
            let mut unused = Vec::new();
            for &h in &freed {
                if meta.free_cluster(&self.file, h).await? == 0 {
                    unused.push(h);
                }
            }
            drop(meta);
            for h in unused {
                // Give the space back to the host filesystem.
                self.file.discard(h, cs).await.ok();
            }
        }
        self.settle().await
    }

    /// What zeroing (or discarding) a whole cluster mapped as `prev` takes.
    fn zero_entry(&self, prev: Mapping, zeroes: Option<bool>) -> ZeroAction {
        let has_backing = self.has_backing();
        let v3 = self.header.version >= 3;
        let unmap = zeroes.unwrap_or(true);
        let cs = self.cs();
        // The host cluster the entry owns (reusable as a preallocated zero
        // cluster), and the references the entry holds.
        let (old_host, refs) = match prev {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                (Some(host), vec![host])
            }
            Mapping::Compressed { entry } => {
                // Compressed data may run into the next host cluster; each
                // one it touches holds a reference for this entry.
                let (off, len) = compressed::locate(entry, self.bits());
                (
                    None,
                    (off / cs..=(off + len - 1) / cs).map(|c| c * cs).collect(),
                )
            }
            _ => (None, Vec::new()),
        };
        if !has_backing && (unmap || old_host.is_none()) {
            // Without a backing file, unallocated reads as zeros.
            if prev == Mapping::Unallocated {
                return ZeroAction::Nothing;
            }
            return ZeroAction::SetEntry {
                entry: 0,
                free: refs,
            };
        }
        if v3 {
            return match (unmap, old_host) {
                (false, Some(h)) => ZeroAction::SetEntry {
                    entry: h | L2_ZERO | L2_COPIED,
                    free: Vec::new(),
                },
                _ => ZeroAction::SetEntry {
                    entry: L2_ZERO,
                    free: refs,
                },
            };
        }
        // Version 2 cannot say "zeros" over a backing file.
        if zeroes.is_some() {
            ZeroAction::WriteZeros
        } else {
            ZeroAction::Nothing
        }
    }

    async fn do_flush(&self) -> io::Result<()> {
        if self.backing_unflushed.swap(false, Ordering::AcqRel) {
            if let Some(b) = self.backing() {
                if let Err(e) = b.flush().await {
                    self.backing_unflushed.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        if !self.is_ro() {
            self.meta.lock().await.flush(&self.file).await?;
        }
        self.file.flush().await
    }

    /// Grow the virtual disk to `new_size` bytes (shrinking is refused).
    pub async fn grow(&self, new_size: u64) -> io::Result<()> {
        if self.is_ro() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{}: read-only", self.name),
            ));
        }
        let old = self.size.load(Ordering::Acquire);
        if new_size < old {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: shrinking from {old} to {new_size} bytes is not supported",
                    self.name
                ),
            ));
        }
        let mut meta = self.meta.lock().await;
        meta.flush(&self.file).await?;
        meta.grow(&self.file, &self.header, new_size).await?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

impl BlockIo for Qcow2Driver {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.do_read(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.do_write(offset, buf))
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.do_flush())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(self.do_zero(offset, len, None))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        Box::pin(self.do_zero(offset, len, Some(may_unmap)))
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        Box::pin(Qcow2Driver::grow(self, new_size))
    }
}

impl BlockDriver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }
    fn is_read_only(&self) -> bool {
        self.is_ro()
    }
    fn reopen(&self, read_only: bool) -> Result<(), Error> {
        if read_only == self.is_ro() {
            return Ok(());
        }
        if read_only {
            // Dirty tables go to the file now (no sync: that is the next
            // flush's job); a read-only image never writes them.
            crate::uring::block_on(|| async {
                let mut meta = self.meta.lock().await;
                meta.release_reserved(&self.file).await?;
                meta.flush(&self.file).await
            })
            .and_then(|r| r)
            .map_err(|e| Error::io(format!("{}: writing back metadata: {e}", self.name)))?;
            self.read_only.store(true, Ordering::Release);
            return Ok(());
        }
        self.header
            .check_features(true)
            .map_err(|e| Error::io(format!("{}: {e}", self.name)))?;
        crate::uring::block_on(|| async {
            self.meta
                .lock()
                .await
                .load_refcounts(&self.file, &self.header, self.refcount_cache_tables)
                .await
        })
        .and_then(|r| r)
        .map_err(|e| Error::io(format!("{}: reading refcounts: {e}", self.name)))?;
        self.read_only.store(false, Ordering::Release);
        Ok(())
    }
    fn backing_unflushed(&self) {
        self.backing_unflushed.store(true, Ordering::Release);
    }
    fn set_backing(&self, backing: Option<ChildRef>) -> Result<(), Error> {
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = backing;
        Ok(())
    }
    fn is_allocated(&self, offset: u64) -> BoolFuture<'_> {
        Box::pin(
            async move { Ok(self.lookup(offset >> self.bits()).await? != Mapping::Unallocated) },
        )
    }
    fn close(&self) -> io::Result<()> {
        // Write back the caches; the file node below syncs when it closes.
        crate::uring::block_on(|| async {
            // Unused reserved clusters back first, so the flush writes
            // their refcounts (read-only: nothing is reserved).
            self.meta.lock().await.release_reserved(&self.file).await?;
            self.do_flush().await
        })?
    }
}

/// Bytes `[at, at + n)` of `buf`: `buf` itself when that is all of it (a
/// request within one cluster, most of them), so no new iovec list is made.
fn part_of<'a>(buf: &'a IoVec, at: u64, n: u64, sliced: &'a mut Option<IoVec>) -> &'a IoVec {
    if n == buf.len() as u64 {
        buf
    } else {
        sliced.insert(buf.slice(at as usize, n as usize))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::create::{create, CreateOptions};
    use super::*;
    use crate::formats::{CacheMode, FileDriver};
    use crate::uring::IoThread;

    fn scratch(name: &str) -> PathBuf {
        let d = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/unit-tmp"));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("qcow2-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is required");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    #[test]
    fn grow_extends_the_l1_table_and_refuses_to_shrink() {
        let path = scratch("grow");
        // 4 KiB clusters: one L2 table maps 2 MiB, so 3 MiB needs 2 L1 entries.
        create(
            &path,
            &CreateOptions {
                size: 3 << 20,
                cluster_size: 4096,
                backing: None,
            },
        )
        .unwrap();
        let file: ChildRef =
            Arc::new(FileDriver::open(&path, false, CacheMode::None, 512).unwrap());
        let out = crate::uring::block_on(|| async {
            let q = Qcow2Driver::open("grow", file.clone(), None, false, Qcow2Options::default())
                .await
                .unwrap();
            assert!(q.grow(1 << 20).await.is_err(), "shrink accepted");
            q.grow(64 << 20).await.unwrap();
            assert_eq!(q.size(), 64 << 20);
            let mut buf = AlignedBuf::zeroed(8192, 4096);
            buf.as_mut_slice().fill(0x77);
            q.write((64 << 20) - 8192, &IoVec::from_buf(buf))
                .await
                .unwrap();
            let back = IoVec::from_buf(AlignedBuf::zeroed(8192, 4096));
            q.read((64 << 20) - 8192, &back).await.unwrap();
            q.do_flush().await.unwrap();
            back.into_buf().unwrap().as_slice().to_vec()
        })
        .unwrap();
        assert!(out.iter().all(|&b| b == 0x77));
        drop(file);
        let (ok, info) = qemu_img(&["info", path.to_str().unwrap()]);
        assert!(ok && info.contains("virtual size: 64 MiB"), "{info}");
        let (ok, check) = qemu_img(&["check", path.to_str().unwrap()]);
        assert!(ok, "{check}");
        let (ok, _) = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            path.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        assert!(ok);
        std::fs::remove_file(&path).unwrap();
    }
    /// Block `b` at version `v` (1, 2): every word says which.
    fn pattern(b: u64, v: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(4096, 4096);
        for w in buf.as_mut_slice().chunks_exact_mut(8) {
            w.copy_from_slice(&(b << 8 | v).to_le_bytes());
        }
        buf
    }

    /// Each 512-byte sector of `data` is block `b` at one of `versions`
    /// (0 = zeros).
    fn sectors_are(data: &[u8], b: u64, versions: &[u64]) -> bool {
        data.chunks_exact(512).all(|s| {
            versions.iter().any(|&v| {
                let want = if v == 0 { 0 } else { b << 8 | v };
                s.chunks_exact(8)
                    .all(|w| w == want.to_le_bytes().as_slice())
            })
        })
    }

    async fn read_block(q: &Qcow2Driver, b: u64) -> Result<Vec<u8>, Error> {
        let buf = IoVec::from_buf(AlignedBuf::zeroed(4096, 4096));
        q.read(b * 4096, &buf)
            .await
            .map_err(|e| Error::invalid(format!("read {b}: {e}")))?;
        let mut out = vec![0u8; 4096];
        buf.copy_to(&mut out);
        Ok(out)
    }

    /// Two iothreads write, rewrite, discard and read one image at once:
    /// the allocations (through the lock) evict L2 tables from a four-table
    /// cache while lock-free lookups on both threads keep using theirs.
    /// Block b belongs to thread b % 2, which writes version 1 (allocating),
    /// then version 2 (in place), discards every fifth block, and publishes
    /// each step once done; the other thread checks what it reads against
    /// what was published before its read.
    #[test]
    fn concurrent_lookups_while_two_iothreads_allocate() {
        use std::sync::atomic::AtomicU8;
        use std::time::Duration;

        const BLOCKS: u64 = 8192; // 32 MiB of 4 KiB clusters: 16 L2 tables
        const TASKS: u64 = 16;
        let path = scratch("concurrent");
        create(
            &path,
            &CreateOptions {
                size: BLOCKS * 4096,
                cluster_size: 4096,
                backing: None,
            },
        )
        .unwrap();
        let file: ChildRef =
            Arc::new(FileDriver::open(&path, false, CacheMode::None, 512).unwrap());
        let opts = Qcow2Options {
            l2_cache_bytes: 4 * 4096,
            refcount_cache_bytes: 4 * 4096,
        };
        let q = Arc::new(
            crate::uring::block_on(|| {
                Qcow2Driver::open("concurrent", file.clone(), None, false, opts)
            })
            .unwrap()
            .unwrap(),
        );
        let published: Arc<Vec<AtomicU8>> =
            Arc::new((0..BLOCKS).map(|_| AtomicU8::new(0)).collect());
        let discarded = |b: u64| b.is_multiple_of(5);
        let threads: Vec<_> = (0..2)
            .map(|i| IoThread::start(&format!("q2conc{i}"), Duration::ZERO).unwrap())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), Error>>();
        for (t, thread) in threads.iter().enumerate() {
            let t = t as u64;
            for task in 0..TASKS {
                let (q, published, tx) = (q.clone(), published.clone(), tx.clone());
                thread.handle().run(move || {
                    crate::uring::spawn(async move {
                        let step = |b: u64, v: u64| {
                            let (q, published) = (q.clone(), published.clone());
                            async move {
                                if v == 3 {
                                    q.discard(b * 4096, 4096).await
                                } else {
                                    q.write(b * 4096, &IoVec::from_buf(pattern(b, v))).await
                                }
                                .map_err(|e| {
                                    Error::invalid(format!("step {v} of block {b}: {e}"))
                                })?;
                                let want = if v == 3 { 0 } else { v };
                                let got = read_block(&q, b).await?;
                                if !sectors_are(&got, b, &[want]) {
                                    return Err(Error::invalid(format!(
                                        "block {b}: own read after step {v} is wrong"
                                    )));
                                }
                                published[b as usize].store(v as u8, Ordering::Release);
                                Ok::<(), Error>(())
                            }
                        };
                        let mut rng = (t * TASKS + task + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let r = async {
                            let mine =
                                (0..BLOCKS).filter(|b| b % 2 == t && (b / 2) % TASKS == task);
                            for b in mine {
                                let last = if discarded(b) { 3 } else { 2 };
                                for v in 1..=last {
                                    step(b, v).await?;
                                    // A block of the other thread's.
                                    rng ^= rng << 13;
                                    rng ^= rng >> 7;
                                    rng ^= rng << 17;
                                    let f = (rng % (BLOCKS / 2)) * 2 + (1 - t);
                                    let p = published[f as usize].load(Ordering::Acquire) as u64;
                                    let got = read_block(&q, f).await?;
                                    let ok = match p {
                                        // A write (or a rewrite) may be in flight.
                                        0 | 1 => true,
                                        2 if discarded(f) => sectors_are(&got, f, &[2, 0]),
                                        2 => sectors_are(&got, f, &[2]),
                                        _ => sectors_are(&got, f, &[0]),
                                    };
                                    if !ok {
                                        return Err(Error::invalid(format!(
                                            "block {f}: read after step {p} is wrong"
                                        )));
                                    }
                                }
                            }
                            Ok(())
                        }
                        .await;
                        let _ = tx.send(r);
                    });
                });
            }
        }
        drop(tx);
        for _ in 0..2 * TASKS {
            let r = rx
                .recv_timeout(Duration::from_secs(300))
                .expect("a task neither finished nor failed");
            r.unwrap();
        }
        for t in threads {
            t.stop();
        }
        // Everything again from a third thread, then written back.
        let q2 = q.clone();
        let bad = crate::uring::block_on(move || async move {
            let mut bad = Vec::new();
            for b in 0..BLOCKS {
                let want = if discarded(b) { 0 } else { 2 };
                match read_block(&q2, b).await {
                    Ok(d) if sectors_are(&d, b, &[want]) => {}
                    _ => bad.push(b),
                }
            }
            q2.do_flush().await.map(|()| bad)
        })
        .unwrap()
        .unwrap();
        assert!(bad.is_empty(), "wrong final contents of blocks {bad:?}");
        drop(q);
        drop(file);
        let (ok, check) = qemu_img(&["check", path.to_str().unwrap()]);
        assert!(ok, "{check}");
        // And as QEMU reads it.
        let raw = path.with_extension("raw");
        let (ok, _) = qemu_img(&[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok);
        let data = std::fs::read(&raw).unwrap();
        for b in 0..BLOCKS {
            let want = if discarded(b) { 0 } else { 2 };
            let at = (b * 4096) as usize;
            assert!(
                sectors_are(&data[at..at + 4096], b, &[want]),
                "qemu-img reads block {b} wrong"
            );
        }
        std::fs::remove_file(&raw).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}

//! `file`: a host file or block device, read and written with io_uring on the
//! calling iothread's ring.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::bounce;
use super::driver::{failed, BlockDriver, BlockIo, IoFuture};
use super::lock::Perms;
use super::mapped::TableMap;
use super::{ImageLock, OpenError};
use crate::error::Error;
use crate::uring::{ops, AlignedBuf, IoVec};

/// How the host page cache is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT: bypass the host page cache (falls back where unsupported).
    None,
    /// Buffered I/O through the host page cache.
    Writeback,
}

/// Alignment used for bounce buffers when the kernel rejects a direct
/// transfer whose alignment we could not know in advance.
const SAFE_DIRECT_ALIGN: usize = 4096;
/// Chunk size for writing explicit zeros when the filesystem cannot.
const ZERO_CHUNK: u64 = 1 << 20;

pub(crate) struct FileDriver {
    /// The open file; replaced (in a drained section) when a node opened
    /// read-only is reopened read-write. Requests read `fd` without a lock.
    file: Mutex<File>,
    fd: AtomicI32,
    path: PathBuf,
    read_only: AtomicBool,
    /// The image locks held on `file`, if any (QEMU's `locking=off`: none).
    lock: Mutex<Option<ImageLock>>,
    direct: bool,
    /// Memory alignment O_DIRECT needs (1 when buffered).
    mem_align: usize,
    /// Offset and length alignment O_DIRECT needs (1 when buffered).
    offset_align: usize,
    size: AtomicU64,
    zero_range_ok: AtomicBool,
    punch_hole_ok: AtomicBool,
    /// The file lives in memory (tmpfs): metadata writes are stores into
    /// `tables`, or inline (`ops::Submit::Inline`) where they grow the file.
    in_memory: bool,
    /// The shared mapping metadata is written through on tmpfs, made on
    /// the first such write (see `mapped.rs`).
    tables: Mutex<Option<TableMap>>,
}

/// Open an image file. Only regular files and block devices are images: a
/// FIFO or a device someone named as a backing file must neither block the
/// open (O_NONBLOCK, cleared again once the type is known, because io_uring
/// honours it on reads) nor be used.
pub(crate) fn open_file(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(flags)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ));
    }
    // SAFETY: fcntl on a valid fd we own.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above, clearing one status flag.
    if fl < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// True if `file` is on tmpfs, where a write is a page copy that never
/// waits for a device (short of swapping).
fn in_memory(file: &File) -> bool {
    // SAFETY: fstatfs fills the zero-initialised struct from a valid fd.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

/// (memory alignment, offset alignment) for O_DIRECT, if the kernel says.
fn direct_io_alignment(file: &File) -> Option<(usize, usize)> {
    // SAFETY: statx fills the zero-initialised struct; we pass a valid fd and
    // an empty path with AT_EMPTY_PATH.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        );
        if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_mem_align == 0 {
            return None;
        }
        Some((
            stx.stx_dio_mem_align as usize,
            stx.stx_dio_offset_align as usize,
        ))
    }
}

impl FileDriver {
    /// Open `path`. With `CacheMode::None`, O_DIRECT is used where the
    /// filesystem supports it for `block_size`-aligned requests; otherwise the
    /// file is opened buffered and a line is logged.
    pub(crate) fn open(
        path: &Path,
        read_only: bool,
        cache: CacheMode,
        block_size: usize,
    ) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut direct = cache == CacheMode::None;
        let mut file = match open_file(path, read_only, direct) {
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "{}: O_DIRECT is not supported here; using the host page cache",
                    path.display()
                );
                direct = false;
                open_file(path, read_only, false).map_err(io_err)?
            }
            r => r.map_err(io_err)?,
        };
        let (mut mem_align, mut offset_align) = (1, 1);
        if direct {
            let (mem, offset) = direct_io_alignment(&file).unwrap_or((512, 512));
            if offset > block_size {
                log::info!(
                    "{}: O_DIRECT needs {offset}-byte aligned offsets, the export uses {block_size}; using the host page cache",
                    path.display()
                );
                direct = false;
                file = open_file(path, read_only, false).map_err(io_err)?;
            } else {
                mem_align = mem;
                offset_align = offset.max(1);
            }
        }
        let meta = file.metadata().map_err(io_err)?;
        let size = if meta.file_type().is_block_device() {
            // SAFETY: lseek on a valid fd.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(io_err(io::Error::last_os_error()));
            }
            end as u64
        } else {
            meta.len()
        };
        let in_memory = in_memory(&file);
        Ok(FileDriver {
            fd: AtomicI32::new(file.as_raw_fd()),
            file: Mutex::new(file),
            path: path.to_path_buf(),
            read_only: AtomicBool::new(read_only),
            lock: Mutex::new(None),
            direct,
            mem_align,
            offset_align,
            size: AtomicU64::new(size),
            zero_range_ok: AtomicBool::new(true),
            punch_hole_ok: AtomicBool::new(true),
            in_memory,
            tables: Mutex::new(None),
        })
    }

    /// Take QEMU-compatible image locks on the open file; they are held
    /// until the driver is dropped.
    pub(crate) fn lock(&self, lock: ImageLock) -> Result<(), OpenError> {
        lock.apply(&self.locked_file(), &self.path)?;
        *self.held_lock() = Some(lock);
        Ok(())
    }

    /// Whether metadata at `[offset, offset + len)` goes through the
    /// shared mapping: a writable file in memory, inside the file as we
    /// know it (a write that grows the file is a write).
    fn maps_tables(&self, offset: u64, len: usize) -> bool {
        self.in_memory
            && !self.is_ro()
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.size())
    }

    /// Metadata inside the file, stored through the shared mapping of the
    /// current fd (a reopen replaces the file, and with it the mapping):
    /// Ok(false) where the mapping cannot take it.
    fn store_tables(
        &self,
        store: impl FnOnce(&mut TableMap) -> io::Result<bool>,
    ) -> io::Result<bool> {
        let fd = self.fd();
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let map = match &mut *tables {
            Some(m) if m.fd() == fd => m,
            slot => slot.insert(TableMap::new(fd)),
        };
        store(map).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    fn locked_file(&self) -> MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held_lock(&self) -> MutexGuard<'_, Option<ImageLock>> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_ro(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Switch between read-only and read-write use (the caller has drained
    /// the node): the image locks follow, and a file opened read-only is
    /// opened again for writing, after checking it is still the same file.
    fn do_reopen(&self, read_only: bool) -> Result<(), OpenError> {
        if read_only == self.is_ro() {
            return Ok(());
        }
        let io_err = |source| OpenError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = self.locked_file();
        let mut lock = self.held_lock();
        // Force-share (`-U`) is for read-only use: writing shares normally.
        let new_lock =
            lock.map(|old| ImageLock::for_open(read_only, read_only && old.shared == Perms::ALL));
        let writable_fd = {
            // SAFETY: fcntl on a valid fd we own.
            let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDWR
        };
        if read_only || writable_fd {
            if let (Some(old), Some(new)) = (*lock, new_lock) {
                old.change_to(new, &file, &self.path)?;
            }
            *lock = new_lock;
            self.read_only.store(read_only, Ordering::Release);
            return Ok(());
        }
        let new_file = open_file(&self.path, false, self.direct).map_err(io_err)?;
        let (old_meta, new_meta) = (
            file.metadata().map_err(io_err)?,
            new_file.metadata().map_err(io_err)?,
        );
        if (old_meta.dev(), old_meta.ino()) != (new_meta.dev(), new_meta.ino()) {
            return Err(OpenError::Invalid {
                path: self.path.clone(),
                reason: "the file was replaced since it was opened; not reopening it".into(),
            });
        }
        if let (Some(old), Some(new)) = (*lock, new_lock) {
            // Our own locks on the old file would look like someone else's.
            old.release(&file);
            if let Err(e) = new.apply(&new_file, &self.path) {
                if let Err(again) = old.apply(&file, &self.path) {
                    log::error!(
                        "{}: could not take its locks back: {again}",
                        self.path.display()
                    );
                }
                return Err(e);
            }
        }
        self.fd.store(new_file.as_raw_fd(), Ordering::Release);
        // The old file's mapping goes with it (its fd number may come back).
        *self.tables.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // No request is in flight (drained), so the old fd may close.
        *file = new_file;
        *lock = new_lock;
        self.read_only.store(false, Ordering::Release);
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd.load(Ordering::Acquire)
    }

    /// Direct I/O goes to the device at once; buffered I/O, which the
    /// kernel mostly does inline, with the loop turn (see `ops::Submit`).
    fn submit(&self) -> ops::Submit {
        if self.direct {
            ops::Submit::Now
        } else {
            ops::Submit::WithTurn
        }
    }

    fn read_only_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: opened read-only", self.path.display()),
        )
    }

    async fn do_read(&self, offset: u64, buf: &IoVec) -> io::Result<()> {
        let a = self.offset_align as u64;
        if self.direct && (!offset.is_multiple_of(a) || !(buf.len() as u64).is_multiple_of(a)) {
            return self.bounce_read(offset, buf).await;
        }
        if !self.direct || buf.is_aligned(self.mem_align) {
            match ops::readv(self.fd(), buf, offset, self.submit()).await {
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                r => return r,
            }
        }
        // O_DIRECT with guest buffers the kernel will not take: bounce.
        self.bounce_read(offset, buf).await
    }

    /// Alignment of bounce memory, and of where a bounced transfer resumes.
    fn bounce_align(&self) -> usize {
        SAFE_DIRECT_ALIGN.max(self.mem_align).max(self.offset_align)
    }

    /// O_DIRECT read through aligned bounce chunks (see [`bounce`]): for
    /// buffers the kernel will not take, and for ranges it cannot address
    /// (format metadata smaller than a sector), of which the enclosing
    /// aligned range is read.
    async fn bounce_read(&self, offset: u64, buf: &IoVec) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let a = self.offset_align as u64;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::other("read range overflows"))?;
        let start = offset / a * a;
        // Cannot overflow: end + a - 1 only exceeds u64 for ranges no file has.
        let aligned_end = end.div_ceil(a) * a;
        let chunk = bounce::CHUNK.min((aligned_end - start) as usize);
        let _lease = bounce::lease(chunk).await;
        let mut mem = AlignedBuf::zeroed(chunk, self.bounce_align());
        let mut pos = start;
        while pos < end {
            let n = (aligned_end - pos).min(chunk as u64) as usize;
            // Bytes of this chunk the caller wants (from `pos`).
            let want = (end.min(pos + n as u64) - pos) as usize;
            let iov = IoVec::from_buf(mem);
            let r = self.read_chunk(&iov.slice(0, n), pos, want).await;
            mem = iov.into_buf().ok_or_else(bounce_in_use)?;
            r?;
            let from = offset.max(pos);
            buf.write_at(
                (from - offset) as usize,
                &mem.as_slice()[(from - pos) as usize..want],
            );
            pos += n as u64;
        }
        Ok(())
    }

    /// Read into `chunk` at `pos` until at least `want` bytes arrived (the
    /// file may end inside the chunk's last sector).
    async fn read_chunk(&self, chunk: &IoVec, pos: u64, want: usize) -> io::Result<()> {
        let r = self.bounce_align();
        let mut got = 0;
        while got < want {
            // O_DIRECT resumes only at an aligned point.
            let at = got / r * r;
            let n =
                ops::read_some(self.fd(), &chunk.tail(at), pos + at as u64, self.submit()).await?;
            if at + n <= got {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got = at + n;
        }
        Ok(())
    }

    async fn do_write(&self, offset: u64, buf: &IoVec, submit: ops::Submit) -> io::Result<()> {
        if self.is_ro() {
            return Err(self.read_only_error());
        }
        if !self.direct || buf.is_aligned(self.mem_align) {
            match ops::writev(self.fd(), buf, offset, submit).await {
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                r => {
                    if r.is_ok() {
                        self.grew_to(offset + buf.len() as u64);
                    }
                    return r;
                }
            }
        }
        self.bounce_write(offset, buf).await?;
        self.grew_to(offset + buf.len() as u64);
        Ok(())
    }

    /// O_DIRECT write of a buffer the kernel will not take, through aligned
    /// bounce chunks (see [`bounce`]).
    async fn bounce_write(&self, offset: u64, buf: &IoVec) -> io::Result<()> {
        let chunk = bounce::CHUNK.min(buf.len());
        let _lease = bounce::lease(chunk).await;
        let mut mem = AlignedBuf::zeroed(chunk, self.bounce_align());
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(chunk);
            buf.slice(done, n).copy_to(&mut mem.as_mut_slice()[..n]);
            let iov = IoVec::from_buf(mem);
            let r = ops::writev(
                self.fd(),
                &iov.slice(0, n),
                offset + done as u64,
                self.submit(),
            )
            .await;
            mem = iov.into_buf().ok_or_else(bounce_in_use)?;
            r?;
            done += n;
        }
        Ok(())
    }

    /// Writes past the end (a format driver appending) extend the file.
    fn grew_to(&self, end: u64) {
        self.size.fetch_max(end, Ordering::AcqRel);
    }

    async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.punch_hole_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match ops::fallocate(self.fd(), mode, offset, len).await {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                self.punch_hole_ok.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.zero_range_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match ops::fallocate(self.fd(), mode, offset, len).await {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                self.zero_range_ok.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = len.min(ZERO_CHUNK) as usize;
        let zeros = IoVec::from_shared(Arc::new(AlignedBuf::zeroed(chunk, SAFE_DIRECT_ALIGN)));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            ops::writev(self.fd(), &zeros.slice(0, n), offset + done, self.submit()).await?;
            done += n as u64;
        }
        Ok(())
    }

    async fn do_write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if self.is_ro() {
            return Err(self.read_only_error());
        }
        if may_unmap && self.punch_hole(offset, len).await? {
            return Ok(());
        }
        if self.zero_range(offset, len).await? {
            return Ok(());
        }
        self.write_zero_buffers(offset, len).await
    }
}

/// A bounce chunk is ours again once its operation completed; anything else
/// is a bug, reported rather than risked.
fn bounce_in_use() -> io::Error {
    io::Error::other("bounce buffer still in use after its operation")
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

impl BlockIo for FileDriver {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.do_read(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.do_write(offset, buf, self.submit()))
    }
    fn write_granularity(&self) -> usize {
        // Direct writes to a device: whole (4 KiB) sectors spare a 512e
        // disk its read-modify-write. Into memory (the page cache, or
        // tmpfs, which takes O_DIRECT as a copy), 512 bytes is a short copy.
        if self.direct && !self.in_memory {
            self.offset_align.max(4096)
        } else {
            self.offset_align.max(512)
        }
    }
    fn write_metadata<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        // A format's tables, which guest requests wait for: on tmpfs the
        // copy is cheaper than a worker thread's wake-up. Data writes stay
        // on the ring, where several run at once on io_uring's workers.
        if !self.in_memory {
            return Box::pin(self.do_write(offset, buf, self.submit()));
        }
        if self.maps_tables(offset, buf.len()) {
            match self.store_tables(|m| m.write(offset, buf)) {
                Ok(true) => return Box::pin(std::future::ready(Ok(()))),
                Ok(false) => {}
                Err(e) => return failed(e),
            }
        }
        Box::pin(self.do_write(offset, buf, ops::Submit::Inline))
    }
    fn store_metadata(&self, offset: u64, bytes: &[u8]) -> Option<io::Result<()>> {
        if !self.maps_tables(offset, bytes.len()) {
            return None;
        }
        match self.store_tables(|m| m.store(offset, bytes)) {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }
    fn flush(&self) -> IoFuture<'_> {
        // Read-only too: a snapshot leaves writes of the image's writable
        // days for its overlay's next flush to sync.
        Box::pin(ops::fsync(self.fd(), true))
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if self.is_ro() {
                return Err(self.read_only_error());
            }
            // Discard is advisory: where holes are unsupported it does nothing.
            self.punch_hole(offset, len).await.map(|_| ())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        Box::pin(self.do_write_zeroes(offset, len, may_unmap))
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if self.is_ro() {
                return Err(self.read_only_error());
            }
            let old = self.size();
            if new_size < old {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: shrinking from {old} to {new_size} bytes is not supported",
                        self.path.display()
                    ),
                ));
            }
            let file = self.locked_file();
            if file.metadata()?.is_file() {
                file.set_len(new_size)?;
            } else if new_size > old {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{}: a block device cannot be grown from here",
                        self.path.display()
                    ),
                ));
            }
            self.size.store(new_size, Ordering::Release);
            Ok(())
        })
    }
}

impl BlockDriver for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }
    fn is_read_only(&self) -> bool {
        self.is_ro()
    }
    fn reopen(&self, read_only: bool) -> Result<(), Error> {
        Ok(self.do_reopen(read_only)?)
    }
    fn filename(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }
    fn cache_direct(&self) -> bool {
        self.direct
    }
    fn close(&self) -> io::Result<()> {
        // SAFETY: fdatasync on a valid fd.
        if unsafe { libc::fdatasync(self.fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use super::*;
    use crate::uring::IoThread;

    /// Scratch files under target/ (a real disk: O_DIRECT works there) and
    /// under /dev/shm (tmpfs: it does not).
    fn scratch(dir: &str, name: &str, size: u64) -> PathBuf {
        let d = PathBuf::from(dir);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("ringblk-file-{name}-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn disk_dir() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/unit-tmp").to_string()
    }

    /// A guest-like buffer at an odd address, which no O_DIRECT takes:
    /// the whole backing buffer and the part.
    fn misaligned(len: usize, fill: u8) -> (IoVec, IoVec) {
        let mut backing = AlignedBuf::zeroed(len + 4096, 4096);
        backing.as_mut_slice()[1..1 + len].fill(fill);
        let whole = IoVec::from_buf(backing);
        let part = whole.slice(1, len);
        (whole, part)
    }

    fn contents(iov: &IoVec) -> Vec<u8> {
        let mut v = vec![0u8; iov.len()];
        iov.copy_to(&mut v);
        v
    }

    #[test]
    fn direct_io_with_misaligned_buffers_bounces() {
        let path = scratch(&disk_dir(), "direct", 1 << 20);
        let drv = Arc::new(FileDriver::open(&path, false, CacheMode::None, 512).unwrap());
        assert!(
            drv.cache_direct(),
            "O_DIRECT should work on the work tree's disk"
        );
        let t = IoThread::start("file-direct", Duration::ZERO).unwrap();
        let d = drv.clone();
        let (read_back, leases) = t.handle().block_on(move || async move {
            let (_keep, w) = misaligned(4096, 0x3c);
            d.write(8192, &w).await.unwrap();
            let (_keep, r) = misaligned(4096, 0);
            d.read(8192, &r).await.unwrap();
            (contents(&r), bounce::usage().2)
        });
        assert!(read_back.iter().all(|&b| b == 0x3c));
        assert_eq!(leases, 2, "both transfers bounced");
        let mut on_disk = vec![0u8; 4096];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut on_disk, 8192)
            .unwrap();
        assert!(on_disk.iter().all(|&b| b == 0x3c));
        std::fs::remove_file(&path).unwrap();
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((i * 7 + seed) % 253) as u8)
            .collect()
    }

    #[test]
    fn bounced_transfers_go_in_chunks_and_land_where_they_belong() {
        const DISK: usize = 4 << 20;
        let path = scratch(&disk_dir(), "chunks", DISK as u64);
        std::fs::write(&path, pattern(DISK, 1)).unwrap();
        let drv = Arc::new(FileDriver::open(&path, false, CacheMode::None, 4096).unwrap());
        assert!(drv.cache_direct());
        let t = IoThread::start("file-chunks", Duration::ZERO).unwrap();
        let d = drv.clone();
        // Not a multiple of the chunk: two whole chunks and a ragged end.
        let len = 2 * bounce::CHUNK + 3 * 4096;
        let data = pattern(len, 99);
        let src = data.clone();
        let (aligned_read, ragged_read, usage) = t.handle().block_on(move || async move {
            let (_keep, w) = misaligned(len, 0);
            w.copy_from(&src);
            d.write(40960, &w).await.unwrap();
            let (_keep, r) = misaligned(len, 0);
            d.read(40960, &r).await.unwrap();
            // A range the device cannot address: read around it.
            let (_keep, r2) = misaligned(bounce::CHUNK + 1000, 0);
            d.read(40960 - 300, &r2).await.unwrap();
            (contents(&r), contents(&r2), bounce::usage())
        });
        assert!(aligned_read == data, "misaligned read after write");
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[40960..40960 + len] == data[..], "bytes on disk");
        assert!(
            on_disk[..40960] == pattern(DISK, 1)[..40960],
            "before untouched"
        );
        let tail = 40960 + len;
        assert!(
            on_disk[tail..] == pattern(DISK, 1)[tail..],
            "after untouched"
        );
        assert!(
            ragged_read[..] == on_disk[40960 - 300..40960 - 300 + bounce::CHUNK + 1000],
            "unaligned range"
        );
        let (in_use, peak, leases, _) = usage;
        assert_eq!(in_use, 0);
        assert_eq!(leases, 3);
        assert_eq!(
            peak,
            bounce::CHUNK,
            "one chunk per request, whatever its size"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bounce_memory_stays_within_the_budget() {
        const REQUESTS: usize = 32;
        const LEN: usize = 1 << 20;
        let path = scratch(&disk_dir(), "budget", (REQUESTS * LEN) as u64);
        let drv = Arc::new(FileDriver::open(&path, false, CacheMode::None, 512).unwrap());
        assert!(drv.cache_direct());
        let t = IoThread::start("file-budget", Duration::ZERO).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d = drv.clone();
        t.handle().run(move || {
            // All start in one loop turn: far more than the budget asks at once.
            for i in 0..REQUESTS {
                let (d, tx) = (d.clone(), tx.clone());
                crate::uring::spawn(async move {
                    let (_keep, w) = misaligned(LEN, i as u8);
                    let ok = d.write((i * LEN) as u64, &w).await.is_ok();
                    let (_keep, r) = misaligned(LEN, 0);
                    let ok = ok && d.read((i * LEN) as u64, &r).await.is_ok();
                    let same = contents(&r).iter().all(|&b| b == i as u8);
                    tx.send(ok && same).unwrap();
                });
            }
        });
        for _ in 0..REQUESTS {
            let r = rx.recv_timeout(Duration::from_secs(60));
            assert_eq!(r, Ok(true), "a bounced request failed or hung");
        }
        let (in_use, peak, leases, waited) = t.handle().block_on(|| async { bounce::usage() });
        assert_eq!(in_use, 0, "every lease returned");
        assert_eq!(leases, 2 * REQUESTS as u64);
        assert!(peak <= bounce::BUDGET, "peak {peak} over the budget");
        assert_eq!(peak, bounce::BUDGET, "the budget was the limit");
        assert!(waited > 0, "some requests had to wait");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn cache_none_uses_direct_io_exactly_where_the_kernel_allows_it() {
        // tmpfs takes O_DIRECT on newer kernels (6.6+) and refuses it on
        // older ones; either way the driver opens and says which it got.
        let path = scratch("/dev/shm", "tmpfs", 1 << 20);
        let kernel_allows = open_file(&path, false, true).is_ok();
        let drv = FileDriver::open(&path, false, CacheMode::None, 512).unwrap();
        assert_eq!(drv.cache_direct(), kernel_allows);
        assert_eq!(drv.size(), 1 << 20);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn metadata_writes_on_tmpfs_are_done_by_the_time_the_call_returns() {
        use std::task::{Context, Poll, Waker};
        let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
        for (dir, cache) in [
            ("/dev/shm".to_string(), CacheMode::None),
            ("/dev/shm".to_string(), CacheMode::Writeback),
            (disk_dir(), CacheMode::None),
            (disk_dir(), CacheMode::Writeback),
        ] {
            let path = scratch(&dir, "meta", 1 << 20);
            let drv = Arc::new(FileDriver::open(&path, false, cache, 512).unwrap());
            let tmpfs = dir == "/dev/shm";
            assert_eq!(drv.in_memory, tmpfs, "{dir}");
            let g = drv.write_granularity();
            if drv.cache_direct() && !tmpfs {
                assert!(g >= 4096 && g.is_power_of_two(), "{dir}: {g}");
            } else {
                assert_eq!(g, 512, "{dir} {cache:?}: into memory");
            }
            let sector = move |p: &[u8]| {
                let mut buf = AlignedBuf::zeroed(g, 4096);
                buf.as_mut_slice()[..512].copy_from_slice(p);
                IoVec::from_buf(buf)
            };
            if tmpfs {
                let iov = sector(&pattern);
                // Outside any iothread: only a write that does not go
                // through a ring can finish here, and it does at once.
                let mut fut = drv.write_metadata(4096, &iov);
                let mut cx = Context::from_waker(Waker::noop());
                assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
                // Inside the file: stored through the shared mapping.
                assert!(drv.tables.lock().unwrap().is_some(), "{cache:?}");
                // Past its end: written (the file grows), not stored.
                let end = drv.size();
                let mut fut = drv.write_metadata(end, &iov);
                assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
                assert_eq!(drv.size(), end + iov.len() as u64);
            } else {
                let t = IoThread::start("file-meta", Duration::ZERO).unwrap();
                let (d, p) = (drv.clone(), pattern.clone());
                t.handle()
                    .block_on(move || async move { d.write_metadata(4096, &sector(&p)).await })
                    .unwrap();
            }
            let mut back = vec![0u8; 512];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut back, 4096)
                .unwrap();
            assert_eq!(back, pattern, "{dir} {cache:?}");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn write_zeroes_and_discard_read_back_zeros() {
        for dir in [disk_dir(), "/dev/shm".to_string()] {
            let path = scratch(&dir, "zeroes", 1 << 20);
            std::fs::write(&path, vec![0xffu8; 1 << 20]).unwrap();
            let drv = Arc::new(FileDriver::open(&path, false, CacheMode::Writeback, 512).unwrap());
            let t = IoThread::start("file-zeroes", Duration::ZERO).unwrap();
            let d = drv.clone();
            t.handle().block_on(move || async move {
                d.write_zeroes(0, 65536, true).await.unwrap();
                d.write_zeroes(65536, 65536, false).await.unwrap();
                d.discard(131072, 65536).await.unwrap();
                d.flush().await.unwrap();
            });
            let data = std::fs::read(&path).unwrap();
            assert!(
                data[..196608].iter().all(|&b| b == 0),
                "{dir}: zeroed ranges"
            );
            assert!(
                data[196608..].iter().all(|&b| b == 0xff),
                "{dir}: the rest is untouched"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn read_only_driver_refuses_writes() {
        let path = scratch("/dev/shm", "ro", 65536);
        let drv = Arc::new(FileDriver::open(&path, true, CacheMode::Writeback, 512).unwrap());
        let t = IoThread::start("file-ro", Duration::ZERO).unwrap();
        let d = drv.clone();
        let (w, z) = t.handle().block_on(move || async move {
            let buf = IoVec::from_buf(AlignedBuf::zeroed(512, 512));
            (
                d.write(0, &buf).await.map_err(|e| e.kind()),
                d.write_zeroes(0, 512, true).await.map_err(|e| e.kind()),
            )
        });
        assert_eq!(w, Err(io::ErrorKind::PermissionDenied));
        assert_eq!(z, Err(io::ErrorKind::PermissionDenied));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn opening_a_missing_file_names_it() {
        let err = FileDriver::open(
            Path::new("/nonexistent/disk.img"),
            false,
            CacheMode::None,
            512,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }
}

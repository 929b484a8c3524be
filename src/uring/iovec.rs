//! Scatter-gather lists of host memory handed to the kernel.
//!
//! The bytes behind an [`IoVec`] may change under us at any time: the guest
//! writes its own memory, and the kernel fills read buffers while an
//! operation runs (also after its future was dropped: the ring keeps the
//! buffer alive until the completion). So the CPU only touches those bytes
//! with volatile copies and never through a Rust reference, and an
//! [`AlignedBuf`] is either owned (plain slices) or inside an `IoVec`
//! (volatile only), never both at once.

use std::alloc::{self, Layout};
use std::any::Any;
use std::rc::Rc;
use std::sync::Arc;

use vm_memory::VolatileSlice;

/// Something that keeps the memory behind an [`IoVec`] mapped (guest memory,
/// a bounce buffer) until every operation using it has completed. An `Rc`:
/// lists and the operations on them stay on the iothread that made them,
/// and every request clones one, so its count is a plain add, not a
/// locked instruction.
pub(crate) type KeepAlive = Rc<dyn Any>;

/// Most pieces one `readv`/`writev` takes (Linux's UIO_MAXIOV).
pub(crate) const IOV_MAX: usize = 1024;

/// A list of host buffers plus the owner that keeps them valid.
///
/// Pointers come either from a guest memory mapping (validated against the
/// guest's regions before an `IoVec` is built) or from an [`AlignedBuf`]
/// the list owns.
pub struct IoVec {
    iov: Vec<libc::iovec>,
    len: usize,
    keep: Option<KeepAlive>,
    /// False for lists over shared read-only bytes ([`IoVec::from_shared`]):
    /// nothing may write through them, neither we nor the kernel.
    writable: bool,
}

/// The bytes behind one iovec, for volatile copies.
///
/// # Safety
/// `v` must describe memory valid for reads and writes for the life of the
/// returned slice that is only ever accessed volatilely or by the kernel.
unsafe fn volatile(v: &libc::iovec) -> VolatileSlice<'_> {
    // SAFETY: the caller's contract.
    unsafe { VolatileSlice::new(v.iov_base as *mut u8, v.iov_len) }
}

impl IoVec {
    /// A list over memory someone else keeps mapped (guest memory).
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes for as long as
    /// `keep` is alive, and must never be reachable through a Rust reference
    /// (only volatile accesses and the kernel touch it).
    pub unsafe fn from_raw(iov: Vec<libc::iovec>, keep: Option<KeepAlive>) -> Self {
        let len = iov.iter().map(|v| v.iov_len).sum();
        IoVec {
            iov,
            len,
            keep,
            writable: true,
        }
    }

    fn over(buf: &AlignedBuf) -> Vec<libc::iovec> {
        vec![libc::iovec {
            iov_base: buf.ptr as *mut libc::c_void,
            iov_len: buf.len,
        }]
    }

    /// A list over a whole aligned buffer, which it now owns. Get the buffer
    /// back with [`IoVec::into_buf`] once every operation on it completed.
    pub fn from_buf(buf: AlignedBuf) -> Self {
        let (iov, len) = (Self::over(&buf), buf.len);
        IoVec {
            iov,
            len,
            keep: Some(Rc::new(buf)),
            writable: true,
        }
    }

    /// A list the kernel may only read (a write's source), over a buffer
    /// others may be reading too (e.g. a shared block of zeros).
    pub fn from_shared(buf: Arc<AlignedBuf>) -> Self {
        let (iov, len) = (Self::over(&buf), buf.len);
        IoVec {
            iov,
            len,
            keep: Some(Rc::new(buf)),
            writable: false,
        }
    }

    /// The buffer given to [`IoVec::from_buf`], if this list was built from
    /// it and nothing else (no slice, no operation still in flight) holds it.
    pub fn into_buf(self) -> Option<AlignedBuf> {
        if !self.writable {
            return None;
        }
        let keep = self.keep?;
        let buf = keep.downcast::<AlignedBuf>().ok()?;
        Rc::try_unwrap(buf).ok()
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// False if neither we nor the kernel may write into this list.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    pub(super) fn keepalive(&self) -> Option<&KeepAlive> {
        self.keep.as_ref()
    }

    /// The bytes `[offset, offset + len)` of this list, sharing its owner.
    pub fn slice(&self, offset: usize, len: usize) -> IoVec {
        let mut out = Vec::new();
        let (mut skip, mut want) = (offset, len);
        for v in &self.iov {
            if want == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(want);
            out.push(libc::iovec {
                // SAFETY: skip < iov_len, so the result stays inside the buffer.
                iov_base: unsafe { (v.iov_base as *mut u8).add(skip) } as *mut libc::c_void,
                iov_len: n,
            });
            want -= n;
            skip = 0;
        }
        let len = len - want;
        IoVec {
            iov: out,
            len,
            keep: self.keep.clone(),
            writable: self.writable,
        }
    }

    /// The first `max` pieces of the list, if it has more than that (the
    /// most one system call takes is [`IOV_MAX`]).
    pub fn first_pieces(&self, max: usize) -> Option<IoVec> {
        if self.iov.len() <= max {
            return None;
        }
        let iov = self.iov[..max].to_vec();
        let len = iov.iter().map(|v| v.iov_len).sum();
        Some(IoVec {
            iov,
            len,
            keep: self.keep.clone(),
            writable: self.writable,
        })
    }

    /// Several lists one after another, as one; writable only if all are.
    pub fn concat(parts: &[&IoVec]) -> IoVec {
        let iov: Vec<libc::iovec> = parts.iter().flat_map(|p| p.iov.iter().copied()).collect();
        let keeps: Vec<KeepAlive> = parts.iter().filter_map(|p| p.keep.clone()).collect();
        let len = parts.iter().map(|p| p.len).sum();
        IoVec {
            iov,
            len,
            keep: Some(Rc::new(keeps)),
            writable: parts.iter().all(|p| p.writable),
        }
    }

    /// Everything after the first `offset` bytes.
    pub fn tail(&self, offset: usize) -> IoVec {
        self.slice(offset, self.len.saturating_sub(offset))
    }

    /// True if every buffer address and length is a multiple of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.iov
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len % align == 0)
    }

    /// Fill the whole list with zero bytes (a memset per piece, instead of
    /// copying zeros from a buffer: half the memory traffic).
    /// Panics on a read-only list: writing into one is a bug of ours.
    pub fn fill_zero(&self) {
        assert!(self.writable, "write into a read-only IoVec");
        for v in &self.iov {
            // SAFETY: from_raw's contract or an owned AlignedBuf: the piece is
            // valid for writes of iov_len bytes and no Rust reference points
            // into it (module doc). The bytes are written through a raw
            // pointer, never read back, and no reference is formed, so a
            // concurrent writer (the guest) can only race on the values the
            // memory ends up holding, exactly as with the bulk copies
            // vm-memory's VolatileSlice::copy_from does for large slices.
            unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
        }
    }

    /// True if every byte is zero (`detect-zeroes`; read in 4 KiB pieces).
    pub fn is_zero(&self) -> bool {
        let mut chunk = [0u8; 4096];
        let mut off = 0;
        while off < self.len {
            let n = (self.len - off).min(chunk.len());
            self.slice(off, n).copy_to(&mut chunk[..n]);
            if chunk[..n].iter().any(|&b| b != 0) {
                return false;
            }
            off += n;
        }
        true
    }

    /// Copy the list's contents into `dst`, as much as fits.
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut off = 0;
        for v in &self.iov {
            if off == dst.len() {
                break;
            }
            // SAFETY: from_raw's contract or an owned AlignedBuf: valid, and
            // only accessed volatilely while the list exists.
            off += unsafe { volatile(v) }.copy_to(&mut dst[off..]);
        }
    }

    /// Copy `src` into the list (up to `len()` bytes).
    pub fn copy_from(&self, src: &[u8]) {
        self.write_at(0, src);
    }

    /// Copy `src` into the list starting `at` bytes in (as much as fits).
    /// Panics on a read-only list: writing into one is a bug of ours.
    pub fn write_at(&self, mut at: usize, src: &[u8]) {
        assert!(self.writable, "write into a read-only IoVec");
        let mut off = 0;
        for v in &self.iov {
            if off == src.len() {
                break;
            }
            if at >= v.iov_len {
                at -= v.iov_len;
                continue;
            }
            // SAFETY: as in copy_to; at < iov_len.
            let s = unsafe { volatile(v) };
            let n = (v.iov_len - at).min(src.len() - off);
            if let Ok(part) = s.subslice(at, n) {
                part.copy_from(&src[off..off + n]);
            }
            off += n;
            at = 0;
        }
    }
}

/// A heap buffer with a chosen alignment, for O_DIRECT bounce buffers.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&self` only gives out `&[u8]`; the kernel and volatile writers
// reach the bytes only through an IoVec, which owns the buffer exclusively
// (`from_buf`) or may not write it (`from_shared`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes aligned to `align` (a power of two).
    pub fn zeroed(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, layout }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes, initialised (zeroed at alloc).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: unique access through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_only_when_no_one_else_holds_it() {
        let mut b = AlignedBuf::zeroed(64, 8);
        b.as_mut_slice()[..4].copy_from_slice(b"abcd");
        let iov = IoVec::from_buf(b);
        let part = iov.slice(2, 10);
        part.copy_from(b"XY");
        let mut out = [0u8; 4];
        iov.copy_to(&mut out);
        assert_eq!(&out, b"abXY");
        assert!(IoVec::from_buf(AlignedBuf::zeroed(1, 1))
            .into_buf()
            .is_some());
        assert!(iov.into_buf().is_none(), "the slice still shares it");
        let shared = Arc::new(AlignedBuf::zeroed(8, 8));
        let ro = IoVec::from_shared(shared.clone());
        assert!(!ro.is_writable());
        assert!(ro.into_buf().is_none());
        drop(part);
    }

    #[test]
    fn writes_at_offsets_span_pieces_and_stop_at_the_end() {
        let iov = IoVec::from_buf(AlignedBuf::zeroed(16, 8));
        let two = IoVec::concat(&[&iov.slice(0, 5), &iov.slice(8, 8)]);
        assert_eq!(two.len(), 13);
        two.write_at(3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        let mut out = [0u8; 16];
        iov.copy_to(&mut out);
        assert_eq!(out, [0, 0, 0, 1, 2, 0, 0, 0, 3, 4, 5, 6, 7, 8, 9, 10]);
        two.fill_zero();
        iov.copy_to(&mut out);
        assert_eq!(out, [0; 16]);
        assert_eq!(two.first_pieces(1).map(|p| p.len()), Some(5));
        assert!(two.first_pieces(2).is_none());
    }
}

//! Scatter-gather lists of host memory handed to the kernel.

use std::alloc::{self, Layout};
use std::any::Any;
use std::sync::Arc;

/// Something that keeps the memory behind an [`IoVec`] mapped (guest memory,
/// a bounce buffer) until every operation using it has completed.
pub type KeepAlive = Arc<dyn Any + Send + Sync>;

/// A list of host buffers plus the owner that keeps them valid.
///
/// Pointers come either from a guest memory mapping (validated against the
/// guest's regions before an `IoVec` is built) or from an [`AlignedBuf`].
pub struct IoVec {
    iov: Vec<libc::iovec>,
    len: usize,
    keep: Option<KeepAlive>,
}

// SAFETY: an IoVec is a description of memory owned by `keep` (which is
// Send + Sync); the raw pointers are only dereferenced by the kernel or under
// the rules documented on the constructors.
unsafe impl Send for IoVec {}
// SAFETY: see above; IoVec exposes no interior mutability.
unsafe impl Sync for IoVec {}

impl IoVec {
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes for as long as
    /// `keep` is alive, and must not alias Rust references.
    pub unsafe fn from_raw(iov: Vec<libc::iovec>, keep: Option<KeepAlive>) -> Self {
        let len = iov.iter().map(|v| v.iov_len).sum();
        IoVec { iov, len, keep }
    }

    /// An IoVec over a whole aligned buffer, keeping the buffer alive.
    pub fn from_buf(buf: Arc<AlignedBuf>) -> Self {
        let iov = vec![libc::iovec {
            iov_base: buf.ptr as *mut libc::c_void,
            iov_len: buf.len,
        }];
        let len = buf.len;
        IoVec {
            iov,
            len,
            keep: Some(buf),
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    pub fn keepalive(&self) -> Option<&KeepAlive> {
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
        }
    }

    /// Several lists one after another, as one.
    pub fn concat(parts: &[&IoVec]) -> IoVec {
        let iov: Vec<libc::iovec> = parts.iter().flat_map(|p| p.iov.iter().copied()).collect();
        let keeps: Vec<KeepAlive> = parts.iter().filter_map(|p| p.keep.clone()).collect();
        let len = parts.iter().map(|p| p.len).sum();
        IoVec {
            iov,
            len,
            keep: Some(Arc::new(keeps)),
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

    /// Fill the whole list with zero bytes.
    pub fn fill_zero(&self) {
        for v in &self.iov {
            // SAFETY: from_raw's contract: each buffer is valid for writes.
            unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
        }
    }

    /// Copy the list's contents into `dst` (which must be at least `len()` long).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut off = 0;
        for v in &self.iov {
            let n = v.iov_len.min(dst.len() - off);
            // SAFETY: buffer valid for reads (from_raw contract); dst has room for n.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, dst[off..].as_mut_ptr(), n)
            };
            off += n;
        }
    }

    /// Copy `src` into the list (up to `len()` bytes).
    pub fn copy_from(&self, src: &[u8]) {
        let mut off = 0;
        for v in &self.iov {
            let n = v.iov_len.min(src.len() - off);
            // SAFETY: buffer valid for writes (from_raw contract); src has n bytes.
            unsafe { std::ptr::copy_nonoverlapping(src[off..].as_ptr(), v.iov_base as *mut u8, n) };
            off += n;
            if off == src.len() {
                break;
            }
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
// SAFETY: shared access only hands out raw pointers / copies.
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

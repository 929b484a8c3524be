//! The dirty log for live migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD).
//!
//! While a migration copies guest RAM, the frontend must learn of every
//! guest page the daemon writes, or the destination gets a stale copy of
//! it. The frontend hands us a bitmap in shared memory (SET_LOG_BASE): bit
//! `n` stands for the 4 KiB guest-physical page `n` (byte `n / 8`, bit
//! `n % 8`, which on a little-endian host is also bit `n % 64` of the
//! frontend's u64 chunks). We set bits; the frontend reads and clears them.
//!
//! # Sharing
//!
//! The bitmap is the frontend's too (it clears bits while we set them) and
//! several iothreads set bits at once: every access is an atomic
//! `fetch_or` on one byte, never a slice. Pages past the bitmap's end are
//! not logged (nothing written there): the frontend sized the log for the
//! memory it gave us, so a GPA beyond it is one it does not migrate.
//!
//! # Cost when off
//!
//! [`DirtyLog::current`] is one acquire load of a flag (a plain load on
//! x86) while logging is off; only while the driver has VHOST_F_LOG_ALL
//! acknowledged does it take a lock to get the mapping.
//!
//! # A hostile frontend
//!
//! The fd must be a regular file (a memfd is one) holding the whole area.
//! A frontend that later shrinks the file would make our stores fault: the
//! mapping is registered with [`sigbus`](crate::os::sigbus) like guest memory, so the
//! fault is absorbed and the session hangs up on that frontend.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::shared_map::SharedMap;
use crate::error::Error;
use crate::os::sigbus;

/// Bytes of guest memory one bit of the log stands for (the spec's
/// VHOST_LOG_PAGE).
pub(crate) const LOG_PAGE: u64 = 4096;
/// The largest log we map: one bit per 4 KiB page of 32 TiB of guest
/// physical address space. It is virtual address space only: we touch
/// just the bytes for pages we write.
pub(crate) const MAX_LOG_BYTES: u64 = 1 << 30;
/// `used_log` value meaning "VHOST_VRING_F_LOG not set".
const NO_USED_LOG: u64 = u64::MAX;

/// The mapped bitmap. Only atomics ever touch it.
pub(crate) struct LogMap {
    /// Absorbs a SIGBUS if the frontend shrinks the file (None for the
    /// anonymous maps of tests). Declared first: dropped before the unmap,
    /// after which the addresses may be reused.
    _registration: Option<sigbus::Registration>,
    map: SharedMap,
}

impl LogMap {
    /// SET_LOG_BASE: map `mmap_size` bytes at `mmap_offset` of `fd`. The
    /// decoder checked the numbers (size 1..=MAX_LOG_BYTES, offset
    /// page-aligned, no overflow); the file is checked here. A SIGBUS in
    /// the mapping signals `poison_fd`.
    pub(crate) fn open(
        fd: &OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        poison_fd: RawFd,
    ) -> Result<LogMap, Error> {
        if mmap_size == 0 || mmap_size > MAX_LOG_BYTES {
            return Err(Error::invalid(format!(
                "log of {mmap_size} bytes (1 to {MAX_LOG_BYTES})"
            )));
        }
        let map = SharedMap::open(fd.as_fd(), mmap_offset, mmap_size, "dirty log")?;
        // SAFETY: sysconf has no side effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let registration = sigbus::register(map.ptr() as usize, map.len(), page, poison_fd)
            .map_err(|e| Error::invalid(format!("registering the dirty log: {e}")))?;
        Ok(LogMap {
            _registration: Some(registration),
            map,
        })
    }

    /// An anonymous zeroed log of `len` bytes (tests).
    #[cfg(test)]
    pub(crate) fn anonymous(len: usize) -> LogMap {
        LogMap {
            _registration: None,
            map: SharedMap::anonymous(len),
        }
    }

    #[cfg(test)]
    /// Bytes of bitmap.
    pub(crate) fn bytes(&self) -> usize {
        self.map.len()
    }

    fn byte(&self, i: usize) -> &AtomicU8 {
        debug_assert!(i < self.map.len());
        // SAFETY: i < len, inside our mapping, which outlives &self;
        // AtomicU8 has the alignment and size of u8, and the memory is only
        // ever accessed atomically (by us) or by another process.
        unsafe { AtomicU8::from_ptr(self.map.ptr().add(i)) }
    }

    /// Mark the pages of `[gpa, gpa + len)` dirty. Pages past the log's
    /// end are skipped; an empty range marks nothing.
    pub(crate) fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        // Saturating: a range wrapping past u64::MAX stops at the top.
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let pages = (self.map.len() as u64) * 8;
        if first >= pages {
            return;
        }
        for page in first..=last.min(pages - 1) {
            // page < len * 8 <= usize::MAX: the cast and the index fit.
            let bit = 1u8 << (page % 8);
            let b = self.byte((page / 8) as usize);
            // A plain load first: a page written over and over stays dirty
            // without a read-modify-write on a contended line each time.
            if b.load(Ordering::Relaxed) & bit == 0 {
                b.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether page `page`'s bit is set (tests).
    #[cfg(test)]
    pub(crate) fn is_dirty(&self, page: u64) -> bool {
        self.byte((page / 8) as usize).load(Ordering::Relaxed) & (1 << (page % 8)) != 0
    }
}

/// The session's logging state, shared with its queues.
pub(crate) struct DirtyLog {
    /// VHOST_F_LOG_ALL is acknowledged.
    active: AtomicBool,
    map: Mutex<Option<Arc<LogMap>>>,
    /// Per queue: the used ring's guest-physical log address
    /// (VHOST_VRING_F_LOG), or NO_USED_LOG.
    used_log: Vec<AtomicU64>,
}

impl DirtyLog {
    pub(crate) fn new(num_queues: usize) -> Arc<DirtyLog> {
        Arc::new(DirtyLog {
            active: AtomicBool::new(false),
            map: Mutex::new(None),
            used_log: (0..num_queues)
                .map(|_| AtomicU64::new(NO_USED_LOG))
                .collect(),
        })
    }

    /// The log to mark, or None while logging is off or no log is mapped.
    /// One flag load while off.
    #[inline]
    pub(crate) fn current(&self) -> Option<Arc<LogMap>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SET_FEATURES: logging follows VHOST_F_LOG_ALL. Release: a queue that
    /// sees the flag sees the map set before it.
    pub(crate) fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Release);
    }

    /// SET_LOG_BASE: a new log replaces the old one (unmapped once no
    /// queue holds it).
    pub(crate) fn set_map(&self, map: Option<LogMap>) {
        *self.map.lock().unwrap_or_else(|e| e.into_inner()) = map.map(Arc::new);
    }

    #[cfg(test)]
    pub(crate) fn has_map(&self) -> bool {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// SET_VRING_ADDR: where queue `index`'s used ring is logged (None:
    /// VHOST_VRING_F_LOG not set).
    pub(crate) fn set_used_log(&self, index: usize, gpa: Option<u64>) {
        if let Some(slot) = self.used_log.get(index) {
            slot.store(gpa.unwrap_or(NO_USED_LOG), Ordering::Release);
        }
    }

    /// The used ring's log address of queue `index`, if it is logged.
    pub(crate) fn used_log(&self, index: usize) -> Option<u64> {
        let v = self.used_log.get(index)?.load(Ordering::Acquire);
        (v != NO_USED_LOG).then_some(v)
    }

    /// Reset: logging off, log unmapped, no ring logged.
    pub(crate) fn clear(&self) {
        self.set_active(false);
        self.set_map(None);
        for slot in &self.used_log {
            slot.store(NO_USED_LOG, Ordering::Release);
        }
    }
}

/// Fault injection, for the migration test that shows the log matters:
/// with `RINGBLK_FAULT_SKIP_DIRTY_LOG` set in the environment, the daemon
/// acknowledges VHOST_F_LOG_ALL and marks nothing, so that a migrated guest
/// finds the pages the device wrote stale. Never set it in production.
pub(crate) fn marking_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        let off = std::env::var_os("RINGBLK_FAULT_SKIP_DIRTY_LOG").is_some();
        if off {
            log::warn!("RINGBLK_FAULT_SKIP_DIRTY_LOG is set: dirty logging marks nothing (migrations will lose data)");
        }
        off
    })
}

/// Mark the used ring writes of one completion (or of a notification
/// change): the ring's flags and idx, the element at `slot`, and (with
/// EVENT_IDX) avail_event after the ring. `used` is the ring's log address.
pub(crate) fn mark_used(log: &LogMap, used: u64, size: u16, slot: Option<u16>, event_idx: bool) {
    // flags + idx
    log.mark(used, 4);
    if let Some(s) = slot {
        log.mark(used.saturating_add(4 + 8 * (s % size.max(1)) as u64), 8);
    }
    if event_idx {
        log.mark(used.saturating_add(4 + 8 * size as u64), 2);
    }
}

#[cfg(test)]
#[path = "dirty_log_tests.rs"]
mod tests;

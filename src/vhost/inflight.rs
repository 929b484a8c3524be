//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split rings.
//!
//! A shared memory region, handed to the frontend with GET_INFLIGHT_FD and
//! given back to the next daemon with SET_INFLIGHT_FD, records which
//! descriptor heads were popped and have no used entry yet. A daemon that
//! dies (SIGKILL, crash, an upgrade) leaves it behind; its successor
//! resubmits exactly those requests, in the order they were popped.
//!
//! Layout per queue (vhost-user spec, "Inflight I/O tracking"): a 16-byte
//! [`QueueRegionSplit`] header then `queue_size` [`DescStateSplit`] entries,
//! each queue's region rounded up to 64 bytes; queue regions follow each
//! other.
//!
//! # Ordering (what makes every crash point recoverable)
//!
//! Pop: `desc[h].counter = c++`, then `desc[h].inflight = 1`, before the
//! request is submitted, in pop order. A crash leaves the marked heads plus
//! the completed ones a prefix of the avail ring, so the next avail index
//! is `used->idx + (number marked)`.
//!
//! Complete: `desc[h].next = last_batch_head; last_batch_head = h`, then the
//! used element and `used->idx` are written, then `desc[h].inflight = 0`,
//! then `used_idx = used->idx`. On recovery, `used_idx != used->idx` means
//! the used entry of `last_batch_head` is out but its flag may not be
//! cleared: it is cleared then. Each completion is a batch of one.
//!
//! Only program order matters: a killed process's executed stores are not
//! lost (the pages belong to the memfd, not to the process), and the next
//! daemon reads the region only after this one is gone. Compiler fences
//! keep the program order; no CPU fence is needed.
//!
//! # A hostile frontend
//!
//! The region is the frontend's to scribble on. It is only ever touched
//! with atomic loads and stores at offsets computed from sizes we checked;
//! heads beyond the ring are ignored; a region that does not say version 1
//! is reset. The fd must be a memfd sealed against shrinking (as the ones
//! we hand out are), so the mapping cannot fault under us.

use std::cell::Cell;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};

use vm_memory::ByteValued;

use crate::error::Error;
use crate::vhost::shared_map::{os_err, SharedMap};

/// The region layout version we write and accept.
pub const VERSION: u16 = 1;
/// Each queue's region is rounded up to this many bytes.
const QUEUE_ALIGN: u64 = 64;

// The `vhost` crate has structs of these names, but not for this use: its
// `QueueRegionSplit` carries a `desc` pointer field the shared region does
// not have (the region's header is 16 bytes, then the array), and neither
// is `ByteValued`, so neither can be read from or written to the region.

/// One descriptor head's state (spec: `DescStateSplit`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct DescStateSplit {
    /// 1 while the head is in flight.
    pub inflight: u8,
    pub padding: [u8; 5],
    /// Links the last batch of used heads.
    pub next: u16,
    /// Pop order.
    pub counter: u64,
}

/// One queue's header (spec: `QueueRegionSplit`, without its `desc[]`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct QueueRegionSplit {
    pub features: u64,
    /// 0: never used; 1: this layout.
    pub version: u16,
    pub desc_num: u16,
    pub last_batch_head: u16,
    /// The used ring's idx after the last completed batch.
    pub used_idx: u16,
}

// SAFETY: plain integers with no padding bytes (sizes checked below).
unsafe impl ByteValued for DescStateSplit {}
// SAFETY: as above.
unsafe impl ByteValued for QueueRegionSplit {}

const HEADER_LEN: u64 = size_of::<QueueRegionSplit>() as u64;
const DESC_LEN: u64 = size_of::<DescStateSplit>() as u64;
const _: () = assert!(HEADER_LEN == 16 && DESC_LEN == 16);
const _: () = assert!(offset_of!(DescStateSplit, next) == 6);
const _: () = assert!(offset_of!(DescStateSplit, counter) == 8);
const _: () = assert!(offset_of!(QueueRegionSplit, version) == 8);
const _: () = assert!(offset_of!(QueueRegionSplit, used_idx) == 14);

/// Bytes one queue of `queue_size` entries takes in the region.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER_LEN + DESC_LEN * queue_size as u64).div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Bytes the whole region takes (u16 × u16 × small: no overflow).
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    num_queues as u64 * queue_region_size(queue_size)
}

/// Set when the daemon exits keeping its guests (SIGUSR1): requests that
/// finish from then on are left in flight in the region for the next
/// daemon to resubmit, instead of getting a used entry.
static DETACHING: AtomicBool = AtomicBool::new(false);

pub fn begin_detach() {
    DETACHING.store(true, Ordering::SeqCst);
}

pub fn detaching() -> bool {
    DETACHING.load(Ordering::Relaxed)
}

/// The region, mapped shared. Only atomics ever touch it.
pub struct InflightMap {
    map: SharedMap,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightMap {
    /// GET_INFLIGHT_FD: a fresh zeroed region in a memfd sealed against
    /// resizing. Returns the mapping and the fd to hand to the frontend.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(InflightMap, OwnedFd), Error> {
        let len = region_size(num_queues, queue_size);
        // SAFETY: NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"ringblk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(os_err("memfd_create"));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(os_err("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os_err("sealing the inflight memfd"));
        }
        let map = Self::map(&fd, 0, len, num_queues, queue_size)?;
        Ok((map, fd))
    }

    /// SET_INFLIGHT_FD: map the region the frontend gives back. The sizes
    /// were checked by the decoder (`mmap_offset` page-aligned, `mmap_size`
    /// large enough for the layout); the file is checked here.
    pub fn open(
        fd: &OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightMap, Error> {
        let need = region_size(num_queues, queue_size);
        if mmap_size < need {
            return Err(Error::invalid(format!(
                "inflight region of {mmap_size} bytes, {need} needed for {num_queues} queues of {queue_size}"
            )));
        }
        // SAFETY: fcntl on a descriptor we own; -1 (not a memfd) is checked.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::invalid(
                "the inflight fd must be a memfd sealed against shrinking, as GET_INFLIGHT_FD hands out",
            ));
        }
        Self::map(fd, mmap_offset, need, num_queues, queue_size)
    }

    fn map(
        fd: &OwnedFd,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightMap, Error> {
        Ok(InflightMap {
            map: SharedMap::open(fd.as_fd(), offset, len, "inflight region")?,
            num_queues,
            queue_size,
        })
    }

    /// The tracker of queue `index`, whose ring has `ring_size` entries.
    pub fn queue(
        self: &std::sync::Arc<Self>,
        index: u16,
        ring_size: u16,
    ) -> Result<QueueInflight, Error> {
        if index >= self.num_queues {
            return Err(Error::invalid(format!(
                "vring {index}: the inflight region covers {} queues",
                self.num_queues
            )));
        }
        if ring_size > self.queue_size {
            return Err(Error::invalid(format!(
                "vring {index}: size {ring_size} exceeds the inflight region's queue size {}",
                self.queue_size
            )));
        }
        Ok(QueueInflight {
            map: self.clone(),
            base: index as u64 * queue_region_size(self.queue_size),
            ring_size,
            counter: Cell::new(0),
        })
    }
}

/// What a queue resumes with after SET_INFLIGHT_FD.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to run again, in pop order.
    pub resubmit: Vec<u16>,
    /// The avail index to pop from next (`used->idx` + in flight), or
    /// None for a fresh region (the frontend's base stands).
    pub next_avail: Option<u16>,
    /// Inconsistencies fixed on the way (for the log).
    pub repaired: Vec<String>,
}

/// One queue's part of the region, used on its iothread only.
pub struct QueueInflight {
    map: std::sync::Arc<InflightMap>,
    /// Offset of this queue's header in the mapping.
    base: u64,
    /// Heads at or past this are not ours to track.
    ring_size: u16,
    counter: Cell<u64>,
}

impl QueueInflight {
    fn at<T>(&self, off: u64) -> *mut T {
        // Offsets are below base + queue_region_size(queue_size), which the
        // mapping holds (InflightMap::queue bounds index and ring size).
        debug_assert!(self.base + off + size_of::<T>() as u64 <= self.map.map.len() as u64);
        // SAFETY: in bounds of the mapping, as argued above.
        unsafe { self.map.map.ptr().add((self.base + off) as usize) as *mut T }
    }

    fn u16_at(&self, off: u64) -> &AtomicU16 {
        // SAFETY: in bounds (see `at`), 2-aligned (page-aligned mapping,
        // 64-aligned queues, even offsets), alive as long as `self.map`;
        // shared memory is only ever accessed atomically by us.
        unsafe { AtomicU16::from_ptr(self.at(off)) }
    }

    fn header_u16(&self, field: usize) -> &AtomicU16 {
        self.u16_at(field as u64)
    }

    fn desc_off(&self, head: u16) -> u64 {
        HEADER_LEN + DESC_LEN * head as u64
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        // SAFETY: in bounds (head < ring_size <= queue_size), see `u16_at`.
        unsafe { AtomicU8::from_ptr(self.at(self.desc_off(head))) }
    }

    fn next(&self, head: u16) -> &AtomicU16 {
        self.u16_at(self.desc_off(head) + offset_of!(DescStateSplit, next) as u64)
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        let off = self.desc_off(head) + offset_of!(DescStateSplit, counter) as u64;
        // SAFETY: in bounds, 8-aligned (16-byte entries after a 16-byte
        // header in a 64-aligned queue region), see `u16_at`.
        unsafe { AtomicU64::from_ptr(self.at(off)) }
    }

    /// Popped `head`: mark it in flight before it is submitted. Heads
    /// beyond the ring are left alone (the chain walk refuses them).
    pub fn mark(&self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        let c = self.counter.get();
        self.counter.set(c.wrapping_add(1));
        self.counter_of(head).store(c, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        self.inflight(head).store(1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    /// Before `head`'s used entry is written: it becomes the last batch.
    pub fn pre_put(&self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        let last = self.header_u16(offset_of!(QueueRegionSplit, last_batch_head));
        self.next(head)
            .store(last.load(Ordering::Relaxed), Ordering::Relaxed);
        last.store(head, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    /// After `head`'s used entry and the used index `used_idx` are written.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        compiler_fence(Ordering::SeqCst);
        if head < self.ring_size {
            self.inflight(head).store(0, Ordering::Relaxed);
        }
        compiler_fence(Ordering::SeqCst);
        self.header_u16(offset_of!(QueueRegionSplit, used_idx))
            .store(used_idx, Ordering::Relaxed);
    }

    /// At queue start: repair the last batch against the used ring's
    /// `ring_used_idx`, collect the heads still in flight in pop order and
    /// continue the counter after them.
    pub fn recover(&self, ring_used_idx: u16) -> Recovery {
        let mut rec = Recovery::default();
        let version = self.header_u16(offset_of!(QueueRegionSplit, version));
        let used_idx = self.header_u16(offset_of!(QueueRegionSplit, used_idx));
        let capacity = self.map.queue_size;
        match version.load(Ordering::Relaxed) {
            0 => {
                // Never used: start tracking from the frontend's state.
                // Stale flags (a region reused after a reset) are cleared.
                for h in 0..capacity {
                    self.inflight(h).store(0, Ordering::Relaxed);
                }
                self.header_u16(offset_of!(QueueRegionSplit, desc_num))
                    .store(capacity, Ordering::Relaxed);
                used_idx.store(ring_used_idx, Ordering::Relaxed);
                compiler_fence(Ordering::SeqCst);
                version.store(VERSION, Ordering::Relaxed);
                self.counter.set(0);
                return rec;
            }
            VERSION => {}
            v => {
                rec.repaired.push(format!(
                    "region version {v}, expected {VERSION}: its state is discarded"
                ));
                version.store(0, Ordering::Relaxed);
                let mut fresh = self.recover(ring_used_idx);
                fresh.repaired = rec.repaired;
                return fresh;
            }
        }
        let recorded = used_idx.load(Ordering::Relaxed);
        if recorded != ring_used_idx {
            // The used entry of the last batch is out; its flag may not
            // have been cleared yet.
            let gap = ring_used_idx.wrapping_sub(recorded);
            let last = self
                .header_u16(offset_of!(QueueRegionSplit, last_batch_head))
                .load(Ordering::Relaxed);
            if gap != 1 {
                rec.repaired.push(format!(
                    "used ring is {gap} entries past the region's used_idx (batches are of one)"
                ));
            }
            if last < capacity {
                self.inflight(last).store(0, Ordering::Relaxed);
            } else {
                rec.repaired
                    .push(format!("last_batch_head {last} is out of range"));
            }
            compiler_fence(Ordering::SeqCst);
            used_idx.store(ring_used_idx, Ordering::Relaxed);
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        let mut ignored = 0usize;
        for h in 0..capacity {
            match self.inflight(h).load(Ordering::Relaxed) {
                0 => {}
                v => {
                    if h >= self.ring_size || v != 1 {
                        // Not a state we write: forget it.
                        self.inflight(h).store(0, Ordering::Relaxed);
                        ignored += 1;
                    } else {
                        heads.push((self.counter_of(h).load(Ordering::Relaxed), h));
                    }
                }
            }
        }
        if ignored > 0 {
            rec.repaired
                .push(format!("{ignored} entries with invalid state cleared"));
        }
        heads.sort_unstable();
        let next = heads.last().map_or(0, |(c, _)| c.wrapping_add(1));
        self.counter.set(next);
        // At most ring_size (<= 32768) heads: fits in u16.
        rec.next_avail = Some(ring_used_idx.wrapping_add(heads.len() as u16));
        rec.resubmit = heads.into_iter().map(|(_, h)| h).collect();
        rec
    }
}

/// Put `head` on the used ring, with the region's bookkeeping around it
/// when the queue is tracked. While the daemon detaches (keeping its
/// guest), a tracked request gets no used entry: it stays in flight in the
/// region and the next daemon runs it again (block requests are
/// idempotent). `add` writes the entry and returns the new used index.
/// Returns whether a used entry was written.
pub fn put_used(tracker: Option<&QueueInflight>, head: u16, add: impl FnOnce() -> u16) -> bool {
    let Some(t) = tracker else {
        add();
        return true;
    };
    if detaching() {
        return false;
    }
    t.pre_put(head);
    let next_used = add();
    t.post_put(head, next_used);
    true
}

#[cfg(test)]
#[path = "inflight_tests.rs"]
mod tests;

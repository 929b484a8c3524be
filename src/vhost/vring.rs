//! A split virtqueue as the frontend describes it (SET_VRING_*): what the
//! session gathers for a device's queue, whatever the device.

use std::fs::File;
use std::sync::Arc;

use super::dirty_log::DirtyLog;
use super::inflight::QueueInflight;
use super::published::Published;

/// Everything a queue needs to start, gathered by the vhost session.
pub(crate) struct QueueSetup {
    pub(crate) index: u16,
    pub(crate) size: u16,
    pub(crate) desc_table: u64,
    pub(crate) avail_ring: u64,
    pub(crate) used_ring: u64,
    pub(crate) next_avail: u16,
    pub(crate) event_idx: bool,
    pub(crate) indirect: bool,
    pub(crate) kick: Arc<File>,
    pub(crate) call: Arc<CallFd>,
    /// This queue's part of the inflight region (INFLIGHT_SHMFD).
    pub(crate) inflight: Option<QueueInflight>,
    /// The migration dirty log (marked only while VHOST_F_LOG_ALL is on).
    pub(crate) dirty_log: Arc<DirtyLog>,
}

/// Bytes of guest memory each part of a split virtqueue occupies.
pub(crate) struct RingSizes {
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
}

/// Ring sizes for a queue of `size` entries (at most 32768: no overflow).
pub(crate) fn ring_sizes(size: u16, event_idx: bool) -> RingSizes {
    let (n, event) = (size as u64, if event_idx { 2 } else { 0 });
    RingSizes {
        desc: 16 * n,
        // flags, idx, ring[n], used_event
        avail: 4 + 2 * n + event,
        // flags, idx, ring[n] of (id, len), avail_event
        used: 4 + 8 * n + event,
    }
}

/// The guest's interrupt eventfd. The frontend may replace it while the
/// queue runs (QEMU does when it reprograms MSI-X); the queue's iothread
/// keeps its own copy (see [`Published`]), so that a notification
/// executes no locked instruction.
pub(crate) type CallFd = Published<Option<Arc<File>>>;

//! The block graph: nodes (driver instances) joined by child edges, with a
//! BlockBackend as the root parent an export talks to, and drained sections
//! over them. Modelled on QEMU's BlockDriverState / BdrvChild /
//! BlockBackend and on the design of its drain (see docs/architecture.md,
//! "Drained sections and graph changes").

mod backend;
mod blockdev;
mod commit;
mod dirty;
mod drain;
mod in_flight;
pub mod job;
mod node;
mod open;
mod parent;
mod registry;
mod resize;
mod snapshot;

pub use backend::{BackendError, BlockBackend, DeviceOps, HeldRoot};
pub use blockdev::{
    blockdev_add, blockdev_add_waiting, blockdev_del, release_monitor_nodes, BlockdevError,
};
pub use commit::{start_commit, CommitOptions};
pub use drain::{drain_all_begin, drain_all_end, DrainError};
pub use in_flight::{kick_waiters, poll_while, InFlight, InFlightCounter};
pub use node::{Child, ChildRole, Node};
pub use open::{open_image, open_null, BackingPolicy, ImageFormat, ImageOptions};
pub use parent::Parent;
pub use registry::{all_backends, all_nodes, find_node};
pub use resize::{resize, ResizeError};
pub use snapshot::{transaction, Action, OverlayMode};

use std::sync::{Mutex, MutexGuard};

static GRAPH_LOCK: Mutex<()> = Mutex::new(());

/// Graph changes (QMP commands, a job finishing) run one at a time under
/// this lock, on the thread that took it. Iothreads never take it: they
/// are kept out by drained sections.
pub fn graph_lock() -> MutexGuard<'static, ()> {
    GRAPH_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod drain_tests;
#[cfg(test)]
mod snapshot_tests;

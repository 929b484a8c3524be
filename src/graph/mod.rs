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
pub(crate) mod job;
mod node;
mod open;
mod parent;
mod registry;
mod resize;
mod snapshot;
pub(crate) mod throttle;

pub use backend::BlockBackend;
pub(crate) use backend::{BackendError, DeviceOps, HeldRoot};
pub(crate) use commit::{start_commit, CommitOptions};
pub(crate) use in_flight::kick_waiters;
pub(crate) use job::Jobs;
pub(crate) use node::{ChildRole, Node};
pub(crate) use open::open_null;
pub use open::{open_image, BackingPolicy, ImageFormat, ImageOptions};
pub use registry::Graph;
pub(crate) use resize::{resize, ResizeError};
pub(crate) use snapshot::{Action, OverlayMode};

#[cfg(test)]
mod drain_tests;
#[cfg(test)]
mod snapshot_tests;

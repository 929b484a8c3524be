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

pub use backend::{BackendError, BlockBackend, DeviceOps, HeldRoot};
pub use commit::{start_commit, CommitOptions};
pub use drain::DrainError;
pub use in_flight::{kick_waiters, poll_while, InFlight, InFlightCounter};
pub use job::Jobs;
pub use node::{Child, ChildRole, Node};
pub use open::{open_image, open_null, BackingPolicy, ImageFormat, ImageOptions};
pub use parent::Parent;
pub use registry::Graph;
pub use resize::{resize, ResizeError};
pub use snapshot::{Action, OverlayMode};

#[cfg(test)]
mod drain_tests;
#[cfg(test)]
mod snapshot_tests;

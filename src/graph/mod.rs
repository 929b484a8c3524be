//! The block graph: nodes (driver instances) joined by child edges, with a
//! BlockBackend as the root parent an export talks to, and drained sections
//! over them. Modelled on QEMU's BlockDriverState / BdrvChild /
//! BlockBackend and on the design of its drain (see README, "How a request
//! flows").

mod backend;
mod blockdev;
mod drain;
mod in_flight;
mod node;
mod open;
mod parent;
mod registry;

pub use backend::{BackendError, BlockBackend, DeviceOps};
pub use blockdev::{blockdev_add, blockdev_del, release_monitor_nodes, BlockdevError};
pub use drain::{drain_all_begin, drain_all_end, DrainError};
pub use in_flight::{kick_waiters, poll_while, InFlight, InFlightCounter};
pub use node::{Child, ChildRole, Node};
pub use open::{open_image, open_null, BackingPolicy, ImageFormat, ImageOptions};
pub use parent::Parent;
pub use registry::{all_backends, all_nodes, find_node};

#[cfg(test)]
mod drain_tests;

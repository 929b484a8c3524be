//! The block graph: nodes (driver instances) joined by child edges, with a
//! BlockBackend as the root parent an export talks to. Modelled on QEMU's
//! BlockDriverState / BdrvChild / BlockBackend; see `shared/seeds/`.

mod backend;
mod node;
mod open;

pub use backend::{BackendError, BlockBackend};
pub use node::{Child, ChildRole, Node};
pub use open::{open_image, open_null, ImageFormat, ImageOptions};

//! The device side of vhost-user, serving a virtio-blk device.

pub mod blk;
pub mod dirty_log;
pub mod exports;
pub mod guest_fault;
pub mod memory;
pub(crate) mod message;
pub mod notify_fd;
pub(crate) mod published;
pub mod server;
pub mod session;
mod shared_map;
pub mod socket;

//! The device side of vhost-user. The protocol (messages, the session,
//! guest memory, the inflight region, the dirty log) talks to a device
//! through the [`device::Device`] trait; `blk` is the virtio-blk device.

pub mod blk;
pub(crate) mod device;
pub mod dirty_log;
pub mod exports;
pub mod guest_fault;
pub mod inflight;
pub mod memory;
pub(crate) mod message;
pub mod notify_fd;
pub(crate) mod published;
pub(crate) mod server;
pub(crate) mod session;
mod shared_map;
pub mod socket;
pub(crate) mod vring;

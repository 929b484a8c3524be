//! The device side of vhost-user. The protocol (messages, the session,
//! guest memory, the inflight region, the dirty log) talks to a device
//! through the [`device::Device`] trait; `blk` is the virtio-blk device.

mod acceptor;
pub(crate) mod blk;
pub(crate) mod device;
pub(crate) mod dirty_log;
pub(crate) mod exports;
pub mod handoff;
pub mod inflight;
pub(crate) mod memory;
pub(crate) mod message;
pub(crate) mod notify_fd;
pub(crate) mod published;
pub(crate) mod server;
pub(crate) mod session;
mod shared_map;
pub(crate) mod socket;
pub(crate) mod vring;

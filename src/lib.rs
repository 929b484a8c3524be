//! ringblk: a vhost-user-blk storage daemon on io_uring.
//!
//! Layers, each a module, imports pointing down only:
//! `control` and `vhost` use `graph`; `graph` uses `formats` through the
//! driver trait; `formats` use `uring`.

pub mod control;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod size;
pub mod uring;
pub mod vhost;

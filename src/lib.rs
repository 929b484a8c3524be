#![warn(unreachable_pub)]
//! ringblk: a vhost-user-blk storage daemon on io_uring.
//!
//! Layers, each a module, imports pointing down only: `daemon` (the
//! object the command line builds) uses all below; `control` (QMP) drives
//! `state` (the graph, iothreads and exports both command lines and QMP
//! act on); `state` uses `vhost`; `vhost` uses `graph`; `graph` uses
//! `formats` through the driver trait; `formats` use `uring`. `os`
//! (sockets, waits, rate-limited logs) and `error` (the one error type)
//! are used by all.

pub mod control;
pub mod daemon;
pub mod error;
pub mod formats;
/// Entry points for the fuzz targets (fuzz/) and the corpus replay test;
/// not part of the daemon (`--features fuzzing`).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
mod opts;
pub mod os;
pub mod size;
pub(crate) mod state;
pub mod uring;
pub mod vhost;

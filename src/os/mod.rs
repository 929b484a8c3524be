//! Operating-system plumbing that both the control server and the
//! vhost-user side use: listening sockets created safely at a path, waits
//! on file descriptors, and rate-limited logging. Nothing here knows about
//! block devices or QMP.

pub mod listen;
pub mod ratelimit;
pub mod wait;

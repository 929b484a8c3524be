//! Operating-system plumbing that both the control server and the
//! vhost-user side use: listening sockets created safely at a path, waits
//! on file descriptors, rate-limited logging, systemd's notification
//! socket, surviving SIGBUS in a shared file mapping someone shrank, and
//! declining transparent huge pages. Nothing here knows about block
//! devices or QMP.

pub mod activation;
pub mod huge_pages;
pub mod journal;
pub(crate) mod listen;
pub(crate) mod notify;
pub(crate) mod ratelimit;
pub(crate) mod sigbus;
pub(crate) mod wait;

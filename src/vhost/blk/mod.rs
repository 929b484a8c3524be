//! virtio-blk over vhost-user: chains, requests, queues, config space.
//!
//! # Memory a guest can make us hold
//!
//! Guest data moves between guest memory and the disk without copies, so
//! what a request costs is bookkeeping, plus a bounce chunk when O_DIRECT
//! will not take the guest's buffers. Per request in flight, with
//! `seg_max` from config space (at most 254, see `config::SEG_MAX_CAP`):
//!
//! ```text
//! kept descriptors  <= 2 × 16 B × (seg_max + 3)   (Vec slack included)
//! host iovec        <= 2 × 16 B × IOV_MAX         (request::to_iovec cap)
//! ring's iovec copy <=     16 B × IOV_MAX
//! M_req             <= 32·(seg_max + 3) + 48·IOV_MAX bytes   (56 KiB)
//! bounce            <= CHUNK (256 KiB) per request, BUDGET (4 MiB) per iothread
//! ```
//!
//! and a queue of N entries (the vring size the frontend set, <= 32768)
//! has at most N requests in flight:
//!
//! ```text
//! M_queue <= N × M_req + BUDGET on its iothread
//! ```
//!
//! With the defaults (queue size 256, one queue): 256 × 56 KiB + 4 MiB,
//! about 18 MiB at worst, whatever the guest puts in its rings. Chains
//! longer than `seg_max + 2` are walked (up to their table's size) but
//! not kept, and refused.

pub(crate) mod chain;
pub(crate) mod config;
pub(crate) mod export;
pub(crate) mod queue;
mod queue_tests;
pub(crate) mod request;
mod ring;
pub(crate) mod state;
pub(crate) mod stats;

//! virtio-blk over vhost-user: chains, requests, queues, config space.

pub mod chain;
pub mod config;
pub mod export;
pub mod queue;
mod queue_tests;
pub mod request;
pub mod state;
pub mod stats;

//! What the vhost-user protocol needs from a device. The session
//! (`session.rs`) and the listening server (`server.rs`) know a device only
//! through this trait, so the protocol code never imports a device; the
//! virtio-blk export (`blk::export::BlkExport`) is the one we have.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::memory::SharedMemory;
use super::vring::QueueSetup;
use crate::error::Error;

pub(crate) trait Device: Send + Sync {
    /// A queue while it runs.
    type Queue: RunningQueue;

    /// Names the device in logs (the export id).
    fn id(&self) -> &str;

    /// Queues the device has (GET_QUEUE_NUM; the session's vring count).
    fn num_queues(&self) -> u16;

    /// The virtio feature bits the device offers; the session adds the
    /// vhost-user ones (protocol features, dirty logging).
    fn features(&self) -> u64;

    /// The device's config space as the driver would read it now.
    fn config_space(&self) -> Vec<u8>;

    /// The driver wrote `data` at `offset` of the config space
    /// (SET_CONFIG); bounds were checked against the protocol's limit only.
    fn write_config(&self, offset: usize, data: &[u8]);

    /// The frontend's channel for our requests (SET_BACKEND_REQ_FD), or
    /// `None` once the frontend has gone.
    fn set_backend_channel(&self, channel: Option<UnixStream>);

    /// A frontend connected (true) or left (false).
    fn set_connected(&self, connected: bool);

    /// Signal queue `index`'s new call fd once, from the thread that runs
    /// the queue, never waiting on it.
    fn signal_call_once(&self, index: u16, call: Arc<File>);

    /// Start a queue on the rings in `setup`, reading guest memory through
    /// `memory`.
    fn start_queue(
        &self,
        setup: QueueSetup,
        memory: Arc<SharedMemory>,
    ) -> Result<Self::Queue, Error>;
}

/// A running queue, as the session controls it.
pub(crate) trait RunningQueue {
    /// (gpa, len) of the descriptor table, avail ring and used ring: guest
    /// memory the queue needs while it runs.
    fn ring_ranges(&self) -> [(u64, u64); 3];

    /// Stop popping, wait until the requests in flight completed, and
    /// return the next avail index (GET_VRING_BASE).
    fn stop_and_wait(&self) -> u16;
}

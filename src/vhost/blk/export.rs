//! A virtio-blk export: the BlockBackend plus what the device advertises and
//! the iothreads its queues run on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::config::{BlkGeometry, CONFIG_LEN};
use super::state::ExportState;
use crate::uring::IoThreadHandle;

pub struct BlkExport {
    pub id: String,
    pub geometry: BlkGeometry,
    pub state: Arc<ExportState>,
    /// Queue `i` runs on `iothreads[i % len]`.
    pub iothreads: Vec<IoThreadHandle>,
    /// The vhost-user socket frontends connect to.
    pub socket: PathBuf,
    /// A frontend is connected right now.
    pub connected: AtomicBool,
}

impl BlkExport {
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let capacity = self.state.backend.size();
        self.geometry
            .config_space(capacity, self.state.writeback.load(Ordering::Relaxed))
    }

    pub fn iothread_for(&self, queue: u16) -> &IoThreadHandle {
        &self.iothreads[queue as usize % self.iothreads.len()]
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }
}

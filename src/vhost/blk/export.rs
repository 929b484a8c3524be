//! A virtio-blk export: the BlockBackend plus what the device advertises and
//! the iothreads its queues run on.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::config::{BlkGeometry, CONFIG_LEN, CONFIG_WRITEBACK_OFFSET};
use super::queue::{self, QueueControl};
use super::state::ExportState;
use crate::error::Error;
use crate::uring::IoThreadHandle;
use crate::vhost::device::Device;
use crate::vhost::memory::SharedMemory;
use crate::vhost::vring::QueueSetup;

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

impl Device for BlkExport {
    type Queue = Arc<QueueControl>;

    fn id(&self) -> &str {
        &self.id
    }

    fn num_queues(&self) -> u16 {
        self.geometry.num_queues
    }

    fn features(&self) -> u64 {
        self.geometry.features()
    }

    fn config_space(&self) -> Vec<u8> {
        BlkExport::config_space(self).to_vec()
    }

    /// Only the write cache byte (`wce`) is writable; writes elsewhere are
    /// ignored, as the virtio spec lets a device do.
    fn write_config(&self, offset: usize, data: &[u8]) {
        let space = BlkExport::config_space(self);
        for (k, b) in data.iter().enumerate() {
            if offset + k == CONFIG_WRITEBACK_OFFSET {
                let wb = *b != 0;
                self.state.writeback.store(wb, Ordering::Relaxed);
                log::info!(
                    "export {}: guest set the write cache to {}",
                    self.id,
                    if wb { "writeback" } else { "writethrough" }
                );
            } else if space.get(offset + k).is_none_or(|old| old != b) {
                log::debug!(
                    "export {}: ignoring write to config byte {}",
                    self.id,
                    offset + k
                );
            }
        }
    }

    fn set_backend_channel(&self, channel: Option<UnixStream>) {
        self.state.set_backend_channel(channel);
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
    }

    fn signal_call_once(&self, index: u16, call: Arc<File>) {
        self.iothread_for(index)
            .run(move || queue::signal_once(call, index as usize));
    }

    fn start_queue(
        &self,
        setup: QueueSetup,
        memory: Arc<SharedMemory>,
    ) -> Result<Arc<QueueControl>, Error> {
        let thread = self.iothread_for(setup.index);
        queue::start(setup, memory, self.state.clone(), thread)
    }
}

//! What an export's queues share: the BlockBackend, the guest's settings,
//! counters, and the device side of drain and resize (the BlockBackend's
//! device ops).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::queue::QueueControl;
use super::request::Limits;
use super::stats::QueueStats;
use crate::graph::{kick_waiters, BlockBackend, DeviceOps};
use crate::uring::fence;
use crate::vhost::socket;

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: the device's config space changed.
const BACKEND_CONFIG_CHANGE_MSG: u32 =
    vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG as u32;

/// One queue's requests in flight. Only that queue's iothread writes it
/// (queue `i` always runs on the same iothread), so counting is a plain
/// load and store. The two points drain pairs with (the reservation a
/// queue takes before it looks at the drain flag, and the store of zero
/// before it looks for a waiting drain) each put the asymmetric fence's
/// light side between the store and the load; drain's `poll_while` runs
/// the heavy side.
/// On a cache line of its own: each queue's iothread writes its counter on
/// every request, and the queues' counters sit side by side in a Vec.
#[derive(Default)]
#[repr(align(128))]
pub struct QueueInFlight(AtomicU64);

impl QueueInFlight {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Counted before the queue looks at the drain flag: a drain either
    /// sees this or the queue sees the drain's flag.
    pub(super) fn reserve(&self) {
        self.add();
        fence::light();
    }

    pub(super) fn add(&self) {
        let n = self.0.load(Ordering::Relaxed);
        self.0.store(n + 1, Ordering::Relaxed);
    }

    pub(super) fn sub(&self) {
        let n = self.0.load(Ordering::Relaxed).saturating_sub(1);
        self.0.store(n, Ordering::Release);
        if n == 0 {
            fence::light();
            kick_waiters();
        }
    }
}

pub struct ExportState {
    pub id: String,
    pub backend: Arc<BlockBackend>,
    pub limits: Limits,
    /// The guest's write cache setting (CONFIG_WCE): false = write-through.
    pub writeback: AtomicBool,
    /// Longest chain accepted (direct or indirect).
    pub max_descs: usize,
    /// Per queue: requests popped and not yet completed, plus one while
    /// the queue is popping.
    pub queue_in_flight: Vec<QueueInFlight>,
    /// Inside a drained section: queues pop nothing (kicks stay pending).
    quiesced: AtomicBool,
    /// The running queues, to wake them when a drained section ends.
    running: Mutex<Vec<Weak<QueueControl>>>,
    /// Counters per queue index; they survive frontend reconnects.
    pub stats: Vec<QueueStats>,
    /// The backend-initiated channel of the current frontend, if it gave one.
    pub backend_channel: Mutex<Option<UnixStream>>,
}

impl ExportState {
    /// Create the state and register it as `backend`'s device.
    pub fn new(
        id: &str,
        backend: Arc<BlockBackend>,
        limits: Limits,
        max_descs: usize,
        num_queues: u16,
    ) -> Arc<Self> {
        let state = Arc::new(ExportState {
            id: id.to_string(),
            backend: backend.clone(),
            limits,
            writeback: AtomicBool::new(true),
            max_descs,
            queue_in_flight: (0..num_queues).map(|_| QueueInFlight::default()).collect(),
            quiesced: AtomicBool::new(backend.quiesce_counter() > 0),
            running: Mutex::new(Vec::new()),
            stats: (0..num_queues).map(|_| QueueStats::default()).collect(),
            backend_channel: Mutex::new(None),
        });
        // We stop popping when drained, so requests we already popped must
        // not be held back by the backend (they would never complete).
        backend.set_request_queuing(false);
        let ops: Weak<dyn DeviceOps> = Arc::downgrade(&state) as Weak<dyn DeviceOps>;
        backend.set_dev_ops(ops);
        state
    }

    /// Requests the guest submitted that we have not completed.
    pub fn in_flight(&self) -> u64 {
        self.queue_in_flight.iter().map(QueueInFlight::get).sum()
    }

    pub fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst)
    }

    pub(super) fn add_running(&self, q: &Arc<QueueControl>) {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|w| w.strong_count() > 0);
        r.push(Arc::downgrade(q));
    }

    /// Store the frontend's backend channel. It is made non-blocking: a
    /// frontend that stops reading it must not stall the control thread.
    pub fn set_backend_channel(&self, channel: Option<UnixStream>) {
        if let Some(Err(e)) = channel.as_ref().map(|c| c.set_nonblocking(true)) {
            log::warn!("export {}: backend channel: {e}", self.id);
        }

        *self
            .backend_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Tell the frontend the config space changed, if it gave us a channel.
    /// No reply is requested: the frontend answers by reading the config
    /// over the main socket, which must not wait on us.
    fn send_config_change(&self) {
        let guard = self
            .backend_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(ch) = guard.as_ref() else {
            log::info!(
                "export {}: no backend channel; the frontend sees the new size on its next GET_CONFIG",
                self.id
            );
            return;
        };
        match socket::send_message(ch, BACKEND_CONFIG_CHANGE_MSG, socket::FLAG_VERSION_1, &[]) {
            Ok(()) => log::info!("export {}: sent CONFIG_CHANGE_MSG to the frontend", self.id),
            Err(e) => log::warn!("export {}: cannot send CONFIG_CHANGE_MSG: {e}", self.id),
        }
    }
}

impl DeviceOps for ExportState {
    fn drained_begin(&self) {
        // SeqCst pairs with the queues' reservation in `in_flight`: a queue
        // either sees this flag or is counted by the drain's poll.
        self.quiesced.store(true, Ordering::SeqCst);
        log::debug!("export {}: quiesced", self.id);
    }

    fn drained_end(&self) {
        self.quiesced.store(false, Ordering::SeqCst);
        let running: Vec<_> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // Whatever the guest queued meanwhile is popped now.
        for q in running {
            q.wake();
        }
        log::debug!("export {}: resumed", self.id);
    }

    fn drained_poll(&self, parked: u64) -> bool {
        self.in_flight() > parked
    }

    fn resized(&self) {
        self.send_config_change();
    }
}

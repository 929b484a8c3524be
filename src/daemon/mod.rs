//! The daemon object: it owns the daemon's state (`state::DaemonState`:
//! the graph, the iothreads, the exports, each a BlockBackend, a virtio-blk
//! device and the thread serving its vhost-user socket) and the control
//! server, and shuts them down in one documented order. The command lines
//! build it (the simple `serve` form and QSD's options, `qsd`); `main.rs`
//! only parses arguments and waits for signals.

pub(crate) mod keyval;
pub mod metrics;
pub mod qsd;
pub mod serve;
mod systemd;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use self::metrics::{MetricsAddr, MetricsServer};
use crate::control::{ControlServer, Monitor};
use crate::error::Error;
use crate::graph::BackendError;
use crate::state::DaemonState;
pub use crate::vhost::exports::{ExportConfig, ExportListener, DEFAULT_SOCKET_MODE};

/// QMP clients connected at once unless told otherwise.
pub const DEFAULT_CONTROL_CLIENTS: usize = 16;

/// How long start-up waits for an image another process has locked
/// (`--lock-wait`): long enough for the kernel to finish the I/O of a
/// daemon that was just killed (milliseconds, or a few seconds on a slow
/// disk), short enough that a real conflict is reported promptly.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(5);

/// `--lock-wait SECONDS` (a decimal number, at most an hour).
pub fn parse_lock_wait(s: &str) -> Result<Duration, Error> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(Error::invalid(format!(
            "lock wait must be a number of seconds from 0 to 3600, not '{s}'"
        ))),
    }
}

/// What the command lines build: the daemon's state (graph, iothreads,
/// exports), the QMP socket over it, and systemd's notifications.
pub struct StorageDaemon {
    state: Arc<DaemonState>,
    control: Option<ControlServer>,
    metrics: Option<MetricsServer>,
    /// systemd's notification socket (and watchdog), once ready.
    systemd: Option<systemd::Systemd>,
}

impl Default for StorageDaemon {
    fn default() -> Self {
        StorageDaemon {
            state: DaemonState::new(),
            control: None,
            metrics: None,
            systemd: None,
        }
    }
}

impl StorageDaemon {
    /// The state both command lines and QMP drive.
    pub fn state(&self) -> &Arc<DaemonState> {
        &self.state
    }

    /// How many iothreads run.
    pub fn iothread_count(&self) -> usize {
        self.state.iothreads().len()
    }

    /// True once QMP `quit` asked for the shutdown under way.
    pub fn quit_requested(&self) -> bool {
        self.state.quit_requested()
    }

    /// Open the QMP control socket over the daemon's state; its `quit`
    /// raises SIGTERM, which the caller's signal loop carries out.
    pub fn start_control(&mut self, path: &Path, max_clients: usize) -> Result<(), Error> {
        let state = self.state.clone();
        let monitor = Monitor::new(self.state.clone(), move || state.request_quit());
        let server = ControlServer::start(path, monitor, max_clients)
            .map_err(|e| Error::from(e).context("control socket"))?;
        self.control = Some(server);
        Ok(())
    }

    /// Serve Prometheus metrics at `addr` (`--metrics`).
    pub fn start_metrics(&mut self, addr: &MetricsAddr) -> Result<(), Error> {
        self.metrics = Some(MetricsServer::start(addr, self.state.clone())?);
        Ok(())
    }

    /// Every export and the control socket accept connections: tell
    /// systemd, if it started us (`READY=1` with what is served), and start
    /// the watchdog pings it asked for.
    pub fn ready(&mut self) {
        for id in self.state.exports().drop_handed_over() {
            log::warn!(
                "export {id}: the previous daemon handed its session over, but this one has no \
                 such export; its connection closes"
            );
        }
        self.systemd = systemd::Systemd::ready(&self.state);
    }

    /// Shut down in this order: control clients are told and disconnected
    /// (their drained sections end) -> jobs are cancelled (their graph
    /// changes undone, their threads gone) -> exports stop accepting work, each
    /// frontend is disconnected once its in-flight requests completed ->
    /// drain_all -> every BlockBackend is flushed and its tree ejected ->
    /// our references go, so nodes close (qcow2 writes back its caches,
    /// files sync) -> nothing may be left open. `reason` is the SHUTDOWN
    /// event's.
    pub fn shutdown(mut self, reason: &str) -> Result<(), Error> {
        // SIGUSR1 under systemd: sessions go to its fd store (an upgrade
        // without a reconnect); without systemd, frontends reconnect.
        let handoff = self
            .systemd
            .as_ref()
            .filter(|_| crate::vhost::inflight::detaching())
            .map(|s| s.notifier());
        if let Some(s) = self.systemd.take() {
            s.stopping();
        }
        if let Some(c) = self.control.take() {
            c.shutdown(reason);
        }
        drop(self.metrics.take());
        let graph = self.state.graph();
        {
            let _g = graph.lock();
            graph.jobs().cancel_all();
        }
        // Throttled requests must not hold the shutdown up.
        self.state.release_throttles();
        let (backends, mut failed) = self.state.exports().stop_all(handoff);
        graph.drain_all_begin();
        let mut roots = Vec::new();
        let flusher = self.state.iothreads().into_iter().next();
        for b in &backends {
            // Every export has an iothread, so there is one to flush on.
            if let Some(t) = &flusher {
                let bb = b.clone();
                match t.block_on(move || async move { bb.flush().await }) {
                    Err(BackendError::Ejected { .. }) | Ok(()) => {}
                    Err(e) => failed.push(Error::io(format!("final flush failed: {e}"))),
                }
            }
            roots.extend(b.eject());
        }
        graph.drain_all_end();
        drop(roots);
        drop(backends);
        graph.release_monitor_nodes();
        self.state.stop_iothreads();
        let left: Vec<String> = graph
            .all_nodes()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        if !left.is_empty() {
            failed.push(Error::io(format!(
                "nodes still open after shutdown: {}",
                left.join(", ")
            )));
        }
        if failed.is_empty() {
            log::info!("shut down cleanly");
            Ok(())
        } else {
            let all: Vec<String> = failed.iter().map(Error::to_string).collect();
            Err(Error::io(all.join("; ")))
        }
    }
}

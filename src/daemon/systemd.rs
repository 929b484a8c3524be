//! Telling systemd how the daemon is doing (`Type=notify` units):
//! `READY=1` once every socket accepts connections, `STATUS=` saying what
//! is served (again whenever QMP adds or deletes an export), `STOPPING=1`
//! when shutdown begins, and `WATCHDOG=1` from a thread that first checks
//! that every iothread (those `object-add` started too) still turns its
//! loop, so a stuck iothread stops the pings and systemd restarts the
//! daemon.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::os::notify::{watchdog_interval, Notifier};
use crate::state::DaemonState;

pub(super) struct Systemd {
    notifier: std::sync::Arc<Notifier>,
    /// Dropping the sender stops the watchdog thread.
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Systemd {
    /// Send `READY=1` and `STATUS=status`, and start the watchdog if
    /// systemd asked for one. None when not started by systemd.
    pub(super) fn ready(state: &Arc<DaemonState>) -> Option<Systemd> {
        let notifier = match Notifier::from_env() {
            Ok(Some(n)) => std::sync::Arc::new(n),
            Ok(None) => return None,
            Err(e) => {
                log::warn!("NOTIFY_SOCKET cannot be used: {e}; systemd will not hear from us");
                return None;
            }
        };
        // From here on, exports QMP adds or deletes update STATUS=.
        state.announce_to(notifier.clone());
        if let Err(e) = notifier.send(&format!("READY=1\nSTATUS={}", state.status_line())) {
            log::warn!("telling systemd we are ready: {e}");
        }
        let state = Arc::downgrade(state);
        let watchdog = watchdog_interval().and_then(|interval| {
            let (stop, stopped) = mpsc::channel();
            let n = notifier.clone();
            let spawned = std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || watchdog(&n, interval / 2, &state, &stopped));
            match spawned {
                Ok(join) => Some((stop, join)),
                Err(e) => {
                    log::error!("cannot start the watchdog thread: {e}");
                    None
                }
            }
        });
        Some(Systemd { notifier, watchdog })
    }

    /// Where sessions are handed over on an upgrade.
    pub(super) fn notifier(&self) -> std::sync::Arc<Notifier> {
        self.notifier.clone()
    }

    /// Shutdown begins: `STOPPING=1`, and no more watchdog pings.
    pub(super) fn stopping(self) {
        if let Err(e) = self.notifier.send("STOPPING=1") {
            log::warn!("telling systemd we are stopping: {e}");
        }
        if let Some((stop, join)) = self.watchdog {
            drop(stop);
            let _ = join.join();
        }
    }
}

/// Every `period` (half systemd's interval), ping if each iothread the
/// daemon has now runs a posted closure within half a period; otherwise
/// name the stuck ones and let systemd's timer run out.
fn watchdog(n: &Notifier, period: Duration, state: &Weak<DaemonState>, stop: &mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(period) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(iothreads) = state.upgrade().map(|s| s.iothreads()) else {
            return;
        };
        let stuck: Vec<&str> = iothreads
            .iter()
            .filter(|t| !t.responds_within(period / 2))
            .map(|t| t.name())
            .collect();
        if stuck.is_empty() {
            if let Err(e) = n.send("WATCHDOG=1") {
                log::warn!("watchdog ping: {e}");
            }
        } else {
            log::error!(
                "iothread(s) {} did not respond within {:?}; withholding the watchdog ping",
                stuck.join(", "),
                period / 2
            );
        }
    }
}

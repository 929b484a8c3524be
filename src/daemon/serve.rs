//! ringblk's own command line (`ringblk serve`): one image (or a null
//! disk), one export with its queues spread over iothreads, and a QMP
//! socket if asked for. It builds the same `StorageDaemon` the QSD form
//! builds (`qsd.rs`); `main.rs` only turns arguments into [`ServeOptions`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ExportConfig, ExportListener, StorageDaemon};
use crate::error::Error;
use crate::graph::{open_image, open_null, BlockBackend, ImageOptions};
use crate::vhost::handoff::HandedOver;

/// What the export serves.
pub enum Root {
    /// A null disk of this many bytes.
    Null(u64),
    Image(ImageOptions),
}

pub struct ServeOptions {
    pub root: Root,
    /// The export's socket: a path, or a socket systemd passed.
    pub listener: ExportListener,
    pub socket_mode: u32,
    pub id: String,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub serial: String,
    /// Iothreads; None: the default of [`default_iothreads`].
    pub iothreads: Option<u16>,
    pub poll_max: Duration,
    /// The QMP socket, and how many clients it takes at once.
    pub control: Option<(PathBuf, usize)>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<super::metrics::MetricsAddr>,
    /// Sessions the previous daemon handed over through systemd.
    pub handed_over: HandedOver,
}

/// One iothread per queue, but at most one fewer than the CPUs we may use
/// (at least one): on a small machine a second busy iothread only takes
/// turns with the first and with the guest.
pub fn default_iothreads() -> u16 {
    let spare = std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1));
    u16::try_from(spare.max(1)).unwrap_or(u16::MAX)
}

/// The daemon `o` describes, serving; and its export's BlockBackend.
/// Queue k runs on iothread k mod n. On failure, what was built is shut
/// down again.
pub fn build(mut o: ServeOptions) -> Result<(StorageDaemon, Arc<BlockBackend>), Error> {
    let mut daemon = StorageDaemon::default();
    let handed_over = std::mem::take(&mut o.handed_over);
    daemon.state().exports().set_handed_over(handed_over);
    match populate(&mut daemon, o) {
        Ok(backend) => Ok((daemon, backend)),
        Err(e) => {
            if let Err(close) = daemon.shutdown("host-error") {
                log::error!("{close}");
            }
            Err(e)
        }
    }
}

fn populate(daemon: &mut StorageDaemon, o: ServeOptions) -> Result<Arc<BlockBackend>, Error> {
    let root = match &o.root {
        Root::Null(size) => {
            if size % o.logical_block_size as u64 != 0 {
                return Err(Error::invalid(format!(
                    "--null size must be a multiple of {}",
                    o.logical_block_size
                )));
            }
            open_null(daemon.state().graph(), *size)
        }
        Root::Image(opts) => open_image(daemon.state().graph(), opts)?,
    };
    let n = o
        .iothreads
        .unwrap_or_else(default_iothreads)
        .min(o.num_queues);
    let mut iothreads = Vec::new();
    for i in 0..n {
        iothreads.push(
            daemon
                .state()
                .add_iothread(&format!("iothread{i}"), o.poll_max)?,
        );
    }
    let what = match &o.root {
        Root::Null(_) => "null disk".to_string(),
        Root::Image(opts) => opts.path.display().to_string(),
    };
    let backend = daemon
        .state()
        .add_export(
            ExportConfig {
                id: o.id,
                root,
                read_only: o.read_only,
                num_queues: o.num_queues,
                queue_size: o.queue_size,
                logical_block_size: o.logical_block_size,
                serial: o.serial,
                listener: o.listener,
                socket_mode: o.socket_mode,
            },
            iothreads,
        )
        .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
    if let Some((path, clients)) = &o.control {
        daemon.start_control(path, *clients)?;
    }
    if let Some(addr) = &o.metrics {
        daemon.start_metrics(addr)?;
    }
    Ok(backend)
}

//! The running exports: each a BlockBackend over a node, a virtio-blk
//! device, and the thread serving its vhost-user socket. Exports are added
//! from the command line and by QMP `block-export-add`, and removed by
//! `block-export-del` and at shutdown.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde_json::{Map, Value};
use vmm_sys_util::eventfd::EventFd;

use super::acceptor::{Acceptor, Token};
use super::blk::config::{seg_max_for, BlkGeometry, SIZE_MAX};
use super::blk::export::BlkExport;
use super::blk::request::{Limits, VIRTIO_BLK_ID_BYTES};
use super::blk::state::ExportState;
use super::handoff::HandedOver;
use super::server::VhostServer;
use crate::error::Error;
use crate::graph::{BlockBackend, Graph, Node};
use crate::opts::Opts;
use crate::os::notify::Notifier;
use crate::uring::IoThreadHandle;

/// Largest discard / write-zeroes request we advertise, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Permission bits of a vhost-user socket unless told otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Virtqueue size the device is set up for when nobody says (seg_max
/// follows from it; the frontend picks the real size).
const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The serial (GET_ID) of exports from `--export` and `block-export-add`:
/// qemu-storage-daemon's, so guests see the same disk either way.
const QSD_SERIAL: &str = "vhost_user_blk";

/// Where an export's frontends connect.
pub enum ExportListener {
    /// A socket ringblk creates at this path.
    Path(PathBuf),
    /// A listening socket the caller created, passed as this fd.
    Fd(RawFd),
}

impl ExportListener {
    pub fn describe(&self) -> String {
        match self {
            ExportListener::Path(p) => std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            ExportListener::Fd(fd) => format!("fd {fd}"),
        }
    }
}

/// What an export serves and how the device looks to the guest.
pub struct ExportConfig {
    pub id: String,
    pub root: Arc<Node>,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    /// Up to 20 bytes.
    pub serial: String,
    pub listener: ExportListener,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
}

/// QEMU's BlockExportOptions for `type=vhost-user-blk`, read from
/// `--export` or `block-export-add`; `iothreads` are still names.
pub struct ExportOptions {
    pub config: ExportConfig,
    pub iothreads: Vec<String>,
}

impl ExportOptions {
    /// Options naming a node of `graph`.
    pub fn parse(graph: &Graph, map: Map<String, Value>) -> Result<ExportOptions, Error> {
        let mut o = Opts::new(map);
        let kind = o.required_string("type")?;
        if kind != "vhost-user-blk" {
            return Err(Error::unsupported(format!(
                "export type '{kind}' is not supported (only vhost-user-blk)"
            )));
        }
        let id = o.required_string("id")?;
        let node_name = o.required_string("node-name")?;
        let root = graph.find_node(&node_name).ok_or_else(|| {
            Error::not_found(format!("Cannot find device='' nor node-name='{node_name}'"))
        })?;
        let writable = o.bool("writable", false)?;
        o.bool("writethrough", false)?;
        let n = o.size("num-queues")?.unwrap_or(1);
        let num_queues = u16::try_from(n)
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| Error::invalid(format!("num-queues must be from 1 to 64, not {n}")))?;
        let logical_block_size = match o.size("logical-block-size")?.unwrap_or(512) {
            n @ (512 | 4096) => n as u32,
            n => {
                return Err(Error::invalid(format!(
                    "logical-block-size must be 512 or 4096, not {n}"
                )))
            }
        };
        let mistyped = || Error::invalid("Invalid parameter type for 'iothread', expected: string");
        let iothreads = match o.take("iothread") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(mistyped()),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(mistyped()),
        };
        o.bool("fixed-iothread", false)?;
        let mut addr = o.nested("addr")?;
        let listener = match addr.required_string("type")?.as_str() {
            "unix" => ExportListener::Path(PathBuf::from(addr.required_string("path")?)),
            "fd" => {
                let s = addr.required_string("str")?;
                let fd = s.parse::<RawFd>().map_err(|_| {
                    Error::invalid(format!("addr.str: '{s}' is not a file descriptor number"))
                })?;
                ExportListener::Fd(fd)
            }
            other => {
                return Err(Error::unsupported(format!(
                    "addr.type '{other}' is not supported (unix or fd)"
                )))
            }
        };
        addr.finish()?;
        o.finish()?;
        Ok(ExportOptions {
            config: ExportConfig {
                id,
                root,
                read_only: !writable,
                num_queues,
                queue_size: DEFAULT_QUEUE_SIZE,
                logical_block_size,
                serial: QSD_SERIAL.to_string(),
                listener,
                socket_mode: DEFAULT_SOCKET_MODE,
            },
            iothreads,
        })
    }
}

struct RunningExport {
    export: Arc<BlkExport>,
    backend: Arc<BlockBackend>,
    stopper: EventFd,
    /// Set before stopping to hand the session over (an upgrade).
    handoff: Arc<OnceLock<Arc<Notifier>>>,
    /// Its listening socket in the acceptor's set.
    token: Token,
}

impl RunningExport {
    /// Stop accepting frontends, let the connected one's in-flight requests
    /// complete, disconnect it, and let go of the node.
    fn stop(self, acceptor: &Acceptor) -> Result<Arc<BlockBackend>, Error> {
        let _ = self.stopper.write(1);
        if let Some(session) = acceptor.remove(self.token) {
            let id = &self.export.id;
            session
                .join()
                .map_err(|_| Error::io(format!("export {id}: its vhost thread panicked")))?;
        }
        Ok(self.backend)
    }
}

/// Every running export.
#[derive(Default)]
pub struct ExportTable {
    exports: Mutex<Vec<RunningExport>>,
    /// Sessions the previous daemon handed over, until their exports
    /// start (see handoff.rs).
    handed_over: Mutex<HandedOver>,
    /// Takes new frontends for every export (started with the first).
    acceptor: OnceLock<Acceptor>,
}

impl ExportTable {
    fn lock(&self) -> MutexGuard<'_, Vec<RunningExport>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acceptor(&self) -> io::Result<&Acceptor> {
        if let Some(a) = self.acceptor.get() {
            return Ok(a);
        }
        let started = Acceptor::start()?;
        // Exports are added one at a time (under the graph lock); should
        // two race, the loser's acceptor just ends.
        Ok(self.acceptor.get_or_init(|| started))
    }

    /// Start serving `cfg`; queue k runs on `iothreads[k mod n]`.
    pub fn add(
        &self,
        cfg: ExportConfig,
        iothreads: Vec<IoThreadHandle>,
    ) -> Result<Arc<BlockBackend>, Error> {
        let id = cfg.id.clone();
        if self.lock().iter().any(|e| e.export.id == id) {
            return Err(Error::busy(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        if cfg.serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(Error::invalid(format!(
                "export {id}: serial '{}' is longer than {VIRTIO_BLK_ID_BYTES} bytes",
                cfg.serial
            )));
        }
        if iothreads.is_empty() {
            return Err(Error::invalid(format!("export {id}: no iothread")));
        }
        let backend = BlockBackend::new(&id, cfg.root, cfg.read_only);
        let bs = cfg.logical_block_size as u64;
        if backend.size() < bs {
            backend.eject();
            return Err(Error::invalid(format!(
                "export {id}: the disk is smaller than one {bs}-byte block"
            )));
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        serial[..cfg.serial.len()].copy_from_slice(cfg.serial.as_bytes());
        let geometry = BlkGeometry {
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            read_only: cfg.read_only,
            limits: Limits {
                block_size: cfg.logical_block_size,
                size_max: SIZE_MAX,
                seg_max: seg_max_for(cfg.queue_size),
                max_discard_sectors: MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
                max_segments: 1,
                serial,
            },
        };
        let state = ExportState::new(
            &id,
            backend.clone(),
            geometry.limits.clone(),
            geometry.seg_max() as usize + 2,
            cfg.num_queues,
        );
        let export = Arc::new(BlkExport {
            id: id.clone(),
            geometry,
            state,
            iothreads,
            socket: PathBuf::from(cfg.listener.describe()),
            connected: AtomicBool::new(false),
        });
        let server = match &cfg.listener {
            ExportListener::Path(p) => VhostServer::bind(p, cfg.socket_mode, export.clone()),
            ExportListener::Fd(fd) => VhostServer::from_fd(*fd, export.clone()),
        };
        let restored = match self.handed_over().take(&id) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                // Its descriptors close: the frontend reconnects.
                log::error!("{e}; closing its connection");
                None
            }
            None => None,
        };
        let started = server.and_then(|server| {
            let stopper = server.stopper()?;
            let handoff = server.handoff();
            let server = Arc::new(server);
            let first = restored.map(|r| {
                let server = server.clone();
                Box::new(move || server.serve_restored(r)) as Box<dyn FnOnce() + Send>
            });
            let token = self.acceptor()?.add(server, first)?;
            Ok((stopper, handoff, token))
        });
        let (stopper, handoff, token) = match started {
            Ok(s) => s,
            Err(e) => {
                backend.eject();
                return Err(Error::from(e).context(format!("export {id}")));
            }
        };
        self.lock().push(RunningExport {
            export,
            backend: backend.clone(),
            stopper,
            handoff,
            token,
        });
        Ok(backend)
    }

    /// The exports, in the order they were added.
    pub fn list(&self) -> Vec<Arc<BlkExport>> {
        self.lock().iter().map(|e| e.export.clone()).collect()
    }

    pub fn find(&self, id: &str) -> Option<Arc<BlkExport>> {
        self.lock()
            .iter()
            .find(|e| e.export.id == id)
            .map(|e| e.export.clone())
    }

    /// `block-export-del`: stop export `id` (its frontend is disconnected
    /// once its in-flight requests completed) and return its BlockBackend,
    /// still attached, for the caller to eject. Unless `hard`, an export
    /// with a frontend connected is refused.
    pub fn remove(&self, id: &str, hard: bool) -> Result<Arc<BlockBackend>, Error> {
        let running = {
            let mut all = self.lock();
            let i = all
                .iter()
                .position(|e| e.export.id == id)
                .ok_or_else(|| Error::not_found(format!("Export '{id}' is not found")))?;
            if !hard && all[i].export.is_connected() {
                return Err(Error::busy(format!("export '{id}' is in use")));
            }
            all.remove(i)
        };
        // Outside the table's lock: stopping waits for the frontend's
        // requests, and queries must not wait meanwhile.
        match self.acceptor.get() {
            Some(a) => running.stop(a),
            None => Ok(running.backend),
        }
    }

    fn handed_over(&self) -> MutexGuard<'_, HandedOver> {
        self.handed_over.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions the previous daemon handed over (systemd passed them):
    /// each goes to the export of its id when that export starts.
    pub fn set_handed_over(&self, sessions: HandedOver) {
        *self.handed_over() = sessions;
    }

    /// Handed-over sessions no export took (the new command line lacks
    /// their exports): their connections close. Returns their ids.
    pub fn drop_handed_over(&self) -> Vec<String> {
        self.handed_over().leftovers()
    }

    /// Stop every export (shutdown): all stop accepting at once, then each
    /// finishes; their BlockBackends, still attached, are returned. With
    /// `handoff` (an upgrade under systemd), connected sessions go to
    /// systemd's fd store for the next daemon instead of being closed.
    pub(crate) fn stop_all(
        &self,
        handoff: Option<Arc<Notifier>>,
    ) -> (Vec<Arc<BlockBackend>>, Vec<Error>) {
        let all = std::mem::take(&mut *self.lock());
        for e in &all {
            if let Some(n) = &handoff {
                let _ = e.handoff.set(n.clone());
            }
            let _ = e.stopper.write(1);
        }
        let (mut backends, mut failed) = (Vec::new(), Vec::new());
        let Some(acceptor) = self.acceptor.get() else {
            return (all.into_iter().map(|e| e.backend).collect(), Vec::new());
        };
        for e in all {
            match e.stop(acceptor) {
                Ok(b) => backends.push(b),
                Err(err) => failed.push(err),
            }
        }
        (backends, failed)
    }
}

//! One frontend connection: the vhost-user message state machine.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserInflight, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringState,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

use super::device::{Device, RunningQueue};
use super::dirty_log::{DirtyLog, LogMap};
use super::handoff::{self, FdTable, InflightState, Restored, SessionState, VringState};
use super::inflight::{self, InflightMap};
use super::memory::{new_shared_memory, MemoryMap, SharedMemory};
use super::message::{self, Request};
use super::notify_fd;
use super::socket::{self, FrameError, Message};
use super::vring::{ring_sizes, CallFd, QueueSetup};
use crate::error::Error;
use crate::os::notify::Notifier;
use crate::os::ratelimit::LogLimiter;
use crate::os::wait;

/// Memory slots we accept with ADD_MEM_REG.
const MAX_MEM_SLOTS: u64 = 509;
/// How long the rest of a started frame may take to arrive, and a reply
/// to be taken: a frontend that stalls mid-frame, or stops reading our
/// replies, is disconnected instead of holding the export forever. The
/// daemon's shutdown does not wait for it: it abandons the frame at once.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// VHOST_F_LOG_ALL: the driver turns it on for a migration's duration.
const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

struct Vring<Q> {
    size: u16,
    base: u16,
    /// desc, used, avail in frontend virtual addresses.
    addr: Option<(u64, u64, u64)>,
    kick: Option<Arc<File>>,
    call: Arc<CallFd>,
    enabled: bool,
    running: Option<Q>,
}

impl<Q> Default for Vring<Q> {
    fn default() -> Self {
        Vring {
            size: 0,
            base: 0,
            addr: None,
            kick: None,
            call: Arc::default(),
            enabled: false,
            running: None,
        }
    }
}

enum Reply {
    /// No payload; an ack is sent if the frontend asked for one.
    Ack,
    Payload(Vec<u8>),
    /// A payload and a file descriptor passed with it.
    PayloadFd(Vec<u8>, OwnedFd),
}

type HandlerResult = Result<Reply, Error>;

pub(crate) struct Session<'a, D: Device> {
    device: &'a D,
    stream: &'a UnixStream,
    features: u64,
    /// SET_FEATURES was received (queues may start).
    features_set: bool,
    protocol: u64,
    memory: MemoryMap,
    shared_mem: Arc<SharedMemory>,
    vrings: Vec<Vring<D::Queue>>,
    log: LogLimiter,
    /// Signalled when the daemon shuts down (set by `run`).
    stop_fd: RawFd,
    /// Signalled by the SIGBUS handler when the frontend shrank a memory
    /// file under us (see os::sigbus).
    poison_fd: Arc<OwnedFd>,
    /// The inflight tracking region (GET_ or SET_INFLIGHT_FD), if any.
    inflight: Option<Arc<InflightMap>>,
    /// The migration dirty log (SET_LOG_BASE) and whether it is on.
    dirty_log: Arc<DirtyLog>,
    /// Copies kept for an upgrade's hand-over (see handoff.rs): the
    /// inflight region's fd with how it is laid out, the backend channel.
    inflight_fd: Option<(OwnedFd, InflightState)>,
    backend_fd: Option<OwnedFd>,
}

impl<'a, D: Device> Session<'a, D> {
    pub(crate) fn new(device: &'a D, stream: &'a UnixStream) -> std::io::Result<Self> {
        let n = device.num_queues() as usize;
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let poison_fd = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        Ok(Session {
            device,
            stream,
            features: 0,
            features_set: false,
            protocol: 0,
            memory: MemoryMap::empty_with_poison_fd(poison_fd.clone()),
            shared_mem: new_shared_memory(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
            log: LogLimiter::default(),
            stop_fd: -1,
            poison_fd,
            inflight: None,
            dirty_log: DirtyLog::new(n),
            inflight_fd: None,
            backend_fd: None,
        })
    }

    /// Serve messages until the frontend leaves or `stop_fd` is signalled;
    /// stopped with a notifier in `handoff`, hand the session to the next
    /// daemon through systemd's fd store instead of disconnecting.
    pub(crate) fn run(&mut self, stop_fd: i32, handoff: &OnceLock<Arc<Notifier>>) {
        self.stop_fd = stop_fd;
        loop {
            let alarm = self.poison_fd.as_raw_fd();
            match wait::wait_for_or_alarm(self.stream.as_raw_fd(), stop_fd, alarm) {
                Ok(Some(wait::Wake::Ready)) => {}
                Ok(None) => {
                    log::error!(
                        "export {}: the frontend shrank its guest memory under us (the \
                         accesses past its end read zeros); disconnecting it",
                        self.device.id()
                    );
                    break;
                }
                Ok(Some(wait::Wake::Stop)) => {
                    let id = self.device.id();
                    match handoff.get().map(|n| self.hand_off(n)) {
                        Some(Ok(())) => {
                            log::info!("export {id}: session handed to the next daemon");
                        }
                        Some(Err(e)) => {
                            log::error!("export {id}: {e}; the frontend will have to reconnect")
                        }
                        None => log::info!("export {id}: disconnecting the frontend (shutdown)"),
                    }
                    break;
                }
                Err(e) => {
                    log::error!("export {}: poll failed: {e}", self.device.id());
                    break;
                }
            }
            // The bound starts with the frame: idle time between frames is
            // the frontend's to take.
            match socket::recv_message(self.stream, self.bound()) {
                Ok(msg) => {
                    if let Err(e) = self.dispatch(msg) {
                        log::error!("export {}: {e}; closing the connection", self.device.id());
                        break;
                    }
                }
                Err(FrameError::Closed) => {
                    log::info!("export {}: frontend disconnected", self.device.id());
                    break;
                }
                Err(e) => {
                    log::error!("export {}: {e}; closing the connection", self.device.id());
                    break;
                }
            }
        }
        self.reset();
    }

    /// How long from now a frame or reply may take.
    fn bound(&self) -> socket::Bound {
        socket::Bound {
            deadline: Instant::now() + STALL_TIMEOUT,
            stop_fd: self.stop_fd,
        }
    }

    /// Stop every queue (their requests finish) and forget the frontend's state.
    fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_vring(i);
        }
        self.vrings = (0..self.vrings.len()).map(|_| Vring::default()).collect();
        self.features = 0;
        self.features_set = false;
        self.protocol = 0;
        self.inflight = None;
        self.inflight_fd = None;
        self.backend_fd = None;
        // After the queues stopped: nothing marks the log any more.
        self.dirty_log.clear();
    }

    /// Decode and handle one message. Errors that break the protocol (a
    /// request that needs a payload reply failed) close the connection.
    fn dispatch(&mut self, mut msg: Message) -> Result<(), Error> {
        let code = msg.header.request;
        let decoded = message::decode(&msg.header, &msg.payload, msg.fds.len(), self.vrings.len());
        let name = FrontendReq::try_from(code)
            .map_or_else(|_| format!("request {code}"), |r| format!("{r:?}"));
        let result = match decoded {
            Ok(req) => self.handle(req, &mut msg),
            Err(e) => Err(Error::invalid(e.to_string())),
        };
        // Unused fds (refused messages) are closed when `msg` drops.
        let sent = match result {
            Ok(Reply::Payload(p)) => socket::send_reply(self.stream, code, &p, self.bound()),
            Ok(Reply::PayloadFd(p, fd)) => {
                socket::send_reply_with_fds(self.stream, code, &p, &[fd.as_raw_fd()], self.bound())
            }
            Ok(Reply::Ack) => self.ack(&msg, 0),
            Err(e) => {
                if self.log.allow("refused message") {
                    log::error!("export {}: {name}: {e}", self.device.id());
                }
                if FrontendReq::try_from(code) == Ok(FrontendReq::GET_CONFIG) {
                    // A config header with size 0 tells the frontend the read failed.
                    socket::send_reply(
                        self.stream,
                        code,
                        VhostUserConfig::default().as_slice(),
                        self.bound(),
                    )
                } else if message::has_payload_reply(code) {
                    return Err(Error::invalid(format!("{name} refused ({e})")));
                } else if FrontendReq::try_from(code) == Ok(FrontendReq::SET_LOG_BASE)
                    && self.log_shmfd()
                {
                    // The frontend waits for a reply that carries no status:
                    // any reply would tell it its log is in place, and a
                    // migration would then silently miss our writes.
                    return Err(Error::invalid(format!("{name} refused ({e})")));
                } else {
                    self.ack(&msg, 1)
                }
            }
        };
        sent.map_err(|e| Error::invalid(format!("{name}: cannot reply: {e}")))
    }

    /// Acknowledge a request if the frontend asked for it (REPLY_ACK).
    fn ack(&self, msg: &Message, status: u64) -> Result<(), FrameError> {
        if msg.need_reply() && self.reply_ack() {
            socket::send_reply(
                self.stream,
                msg.header.request,
                VhostUserU64::new(status).as_slice(),
                self.bound(),
            )
        } else {
            Ok(())
        }
    }

    fn reply_ack(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn log_shmfd(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::LOG_SHMFD.bits() != 0
    }

    fn protocol_features_acked(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn any_running(&self) -> bool {
        self.vrings.iter().any(|v| v.running.is_some())
    }

    /// Ring setup may change only while the ring is stopped.
    fn stopped(&mut self, i: usize) -> Result<&mut Vring<D::Queue>, Error> {
        if self.vrings[i].running.is_some() {
            return Err(Error::invalid(format!(
                "vring {i} is running; stop it first"
            )));
        }
        Ok(&mut self.vrings[i])
    }

    fn handle(&mut self, req: Request, msg: &mut Message) -> HandlerResult {
        let features =
            self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | LOG_ALL;
        match req {
            Request::GetFeatures => Ok(u64_reply(features)),
            Request::SetFeatures(f) => {
                if f & !features != 0 {
                    return Err(Error::invalid(format!(
                        "frontend acked features we do not offer: {:#x}",
                        f & !features
                    )));
                }
                // VHOST_F_LOG_ALL alone flips while the queues run: that
                // is how a migration starts and ends.
                if self.features_set && (f ^ self.features) & !LOG_ALL != 0 && self.any_running() {
                    return Err(Error::invalid("features changed while queues run"));
                }
                let logging = f & LOG_ALL != 0;
                if logging != (self.features & LOG_ALL != 0) {
                    log::info!(
                        "export {}: dirty logging {} (migration {})",
                        self.device.id(),
                        if logging { "on" } else { "off" },
                        if logging { "starts" } else { "ended" },
                    );
                }
                self.dirty_log
                    .set_active(logging && !super::dirty_log::marking_disabled());
                self.features = f;
                self.features_set = true;
                Ok(Reply::Ack)
            }
            Request::GetProtocolFeatures => Ok(u64_reply(protocol_features().bits())),
            Request::SetProtocolFeatures(f) => {
                let offered = protocol_features().bits();
                if f & !offered != 0 {
                    return Err(Error::invalid(format!(
                        "frontend acked protocol features we do not offer: {:#x}",
                        f & !offered
                    )));
                }
                self.protocol = f;
                Ok(Reply::Ack)
            }
            Request::SetOwner => Ok(Reply::Ack),
            Request::ResetDevice => {
                self.reset();
                Ok(Reply::Ack)
            }
            Request::GetQueueNum => Ok(u64_reply(self.vrings.len() as u64)),
            Request::GetMaxMemSlots => Ok(u64_reply(MAX_MEM_SLOTS)),
            Request::SetMemTable(regions) => {
                let table = regions
                    .into_iter()
                    .zip(std::mem::take(&mut msg.fds))
                    .collect();
                let map = self
                    .memory
                    .replaced_by(table)
                    .map_err(|e| Error::invalid(e.to_string()))?;
                self.publish(map)
            }
            Request::AddMemReg(r) => {
                if self.memory.num_regions() as u64 >= MAX_MEM_SLOTS {
                    return Err(Error::invalid(format!(
                        "all {MAX_MEM_SLOTS} memory slots are in use"
                    )));
                }
                let fd = take_fd(msg)?;
                let map = self
                    .memory
                    .with_region(&r, fd)
                    .map_err(|e| Error::invalid(e.to_string()))?;
                self.publish(map)
            }
            Request::RemMemReg(r) => {
                let map = self
                    .memory
                    .without_region(&r)
                    .map_err(|e| Error::invalid(e.to_string()))?;
                self.publish(map)
            }
            Request::SetVringNum { index, num } => {
                self.stopped(index)?.size = num;
                Ok(Reply::Ack)
            }
            Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
                used_log,
            } => {
                // QEMU resends a running ring's addresses to turn used-ring
                // logging on or off: only the log address may change then.
                if self.vrings[index].running.is_some()
                    && self.vrings[index].addr == Some((desc, used, avail))
                {
                    self.dirty_log.set_used_log(index, used_log);
                    return Ok(Reply::Ack);
                }
                if self.memory.num_regions() == 0 {
                    return Err(Error::invalid(format!(
                        "vring {index}: address set before any memory"
                    )));
                }
                let rings = [
                    ("descriptor table", desc),
                    ("avail ring", avail),
                    ("used ring", used),
                ];
                for (what, va) in rings {
                    if self.memory.va_range_to_gpa(va, 1).is_none() {
                        return Err(Error::invalid(format!(
                            "vring {index}: {what} address {va:#x} is not in any memory region"
                        )));
                    }
                }
                self.stopped(index)?.addr = Some((desc, used, avail));
                self.dirty_log.set_used_log(index, used_log);
                Ok(Reply::Ack)
            }
            Request::SetVringBase { index, base } => {
                self.stopped(index)?.base = base;
                Ok(Reply::Ack)
            }
            Request::GetVringBase { index } => {
                // A ring that never started reports the base it was given.
                self.stop_vring(index);
                self.vrings[index].kick = None;
                let base = self.vrings[index].base as u32;
                Ok(Reply::Payload(
                    VhostUserVringState::new(index as u32, base)
                        .as_slice()
                        .to_vec(),
                ))
            }
            Request::SetVringKick { index, has_fd } => {
                if !has_fd {
                    return Err(Error::invalid(format!(
                        "vring {index}: polling mode without a kick fd is not supported"
                    )));
                }
                if !self.features_set {
                    return Err(Error::invalid(format!(
                        "vring {index}: kick fd before SET_FEATURES"
                    )));
                }
                let kick = notify_fd::accept(take_fd(msg)?, index, "kick")?;
                self.stop_vring(index);
                self.vrings[index].kick = Some(Arc::new(kick));
                if !self.protocol_features_acked() {
                    self.vrings[index].enabled = true;
                }
                self.start_vring_if_ready(index)?;
                Ok(Reply::Ack)
            }
            Request::SetVringCall { index, has_fd } => {
                let call = match has_fd {
                    true => Some(Arc::new(notify_fd::accept(take_fd(msg)?, index, "call")?)),
                    false => None,
                };
                self.vrings[index].call.publish(call.clone());
                if let Some(call) = call {
                    // Signal every new call fd once, as libvhost-user does: a
                    // daemon that died after writing a used entry but before
                    // signalling left a driver waiting for an interrupt that
                    // no request of ours will send (an idle guest would wait
                    // forever). A driver takes a spurious one in its stride.
                    // From the queue's iothread, never waiting (the frontend
                    // may have made the fd blocking and its counter full).
                    self.device.signal_call_once(index as u16, call);
                }
                Ok(Reply::Ack)
            }
            Request::SetVringErr => Ok(Reply::Ack),
            Request::SetVringEnable { index, enable } => {
                if !self.protocol_features_acked() {
                    return Err(Error::invalid(
                        "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES",
                    ));
                }
                self.vrings[index].enabled = enable;
                if enable {
                    self.start_vring_if_ready(index)?;
                } else {
                    self.stop_vring(index);
                }
                Ok(Reply::Ack)
            }
            Request::GetConfig { offset, size } => Ok(self.get_config(offset, size)),
            Request::SetConfig { offset, data } => {
                self.device.write_config(offset as usize, &data);
                Ok(Reply::Ack)
            }
            Request::SetBackendReqFd => {
                if self.protocol & VhostUserProtocolFeatures::BACKEND_REQ.bits() == 0 {
                    return Err(Error::invalid(
                        "SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature",
                    ));
                }
                let fd = take_fd(msg)?;
                self.backend_fd = fd.try_clone().ok();
                self.device.set_backend_channel(Some(UnixStream::from(fd)));
                Ok(Reply::Ack)
            }
            Request::GetInflightFd {
                num_queues,
                queue_size,
            } => {
                self.inflight_allowed()?;
                let (map, fd) = InflightMap::create(num_queues, queue_size)?;
                // Tracking starts with this region; the SET_INFLIGHT_FD
                // that QEMU sends next gives the same one back.
                self.inflight = Some(Arc::new(map));
                let size = inflight::region_size(num_queues, queue_size);
                self.inflight_fd = fd.try_clone().ok().map(|copy| {
                    let layout = InflightState::new(size, 0, num_queues, queue_size);
                    (copy, layout)
                });
                let reply = VhostUserInflight::new(size, 0, num_queues, queue_size);
                Ok(Reply::PayloadFd(reply.as_slice().to_vec(), fd))
            }
            Request::SetInflightFd {
                mmap_size,
                mmap_offset,
                num_queues,
                queue_size,
            } => {
                self.inflight_allowed()?;
                let fd = take_fd(msg)?;
                let map = InflightMap::open(&fd, mmap_size, mmap_offset, num_queues, queue_size)?;
                log::info!(
                    "export {}: inflight region set ({num_queues} queues of {queue_size})",
                    self.device.id()
                );
                self.inflight = Some(Arc::new(map));
                let layout = InflightState::new(mmap_size, mmap_offset, num_queues, queue_size);
                self.inflight_fd = Some((fd, layout));
                Ok(Reply::Ack)
            }
            Request::SetLogBase {
                mmap_size,
                mmap_offset,
            } => {
                if !self.log_shmfd() {
                    return Err(Error::invalid(
                        "SET_LOG_BASE without the LOG_SHMFD protocol feature",
                    ));
                }
                let fd = take_fd(msg)?;
                let map = LogMap::open(&fd, mmap_size, mmap_offset, self.poison_fd.as_raw_fd())?;
                log::info!(
                    "export {}: dirty log of {mmap_size} bytes mapped",
                    self.device.id()
                );
                // Queues pick the new log up at their next write; the old
                // one is unmapped when the last of them lets it go.
                self.dirty_log.set_map(Some(map));
                // With LOG_SHMFD the frontend waits for this reply whether
                // or not it asked for an ack.
                Ok(u64_reply(0))
            }
        }
    }

    /// The inflight region may be given or replaced only if negotiated,
    /// and only while no queue runs with the old one.
    fn inflight_allowed(&self) -> Result<(), Error> {
        if self.protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() == 0 {
            return Err(Error::invalid(
                "inflight region without the INFLIGHT_SHMFD protocol feature",
            ));
        }
        if self.any_running() {
            return Err(Error::invalid("inflight region changed while queues run"));
        }
        Ok(())
    }

    /// Make `map` the frontend's memory, unless a running ring would lose
    /// the memory it lives in.
    fn publish(&mut self, map: MemoryMap) -> HandlerResult {
        let ram = map.guest_memory();
        for (i, v) in self.vrings.iter().enumerate() {
            let Some(ctl) = &v.running else { continue };
            for (gpa, len) in ctl.ring_ranges() {
                if ram.host_range(gpa, len).is_none() {
                    return Err(Error::invalid(format!(
                        "vring {i} runs with a ring at gpa {gpa:#x} the new memory map lacks"
                    )));
                }
            }
        }
        self.shared_mem.publish(ram.clone());
        self.memory = map;
        Ok(Reply::Ack)
    }

    fn get_config(&self, offset: u32, size: u32) -> Reply {
        let space = self.device.config_space();
        let mut out = VhostUserConfig::new(offset, size, VhostUserConfigFlags::empty())
            .as_slice()
            .to_vec();
        // decode() bounded offset + size by MAX_CONFIG_BYTES; bytes past
        // our config space read as zero.
        out.extend((offset..offset + size).map(|k| space.get(k as usize).copied().unwrap_or(0)));
        Reply::Payload(out)
    }

    fn start_vring_if_ready(&mut self, i: usize) -> Result<(), Error> {
        let v = &self.vrings[i];
        let (Some(kick), Some((desc, used, avail))) = (&v.kick, v.addr) else {
            return Ok(());
        };
        if v.running.is_some() || !v.enabled {
            return Ok(());
        }
        let size = if v.size == 0 {
            return Err(Error::invalid(format!("vring {i}: no size set")));
        } else {
            v.size
        };
        if !self.features_set {
            return Err(Error::invalid(format!(
                "vring {i}: cannot start before SET_FEATURES"
            )));
        }
        let event_idx = self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let sizes = ring_sizes(size, event_idx);
        let gpa = |va: u64, len: u64, what: &str| {
            self.memory.va_range_to_gpa(va, len).ok_or_else(|| {
                Error::invalid(format!(
                    "vring {i}: {what} at {va:#x} ({len} bytes) is not inside one memory region"
                ))
            })
        };
        let setup = QueueSetup {
            index: i as u16,
            size,
            desc_table: gpa(desc, sizes.desc, "descriptor table")?,
            avail_ring: gpa(avail, sizes.avail, "avail ring")?,
            used_ring: gpa(used, sizes.used, "used ring")?,
            next_avail: v.base,
            event_idx,
            indirect: self.features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            kick: kick.clone(),
            call: v.call.clone(),
            inflight: match &self.inflight {
                Some(map) => Some(map.queue(i as u16, size)?),
                None => None,
            },
            dirty_log: self.dirty_log.clone(),
        };
        let ctl = self.device.start_queue(setup, self.shared_mem.clone())?;
        self.vrings[i].running = Some(ctl);
        Ok(())
    }

    /// Stop every queue and hand the session, descriptors and state, to
    /// systemd's fd store for the next daemon (see handoff.rs). A session
    /// in the middle of a migration is not handed over.
    fn hand_off(&mut self, n: &Notifier) -> Result<(), Error> {
        if self.features & LOG_ALL != 0 {
            return Err(Error::busy(
                "a migration is in progress; not handing the session over",
            ));
        }
        for i in 0..self.vrings.len() {
            self.stop_vring(i);
        }
        let mut fds = FdTable::default();
        let socket = fds.add(self.stream.as_raw_fd());
        let regions = self
            .memory
            .regions()
            .into_iter()
            .map(|(r, file)| handoff::RegionState {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
                fd: fds.add(file.as_raw_fd()),
            })
            .collect();
        let vrings = self
            .vrings
            .iter()
            .map(|v| VringState {
                size: v.size,
                base: v.base,
                addr: v.addr,
                enabled: v.enabled,
                kick: v.kick.as_ref().map(|k| fds.add(k.as_raw_fd())),
                call: v.call.load().1.map(|c| fds.add(c.as_raw_fd())),
            })
            .collect();
        let inflight = self.inflight_fd.as_ref().map(|(fd, layout)| InflightState {
            fd: fds.add(fd.as_raw_fd()),
            ..*layout
        });
        let state = SessionState {
            version: handoff::VERSION,
            export: self.device.id().to_string(),
            features: self.features,
            features_set: self.features_set,
            protocol: self.protocol,
            regions,
            vrings,
            inflight,
            socket,
            backend: self.backend_fd.as_ref().map(|b| fds.add(b.as_raw_fd())),
        };
        handoff::store(n, &state, &fds)
    }

    /// The session the previous daemon handed over, on `stream` (its
    /// descriptor `r.state.socket`): memory mapped, rings set up and
    /// started where the old daemon stopped them.
    pub(crate) fn restore(
        device: &'a D,
        stream: &'a UnixStream,
        mut r: Restored,
    ) -> Result<Self, Error> {
        let mut s = Session::new(device, stream)?;
        let rings = std::mem::take(&mut r.state.vrings);
        if rings.len() != s.vrings.len() {
            return Err(Error::invalid(format!(
                "{} rings handed over, the export has {}",
                rings.len(),
                s.vrings.len()
            )));
        }
        let offered =
            device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | LOG_ALL;
        if r.state.features & !offered != 0 || r.state.protocol & !protocol_features().bits() != 0 {
            return Err(Error::invalid(
                "features handed over that this daemon does not offer",
            ));
        }
        s.features = r.state.features;
        s.features_set = r.state.features_set;
        s.protocol = r.state.protocol;
        let regions = std::mem::take(&mut r.state.regions);
        if regions.len() as u64 > MAX_MEM_SLOTS {
            return Err(Error::invalid(
                "more memory regions handed over than we take",
            ));
        }
        let mut table = Vec::new();
        for g in regions {
            let region = VhostUserMemoryRegion::new(g.gpa, g.size, g.user_addr, g.mmap_offset);
            table.push((region, r.fd(g.fd)?));
        }
        let map = s
            .memory
            .replaced_by(table)
            .map_err(|e| Error::invalid(e.to_string()))?;
        s.publish(map)?;
        if let Some(layout) = r.state.inflight.take() {
            let fd = r.fd(layout.fd)?;
            let map = InflightMap::open(
                &fd,
                layout.mmap_size,
                layout.mmap_offset,
                layout.num_queues,
                layout.queue_size,
            )?;
            s.inflight = Some(Arc::new(map));
            s.inflight_fd = Some((fd, layout));
        }
        if let Some(k) = r.state.backend {
            let fd = r.fd(k)?;
            s.backend_fd = fd.try_clone().ok();
            device.set_backend_channel(Some(UnixStream::from(fd)));
        }
        for (i, v) in rings.into_iter().enumerate() {
            let ring = &mut s.vrings[i];
            (ring.size, ring.base, ring.addr, ring.enabled) = (v.size, v.base, v.addr, v.enabled);
            if let Some(k) = v.kick {
                ring.kick = Some(Arc::new(notify_fd::accept(r.fd(k)?, i, "kick")?));
            }
            if let Some(k) = v.call {
                let call = Arc::new(notify_fd::accept(r.fd(k)?, i, "call")?);
                ring.call.publish(Some(call.clone()));
                // As for a new call fd: an interrupt the old daemon owed
                // the driver is sent now.
                device.signal_call_once(i as u16, call);
            }
        }
        for i in 0..s.vrings.len() {
            s.start_vring_if_ready(i)?;
        }
        Ok(s)
    }

    fn stop_vring(&mut self, i: usize) {
        if let Some(ctl) = self.vrings[i].running.take() {
            self.vrings[i].base = ctl.stop_and_wait();
        }
    }
}

fn u64_reply(v: u64) -> Reply {
    Reply::Payload(VhostUserU64::new(v).as_slice().to_vec())
}

fn take_fd(msg: &mut Message) -> Result<OwnedFd, Error> {
    // decode() checked the count; this only guards against a mismatch.
    msg.fds
        .pop()
        .ok_or_else(|| Error::invalid("message carries no file descriptor"))
}

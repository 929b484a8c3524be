//! One frontend connection: the vhost-user message state machine.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVirtioFeatures,
    VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::blk::config::{
    CONFIG_WRITEBACK_OFFSET, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use super::blk::export::BlkExport;
use super::blk::queue::{self, CallFd, QueueControl, QueueSetup};
use super::memory::{MemoryMap, SharedMemory};
use super::socket::{self, FrameError, Message};

/// Memory slots we accept with ADD_MEM_REG.
const MAX_MEM_SLOTS: u64 = 509;
/// Largest split virtqueue the virtio spec allows.
const MAX_QUEUE_SIZE: u32 = 32768;
const VRING_NOFD: u64 = 0x100;
const VRING_INDEX_MASK: u64 = 0xff;

fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

#[derive(Default)]
struct Vring {
    size: u16,
    base: u16,
    /// desc, used, avail in frontend virtual addresses.
    addr: Option<(u64, u64, u64)>,
    kick: Option<Arc<File>>,
    call: Arc<CallFd>,
    enabled: bool,
    running: Option<Arc<QueueControl>>,
}

enum Reply {
    /// No payload; an ack is sent if the frontend asked for one.
    Ack,
    Payload(Vec<u8>),
}

type HandlerResult = Result<Reply, String>;

pub struct Session<'a> {
    export: &'a BlkExport,
    stream: &'a UnixStream,
    features: u64,
    protocol: u64,
    memory: MemoryMap,
    shared_mem: Arc<SharedMemory>,
    vrings: Vec<Vring>,
}

impl<'a> Session<'a> {
    pub fn new(export: &'a BlkExport, stream: &'a UnixStream) -> Self {
        let n = export.geometry.num_queues as usize;
        Session {
            export,
            stream,
            features: 0,
            protocol: 0,
            memory: MemoryMap::default(),
            shared_mem: SharedMemory::new(),
            vrings: (0..n).map(|_| Vring::default()).collect(),
        }
    }

    /// Serve messages until the frontend leaves or `stop_fd` is signalled.
    pub fn run(&mut self, stop_fd: i32) {
        loop {
            match socket::wait_for(self.stream.as_raw_fd(), stop_fd) {
                Ok(socket::Wake::Ready) => {}
                Ok(socket::Wake::Stop) => {
                    log::info!(
                        "export {}: disconnecting the frontend (shutdown)",
                        self.export.id
                    );
                    break;
                }
                Err(e) => {
                    log::error!("export {}: poll failed: {e}", self.export.id);
                    break;
                }
            }
            match socket::recv_message(self.stream) {
                Ok(msg) => {
                    if let Err(e) = self.dispatch(msg) {
                        log::error!("export {}: {e}; closing the connection", self.export.id);
                        break;
                    }
                }
                Err(FrameError::Closed) => {
                    log::info!("export {}: frontend disconnected", self.export.id);
                    break;
                }
                Err(e) => {
                    log::error!("export {}: {e}; closing the connection", self.export.id);
                    break;
                }
            }
        }
        self.reset();
    }

    /// Stop every queue (their requests finish) and forget the frontend's state.
    fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_vring(i);
        }
        self.vrings = (0..self.vrings.len()).map(|_| Vring::default()).collect();
        self.features = 0;
        self.protocol = 0;
    }

    fn dispatch(&mut self, mut msg: Message) -> std::io::Result<()> {
        let code = msg.request;
        let req = FrontendReq::try_from(code).ok();
        let result = match req {
            Some(r) => self.handle(r, &mut msg),
            None => Err(format!("unknown request {code}")),
        };
        let name = req.map_or_else(|| format!("request {code}"), |r| format!("{r:?}"));
        match result {
            Ok(Reply::Payload(p)) => socket::send_reply(self.stream, code, &p),
            Ok(Reply::Ack) => {
                if msg.need_reply() && self.reply_ack() {
                    socket::send_reply(self.stream, code, VhostUserU64::new(0).as_slice())
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                log::error!("export {}: {name}: {e}", self.export.id);
                if msg.need_reply() && self.reply_ack() {
                    socket::send_reply(self.stream, code, VhostUserU64::new(1).as_slice())
                } else {
                    Ok(())
                }
            }
        }
    }

    fn reply_ack(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn protocol_features_acked(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn vring_index(&self, index: u64) -> Result<usize, String> {
        let i = index as usize;
        if i < self.vrings.len() {
            Ok(i)
        } else {
            Err(format!(
                "vring {index} does not exist ({} queues)",
                self.vrings.len()
            ))
        }
    }

    fn handle(&mut self, req: FrontendReq, msg: &mut Message) -> HandlerResult {
        use FrontendReq as R;
        let features =
            self.export.geometry.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        match req {
            R::GET_FEATURES => Ok(u64_reply(features)),
            R::SET_FEATURES => {
                let f = payload::<VhostUserU64>(msg)?.value;
                if f & !features != 0 {
                    return Err(format!(
                        "frontend acked features we do not offer: {:#x}",
                        f & !features
                    ));
                }
                self.features = f;
                Ok(Reply::Ack)
            }
            R::GET_PROTOCOL_FEATURES => Ok(u64_reply(protocol_features().bits())),
            R::SET_PROTOCOL_FEATURES => {
                let f = payload::<VhostUserU64>(msg)?.value;
                self.protocol = f & protocol_features().bits();
                Ok(Reply::Ack)
            }
            R::SET_OWNER => Ok(Reply::Ack),
            R::RESET_OWNER | R::RESET_DEVICE => {
                self.reset();
                Ok(Reply::Ack)
            }
            R::GET_QUEUE_NUM => Ok(u64_reply(self.vrings.len() as u64)),
            R::GET_MAX_MEM_SLOTS => Ok(u64_reply(MAX_MEM_SLOTS)),
            R::SET_MEM_TABLE => self.set_mem_table(msg),
            R::ADD_MEM_REG => {
                let r = *payload::<VhostUserSingleMemoryRegion>(msg)?;
                let fd = msg
                    .take_fd()
                    .ok_or("ADD_MEM_REG without a file descriptor")?;
                if self.memory.num_regions() as u64 >= MAX_MEM_SLOTS {
                    return Err("no free memory slot".into());
                }
                let map = self.memory.with_region(&r, fd).map_err(|e| e.to_string())?;
                self.publish(map);
                Ok(Reply::Ack)
            }
            R::REM_MEM_REG => {
                let r = *payload::<VhostUserSingleMemoryRegion>(msg)?;
                let map = self.memory.without_region(&r).map_err(|e| e.to_string())?;
                self.publish(map);
                Ok(Reply::Ack)
            }
            R::SET_VRING_NUM => {
                let s = payload::<VhostUserVringState>(msg)?;
                let i = self.vring_index(s.index as u64)?;
                let num = s.num;
                if num == 0 || num > MAX_QUEUE_SIZE || !num.is_power_of_two() {
                    return Err(format!("vring {i}: invalid size {num}"));
                }
                self.vrings[i].size = num as u16;
                Ok(Reply::Ack)
            }
            R::SET_VRING_ADDR => {
                let a = payload::<VhostUserVringAddr>(msg)?;
                let i = self.vring_index(a.index as u64)?;
                if a.flags != 0 {
                    return Err(format!("vring {i}: dirty logging is not supported"));
                }
                self.vrings[i].addr = Some((a.descriptor, a.used, a.available));
                Ok(Reply::Ack)
            }
            R::SET_VRING_BASE => {
                let s = payload::<VhostUserVringState>(msg)?;
                let i = self.vring_index(s.index as u64)?;
                let base = s.num;
                self.vrings[i].base =
                    u16::try_from(base).map_err(|_| format!("vring {i}: base {base} too large"))?;
                Ok(Reply::Ack)
            }
            R::GET_VRING_BASE => {
                let s = payload::<VhostUserVringState>(msg)?;
                let i = self.vring_index(s.index as u64)?;
                self.stop_vring(i);
                self.vrings[i].kick = None;
                let base = self.vrings[i].base as u32;
                Ok(Reply::Payload(
                    VhostUserVringState::new(i as u32, base).as_slice().to_vec(),
                ))
            }
            R::SET_VRING_KICK => {
                let (i, fd) = self.vring_fd(msg)?;
                let fd = fd.ok_or_else(|| {
                    format!("vring {i}: polling mode without a kick fd is not supported")
                })?;
                self.stop_vring(i);
                self.vrings[i].kick = Some(Arc::new(File::from(fd)));
                if !self.protocol_features_acked() {
                    self.vrings[i].enabled = true;
                }
                self.start_vring_if_ready(i)?;
                Ok(Reply::Ack)
            }
            R::SET_VRING_CALL => {
                let (i, fd) = self.vring_fd(msg)?;
                self.vrings[i].call.set(fd.map(File::from));
                Ok(Reply::Ack)
            }
            R::SET_VRING_ERR => {
                // We never report vring errors through this fd; drop it.
                self.vring_fd(msg)?;
                Ok(Reply::Ack)
            }
            R::SET_VRING_ENABLE => {
                let s = payload::<VhostUserVringState>(msg)?;
                let i = self.vring_index(s.index as u64)?;
                if !self.protocol_features_acked() {
                    return Err("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES".into());
                }
                let enable = s.num != 0;
                self.vrings[i].enabled = enable;
                if enable {
                    self.start_vring_if_ready(i)?;
                } else {
                    self.stop_vring(i);
                }
                Ok(Reply::Ack)
            }
            R::GET_CONFIG => self.get_config(msg),
            R::SET_CONFIG => self.set_config(msg),
            R::SET_BACKEND_REQ_FD => {
                let fd = msg
                    .take_fd()
                    .ok_or("SET_BACKEND_REQ_FD without a file descriptor")?;
                self.export
                    .state
                    .set_backend_channel(Some(UnixStream::from(fd)));
                Ok(Reply::Ack)
            }
            other => Err(format!("{other:?} is not supported")),
        }
    }

    fn vring_fd(&self, msg: &mut Message) -> Result<(usize, Option<OwnedFd>), String> {
        let v = payload::<VhostUserU64>(msg)?.value;
        let i = self.vring_index(v & VRING_INDEX_MASK)?;
        if v & VRING_NOFD != 0 {
            return Ok((i, None));
        }
        let fd = msg
            .take_fd()
            .ok_or_else(|| format!("vring {i}: message carries no file descriptor"))?;
        Ok((i, Some(fd)))
    }

    fn set_mem_table(&mut self, msg: &mut Message) -> HandlerResult {
        let hdr = payload::<VhostUserMemory>(msg)?;
        let n = hdr.num_regions as usize;
        let region_len = std::mem::size_of::<VhostUserMemoryRegion>();
        let hdr_len = std::mem::size_of::<VhostUserMemory>();
        if n == 0 || msg.payload.len() != hdr_len + n * region_len || msg.fds.len() != n {
            return Err(format!(
                "SET_MEM_TABLE: {n} regions, {} payload bytes, {} fds",
                msg.payload.len(),
                msg.fds.len()
            ));
        }
        let mut table = Vec::with_capacity(n);
        for (k, fd) in std::mem::take(&mut msg.fds).into_iter().enumerate() {
            let off = hdr_len + k * region_len;
            let r = VhostUserMemoryRegion::from_slice(&msg.payload[off..off + region_len])
                .copied()
                .ok_or("SET_MEM_TABLE: bad region")?;
            table.push((r, fd));
        }
        let map = MemoryMap::from_table(table).map_err(|e| e.to_string())?;
        self.publish(map);
        Ok(Reply::Ack)
    }

    fn publish(&mut self, map: MemoryMap) {
        self.shared_mem.publish(map.guest_memory().clone());
        self.memory = map;
    }

    fn get_config(&self, msg: &Message) -> HandlerResult {
        let c = payload::<VhostUserConfig>(msg)?;
        let (offset, size) = (c.offset as usize, c.size as usize);
        let mut out = c.as_slice().to_vec();
        if size == 0 || offset + size > vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE as usize
        {
            // An empty payload tells the frontend the read failed.
            let mut bad = c;
            bad.size = 0;
            return Ok(Reply::Payload(bad.as_slice().to_vec()));
        }
        let space = self.export.config_space();
        let mut data = vec![0u8; size];
        for (k, b) in data.iter_mut().enumerate() {
            *b = space.get(offset + k).copied().unwrap_or(0);
        }
        out.extend_from_slice(&data);
        Ok(Reply::Payload(out))
    }

    fn set_config(&self, msg: &Message) -> HandlerResult {
        let c = payload::<VhostUserConfig>(msg)?;
        let hdr = std::mem::size_of::<VhostUserConfig>();
        let (offset, size) = (c.offset as usize, c.size as usize);
        let data = msg
            .payload
            .get(hdr..hdr + size)
            .ok_or("SET_CONFIG: payload shorter than its size")?;
        for (k, b) in data.iter().enumerate() {
            if offset + k == CONFIG_WRITEBACK_OFFSET {
                let wb = *b != 0;
                self.export.state.writeback.store(wb, Ordering::Relaxed);
                log::info!(
                    "export {}: guest set the write cache to {}",
                    self.export.id,
                    if wb { "writeback" } else { "writethrough" }
                );
            } else if self
                .export
                .config_space()
                .get(offset + k)
                .is_none_or(|old| old != b)
            {
                log::debug!(
                    "export {}: ignoring write to config byte {}",
                    self.export.id,
                    offset + k
                );
            }
        }
        Ok(Reply::Ack)
    }

    fn start_vring_if_ready(&mut self, i: usize) -> Result<(), String> {
        let v = &self.vrings[i];
        let (Some(kick), Some((desc, used, avail))) = (&v.kick, v.addr) else {
            return Ok(());
        };
        if v.running.is_some() || !v.enabled {
            return Ok(());
        }
        let size = if v.size == 0 {
            return Err(format!("vring {i}: no size set"));
        } else {
            v.size
        };
        let gpa = |va: u64, what: &str| {
            self.memory.va_to_gpa(va).ok_or_else(|| {
                format!("vring {i}: {what} address {va:#x} is not in any memory region")
            })
        };
        let setup = QueueSetup {
            index: i as u16,
            size,
            desc_table: gpa(desc, "descriptor table")?,
            avail_ring: gpa(avail, "avail ring")?,
            used_ring: gpa(used, "used ring")?,
            next_avail: v.base,
            event_idx: self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            indirect: self.features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            kick: kick.clone(),
            call: v.call.clone(),
        };
        let thread = self.export.iothread_for(i as u16);
        let ctl = queue::start(
            setup,
            self.shared_mem.clone(),
            self.export.state.clone(),
            thread,
        )?;
        self.vrings[i].running = Some(ctl);
        Ok(())
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

fn payload<T: ByteValued>(msg: &Message) -> Result<T, String> {
    msg.payload_as::<T>().ok_or_else(|| {
        format!(
            "payload of {} bytes, expected {}",
            msg.payload.len(),
            std::mem::size_of::<T>()
        )
    })
}

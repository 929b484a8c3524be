//! Decoding one vhost-user request: header checks, the payload against the
//! request's struct, queue indices and the file descriptors it must carry.
//!
//! Pure functions of the bytes (and the fd count): nothing here depends on
//! the session's state, so the decoder can be fuzzed on its own. The session
//! checks what depends on state (order of messages, running queues).

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserHeaderFlag, VhostUserInflight, VhostUserLog,
    VhostUserMemory, VhostUserMemoryRegion, VhostUserSingleMemoryRegion, VhostUserU64,
    VhostUserVringAddr, VhostUserVringAddrFlags, VhostUserVringState, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;

use super::dirty_log::MAX_LOG_BYTES;
use super::inflight;
use super::memory::{self, RegionError};

pub(crate) const HEADER_LEN: usize = 12;
/// The protocol version every message carries in the VERSION bits.
pub(crate) const FLAG_VERSION_1: u32 = 0x1;
const FLAG_VERSION_MASK: u32 = VhostUserHeaderFlag::VERSION.bits();
pub(crate) const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
pub(crate) const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
const FLAGS_KNOWN: u32 = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/// Regions SET_MEM_TABLE may carry (the protocol's fixed table size).
pub(crate) const MAX_TABLE_REGIONS: usize = 8;
/// Config space bytes a frontend may read or write in one message.
pub(crate) const MAX_CONFIG_BYTES: usize = 256;
/// Largest split virtqueue the virtio spec allows.
pub(crate) const MAX_QUEUE_SIZE: u32 = 32768;

const VRING_NOFD: u64 = 0x100;
const VRING_INDEX_MASK: u64 = 0xff;

const U64_LEN: usize = std::mem::size_of::<VhostUserU64>();
const ADDR_LEN: usize = std::mem::size_of::<VhostUserVringAddr>();
const SINGLE_REGION_LEN: usize = std::mem::size_of::<VhostUserSingleMemoryRegion>();
const TABLE_HEADER_LEN: usize = std::mem::size_of::<VhostUserMemory>();
const REGION_LEN: usize = std::mem::size_of::<VhostUserMemoryRegion>();
const CONFIG_HEADER_LEN: usize = std::mem::size_of::<VhostUserConfig>();
pub(crate) const INFLIGHT_LEN: usize = std::mem::size_of::<VhostUserInflight>();
const LOG_LEN: usize = std::mem::size_of::<VhostUserLog>();
/// VHOST_VRING_F_LOG: the used ring is logged at `log_guest_addr`.
const VRING_F_LOG: u32 = VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits();
/// mmap offsets must be page-aligned (the smallest page size we run on).
const PAGE_SIZE: u64 = 4096;

/// A frame header that passed the stream-level checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    pub(crate) fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// The stream cannot be trusted past this header: disconnect.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad message header (request {request}, flags {flags:#x}, size {size}, at most {max})")]
pub(crate) struct BadHeader {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
    pub max: usize,
}

/// The largest payload `request` can legitimately have. A header claiming
/// more is a broken stream; nothing bigger is ever allocated.
pub(crate) fn max_payload(request: u32) -> usize {
    use FrontendReq as R;
    match FrontendReq::try_from(request) {
        Ok(R::SET_MEM_TABLE) => TABLE_HEADER_LEN + MAX_TABLE_REGIONS * REGION_LEN,
        Ok(R::GET_CONFIG | R::SET_CONFIG) => CONFIG_HEADER_LEN + MAX_CONFIG_BYTES,
        Ok(R::ADD_MEM_REG | R::REM_MEM_REG) => SINGLE_REGION_LEN,
        Ok(R::SET_VRING_ADDR) => ADDR_LEN,
        Ok(R::GET_INFLIGHT_FD | R::SET_INFLIGHT_FD) => INFLIGHT_LEN,
        Ok(R::SET_LOG_BASE) => LOG_LEN,
        Ok(_) => U64_LEN,
        // Unknown requests are read (to stay in step) and refused.
        Err(_) => MAX_MSG_SIZE,
    }
}

pub(crate) fn parse_header(raw: &[u8; HEADER_LEN]) -> Result<Header, BadHeader> {
    let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let h = Header {
        request: word(0),
        flags: word(4),
        size: word(8),
    };
    let max = max_payload(h.request);
    if h.flags & FLAG_VERSION_MASK != FLAG_VERSION_1 || h.size as usize > max {
        return Err(BadHeader {
            request: h.request,
            flags: h.flags,
            size: h.size,
            max,
        });
    }
    Ok(h)
}

/// A request whose fields were checked against the protocol.
pub(crate) enum Request {
    GetFeatures,
    SetFeatures(u64),
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    SetOwner,
    ResetDevice,
    GetQueueNum,
    GetMaxMemSlots,
    /// Regions are individually sane and pairwise disjoint; one fd each.
    SetMemTable(Vec<VhostUserMemoryRegion>),
    /// One fd.
    AddMemReg(VhostUserMemoryRegion),
    RemMemReg(VhostUserMemoryRegion),
    SetVringNum {
        index: usize,
        num: u16,
    },
    SetVringAddr {
        index: usize,
        desc: u64,
        used: u64,
        avail: u64,
        /// VHOST_VRING_F_LOG: the used ring's guest-physical log address.
        used_log: Option<u64>,
    },
    SetVringBase {
        index: usize,
        base: u16,
    },
    GetVringBase {
        index: usize,
    },
    /// `has_fd`: one fd comes with it.
    SetVringKick {
        index: usize,
        has_fd: bool,
    },
    SetVringCall {
        index: usize,
        has_fd: bool,
    },
    /// Its fd (if any) is closed: we never report vring errors.
    SetVringErr,
    SetVringEnable {
        index: usize,
        enable: bool,
    },
    GetConfig {
        offset: u32,
        size: u32,
    },
    SetConfig {
        offset: u32,
        data: Vec<u8>,
    },
    /// One fd.
    SetBackendReqFd,
    /// The region for `num_queues` queues of `queue_size` entries.
    GetInflightFd {
        num_queues: u16,
        queue_size: u16,
    },
    /// One fd; `mmap_size` covers the layout for the queues given and
    /// `mmap_offset` is page-aligned (the file itself is the session's to
    /// check).
    SetInflightFd {
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    },
    /// One fd; `mmap_size` is 1 to MAX_LOG_BYTES, `mmap_offset` is
    /// page-aligned and the two do not overflow (the file is the session's
    /// to check).
    SetLogBase {
        mmap_size: u64,
        mmap_offset: u64,
    },
}

/// Why a well-framed request is refused (the stream stays usable).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("unknown request")]
    Unknown,
    #[error("not supported")]
    Unsupported,
    #[error("flags {0:#x}: reply bit or unknown bits set")]
    Flags(u32),
    #[error("payload of {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
    #[error("{got} file descriptors, expected {want}")]
    Fds { got: usize, want: &'static str },
    #[error("vring {index} does not exist ({num_queues} queues)")]
    Queue { index: u64, num_queues: usize },
    #[error("vring {index}: invalid size {num}")]
    QueueSize { index: usize, num: u32 },
    #[error("vring {index}: base {base} too large")]
    Base { index: usize, base: u32 },
    #[error("vring {index}: {what}")]
    Vring { index: usize, what: &'static str },
    #[error("memory table: {0}")]
    Table(String),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("config access at {offset} size {size} is out of range")]
    Config { offset: u32, size: u32 },
    #[error("inflight region: {0}")]
    Inflight(String),
    #[error("dirty log: {0}")]
    Log(String),
}

/// True if `request` is answered with a payload; refusing such a request
/// without one would leave the frontend waiting.
pub(crate) fn has_payload_reply(request: u32) -> bool {
    use FrontendReq as R;
    matches!(
        FrontendReq::try_from(request),
        Ok(R::GET_FEATURES
            | R::GET_PROTOCOL_FEATURES
            | R::GET_QUEUE_NUM
            | R::GET_MAX_MEM_SLOTS
            | R::GET_VRING_BASE
            | R::GET_CONFIG
            | R::GET_INFLIGHT_FD)
    )
}

fn exact<T: ByteValued>(payload: &[u8]) -> Result<T, DecodeError> {
    let want = std::mem::size_of::<T>();
    if payload.len() != want {
        return Err(DecodeError::Size {
            got: payload.len(),
            want,
        });
    }
    // SAFETY: ByteValued types are plain data for which any bytes, zeros
    // included, are a valid value.
    let mut v: T = unsafe { std::mem::MaybeUninit::zeroed().assume_init() };
    // Copied, not cast: the payload need not be aligned for T.
    v.as_mut_slice().copy_from_slice(payload);
    Ok(v)
}

fn empty(payload: &[u8]) -> Result<(), DecodeError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Size {
            got: payload.len(),
            want: 0,
        })
    }
}

fn fds(got: usize, want: usize, text: &'static str) -> Result<(), DecodeError> {
    if got == want {
        Ok(())
    } else {
        Err(DecodeError::Fds { got, want: text })
    }
}

/// Decode one request of a session whose device has `num_queues` queues.
pub(crate) fn decode(
    header: &Header,
    payload: &[u8],
    nfds: usize,
    num_queues: usize,
) -> Result<Request, DecodeError> {
    use FrontendReq as R;
    if header.flags & !FLAGS_KNOWN != 0 || header.flags & FLAG_REPLY != 0 {
        return Err(DecodeError::Flags(header.flags));
    }
    let req = FrontendReq::try_from(header.request).map_err(|_| DecodeError::Unknown)?;
    let queue = |index: u64| {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < num_queues)
            .ok_or(DecodeError::Queue { index, num_queues })
    };
    // Requests carrying fds say so below; the rest must carry none.
    let takes_fds = matches!(
        req,
        R::SET_MEM_TABLE
            | R::ADD_MEM_REG
            | R::REM_MEM_REG
            | R::SET_VRING_KICK
            | R::SET_VRING_CALL
            | R::SET_VRING_ERR
            | R::SET_BACKEND_REQ_FD
            | R::SET_INFLIGHT_FD
            | R::SET_LOG_BASE
    );
    if !takes_fds {
        fds(nfds, 0, "none")?;
    }
    let vring_fd = |payload: &[u8]| -> Result<(usize, bool), DecodeError> {
        let v = exact::<VhostUserU64>(payload)?.value;
        let index = queue(v & VRING_INDEX_MASK)?;
        if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
            return Err(DecodeError::Vring {
                index,
                what: "unknown bits in the fd message",
            });
        }
        let has_fd = v & VRING_NOFD == 0;
        fds(nfds, has_fd as usize, "one unless the no-fd bit is set")?;
        Ok((index, has_fd))
    };
    Ok(match req {
        R::GET_FEATURES => empty(payload).map(|_| Request::GetFeatures)?,
        R::SET_FEATURES => Request::SetFeatures(exact::<VhostUserU64>(payload)?.value),
        R::GET_PROTOCOL_FEATURES => empty(payload).map(|_| Request::GetProtocolFeatures)?,
        R::SET_PROTOCOL_FEATURES => {
            Request::SetProtocolFeatures(exact::<VhostUserU64>(payload)?.value)
        }
        R::SET_OWNER => empty(payload).map(|_| Request::SetOwner)?,
        R::RESET_OWNER | R::RESET_DEVICE => empty(payload).map(|_| Request::ResetDevice)?,
        R::GET_QUEUE_NUM => empty(payload).map(|_| Request::GetQueueNum)?,
        R::GET_MAX_MEM_SLOTS => empty(payload).map(|_| Request::GetMaxMemSlots)?,
        R::SET_MEM_TABLE => Request::SetMemTable(decode_table(payload, nfds)?),
        R::ADD_MEM_REG => {
            let r = exact::<VhostUserSingleMemoryRegion>(payload)?;
            fds(nfds, 1, "one")?;
            let r = region_of(&r);
            memory::check_region(&r)?;
            Request::AddMemReg(r)
        }
        R::REM_MEM_REG => {
            let r = exact::<VhostUserSingleMemoryRegion>(payload)?;
            // Older QEMU sends the region's fd along; it is not needed.
            if nfds > 1 {
                return Err(DecodeError::Fds {
                    got: nfds,
                    want: "at most one",
                });
            }
            Request::RemMemReg(region_of(&r))
        }
        R::SET_VRING_NUM => {
            let s = exact::<VhostUserVringState>(payload)?;
            let index = queue(s.index as u64)?;
            let num = s.num;
            if num == 0 || num > MAX_QUEUE_SIZE || !num.is_power_of_two() {
                return Err(DecodeError::QueueSize { index, num });
            }
            // num <= 32768 was checked just above.
            Request::SetVringNum {
                index,
                num: num as u16,
            }
        }
        R::SET_VRING_ADDR => {
            let a = exact::<VhostUserVringAddr>(payload)?;
            let index = queue(a.index as u64)?;
            if a.flags & !VRING_F_LOG != 0 {
                return Err(DecodeError::Vring {
                    index,
                    what: "unknown vring address flags",
                });
            }
            let log = a.log;
            if a.flags & VRING_F_LOG != 0 && !log.is_multiple_of(4) {
                return Err(DecodeError::Vring {
                    index,
                    what: "used ring log address misaligned",
                });
            }
            let (desc, used, avail) = (a.descriptor, a.used, a.available);
            if !desc.is_multiple_of(16) || !avail.is_multiple_of(2) || !used.is_multiple_of(4) {
                return Err(DecodeError::Vring {
                    index,
                    what: "ring address misaligned",
                });
            }
            Request::SetVringAddr {
                index,
                desc,
                used,
                avail,
                used_log: (a.flags & VRING_F_LOG != 0).then_some(log),
            }
        }
        R::SET_VRING_BASE => {
            let s = exact::<VhostUserVringState>(payload)?;
            let index = queue(s.index as u64)?;
            let base =
                u16::try_from(s.num).map_err(|_| DecodeError::Base { index, base: s.num })?;
            Request::SetVringBase { index, base }
        }
        R::GET_VRING_BASE => {
            let s = exact::<VhostUserVringState>(payload)?;
            Request::GetVringBase {
                index: queue(s.index as u64)?,
            }
        }
        R::SET_VRING_KICK => {
            let (index, has_fd) = vring_fd(payload)?;
            Request::SetVringKick { index, has_fd }
        }
        R::SET_VRING_CALL => {
            let (index, has_fd) = vring_fd(payload)?;
            Request::SetVringCall { index, has_fd }
        }
        R::SET_VRING_ERR => vring_fd(payload).map(|_| Request::SetVringErr)?,
        R::SET_VRING_ENABLE => {
            let s = exact::<VhostUserVringState>(payload)?;
            let index = queue(s.index as u64)?;
            if s.num > 1 {
                return Err(DecodeError::Vring {
                    index,
                    what: "enable must be 0 or 1",
                });
            }
            Request::SetVringEnable {
                index,
                enable: s.num == 1,
            }
        }
        R::GET_CONFIG | R::SET_CONFIG => {
            let (offset, size, data) = decode_config(payload)?;
            if req == R::GET_CONFIG {
                Request::GetConfig { offset, size }
            } else {
                Request::SetConfig {
                    offset,
                    data: data.to_vec(),
                }
            }
        }
        R::SET_BACKEND_REQ_FD => {
            empty(payload)?;
            fds(nfds, 1, "one")?;
            Request::SetBackendReqFd
        }
        R::GET_INFLIGHT_FD => {
            let i = exact::<VhostUserInflight>(payload)?;
            // The request's mmap fields are ours to fill in the reply.
            let (num_queues, queue_size) = inflight_shape(&i, num_queues)?;
            Request::GetInflightFd {
                num_queues,
                queue_size,
            }
        }
        R::SET_INFLIGHT_FD => {
            let i = exact::<VhostUserInflight>(payload)?;
            fds(nfds, 1, "one")?;
            let (nq, qs) = inflight_shape(&i, num_queues)?;
            let (mmap_size, mmap_offset) = (i.mmap_size, i.mmap_offset);
            let need = inflight::region_size(nq, qs);
            if mmap_size < need {
                return Err(DecodeError::Inflight(format!(
                    "mmap_size {mmap_size} is below the {need} bytes {nq} queues of {qs} need"
                )));
            }
            if !mmap_offset.is_multiple_of(PAGE_SIZE)
                || mmap_offset.checked_add(mmap_size).is_none()
            {
                return Err(DecodeError::Inflight(format!(
                    "mmap_offset {mmap_offset:#x} is not page-aligned or overflows with size {mmap_size}"
                )));
            }
            Request::SetInflightFd {
                mmap_size,
                mmap_offset,
                num_queues: nq,
                queue_size: qs,
            }
        }
        R::SET_LOG_BASE => {
            let l = exact::<VhostUserLog>(payload)?;
            fds(nfds, 1, "one")?;
            let (mmap_size, mmap_offset) = (l.mmap_size, l.mmap_offset);
            if mmap_size == 0 || mmap_size > MAX_LOG_BYTES {
                return Err(DecodeError::Log(format!(
                    "mmap_size {mmap_size} (1 to {MAX_LOG_BYTES} allowed)"
                )));
            }
            if !mmap_offset.is_multiple_of(PAGE_SIZE)
                || mmap_offset.checked_add(mmap_size).is_none()
            {
                return Err(DecodeError::Log(format!(
                    "mmap_offset {mmap_offset:#x} is not page-aligned or overflows with size {mmap_size}"
                )));
            }
            Request::SetLogBase {
                mmap_size,
                mmap_offset,
            }
        }
        _ => return Err(DecodeError::Unsupported),
    })
}

/// Queue count and size of an inflight message: 1 to our queue count,
/// and a queue size SET_VRING_NUM would accept.
fn inflight_shape(i: &VhostUserInflight, num_queues: usize) -> Result<(u16, u16), DecodeError> {
    let (nq, qs) = (i.num_queues, i.queue_size);
    if nq == 0 || nq as usize > num_queues {
        return Err(DecodeError::Inflight(format!(
            "{nq} queues (1 to {num_queues} allowed)"
        )));
    }
    let q = qs as u32;
    if q == 0 || q > MAX_QUEUE_SIZE || !q.is_power_of_two() {
        return Err(DecodeError::Inflight(format!("invalid queue size {qs}")));
    }
    Ok((nq, qs))
}

fn region_of(r: &VhostUserSingleMemoryRegion) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset)
}

fn decode_table(payload: &[u8], nfds: usize) -> Result<Vec<VhostUserMemoryRegion>, DecodeError> {
    let head = payload.get(..TABLE_HEADER_LEN).ok_or(DecodeError::Size {
        got: payload.len(),
        want: TABLE_HEADER_LEN,
    })?;
    let hdr = exact::<VhostUserMemory>(head)?;
    let n = hdr.num_regions as usize;
    if n == 0 || n > MAX_TABLE_REGIONS {
        return Err(DecodeError::Table(format!(
            "{n} regions (1 to {MAX_TABLE_REGIONS} allowed)"
        )));
    }
    // n <= 8: no overflow.
    let want = TABLE_HEADER_LEN + n * REGION_LEN;
    if payload.len() != want {
        return Err(DecodeError::Size {
            got: payload.len(),
            want,
        });
    }
    fds(nfds, n, "one per region")?;
    let regions = payload[TABLE_HEADER_LEN..]
        .chunks_exact(REGION_LEN)
        .map(exact::<VhostUserMemoryRegion>)
        .collect::<Result<Vec<_>, _>>()?;
    for r in &regions {
        memory::check_region(r)?;
    }
    memory::check_disjoint(&regions)?;
    Ok(regions)
}

fn decode_config(payload: &[u8]) -> Result<(u32, u32, &[u8]), DecodeError> {
    let head = payload.get(..CONFIG_HEADER_LEN).ok_or(DecodeError::Size {
        got: payload.len(),
        want: CONFIG_HEADER_LEN,
    })?;
    let c = exact::<VhostUserConfig>(head)?;
    let (offset, size) = (c.offset, c.size);
    // Both are u32: the sum cannot overflow u64.
    if size == 0 || offset as u64 + size as u64 > MAX_CONFIG_BYTES as u64 {
        return Err(DecodeError::Config { offset, size });
    }
    let want = CONFIG_HEADER_LEN + size as usize;
    if payload.len() != want {
        return Err(DecodeError::Size {
            got: payload.len(),
            want,
        });
    }
    Ok((offset, size, &payload[CONFIG_HEADER_LEN..]))
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;

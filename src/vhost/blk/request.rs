//! Turning a descriptor chain into a virtio-blk request, validating every
//! guest-supplied field on the way.

use std::rc::Rc;

use vm_memory::GuestAddress;

use super::chain::{Buffer, Chain};
use crate::uring::{IoVec, IOV_MAX};
use crate::vhost::memory::GuestRam;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
pub(crate) use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Status bytes (the bindings' values are u32; the status is one byte).
pub(crate) const VIRTIO_BLK_S_OK: u8 = virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
pub(crate) const VIRTIO_BLK_S_IOERR: u8 =
    virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub(crate) const VIRTIO_BLK_S_UNSUPP: u8 =
    virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// virtio-blk sectors are always 512 bytes, whatever the block size.
pub(crate) const SECTOR_SIZE: u64 = 512;
/// Length of the serial returned by GET_ID.
pub(crate) const VIRTIO_BLK_ID_BYTES: usize = 20;
const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;

/// What the device accepts, as advertised in its config space.
#[derive(Clone, Debug)]
pub struct Limits {
    pub block_size: u32,
    /// Largest data segment (size_max).
    pub size_max: u32,
    /// Most data segments in one read or write (seg_max). With `size_max`
    /// it caps a request's data at `seg_max × size_max` bytes.
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// Segments per discard / write-zeroes request.
    pub max_segments: u32,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
}

/// A validated operation ready for the BlockBackend.
pub enum Op {
    Read { offset: u64, data: IoVec },
    Write { offset: u64, data: IoVec },
    Flush,
    GetId { data: IoVec },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::GetId { .. } => "get-id",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// Why a request is answered without reaching the backend.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Reject {
    pub status: u8,
    pub reason: String,
}

fn ioerr(reason: impl Into<String>) -> Reject {
    Reject {
        status: VIRTIO_BLK_S_IOERR,
        reason: reason.into(),
    }
}

fn unsupp(reason: impl Into<String>) -> Reject {
    Reject {
        status: VIRTIO_BLK_S_UNSUPP,
        reason: reason.into(),
    }
}

/// Guest memory as a request holds it: `GuestRam` itself, or a queue's
/// own handle on it (`Arc<GuestRam>` inside the queue's `Rc`, whose count
/// only that queue's iothread touches, without locked instructions).
pub(crate) trait RequestMemory: AsRef<GuestRam> + 'static {}
impl<M: AsRef<GuestRam> + 'static> RequestMemory for M {}

/// A parsed request: where its status byte goes and what to do.
pub(crate) struct Request<M: RequestMemory = GuestRam> {
    mem: Rc<M>,
    status: Option<GuestAddress>,
    /// Bytes the device writes into the chain besides the status byte.
    pub data_written: u32,
}

impl<M: RequestMemory> Request<M> {
    /// The guest memory the request's buffers are in (kept mapped by it).
    pub(crate) fn memory(&self) -> &Rc<M> {
        &self.mem
    }

    /// True if the chain has somewhere to put the status byte.
    pub(crate) fn has_status(&self) -> bool {
        self.status.is_some()
    }

    /// Write the status byte; returns the used length for the used ring.
    pub(crate) fn finish(&self, status: u8) -> u32 {
        match self.status {
            Some(addr) if (*self.mem).as_ref().write_u8(addr.0, status) => {
                if status == VIRTIO_BLK_S_OK {
                    self.data_written + 1
                } else {
                    1
                }
            }
            _ => 0,
        }
    }
}

/// The buffers covering bytes `[skip, skip + len)` of a buffer stream,
/// without allocating (this runs for every request).
fn sub_buffers(
    bufs: &[Buffer],
    mut skip: u64,
    mut len: u64,
) -> impl Iterator<Item = Buffer> + Clone + '_ {
    bufs.iter()
        .map_while(move |b| {
            if len == 0 {
                return None;
            }
            if skip >= b.len as u64 {
                skip -= b.len as u64;
                // An empty piece: skipped by the callers' loops.
                return Some(Buffer {
                    addr: b.addr,
                    len: 0,
                });
            }
            let n = (b.len as u64 - skip).min(len);
            let out = Buffer {
                addr: GuestAddress(b.addr.0.wrapping_add(skip)),
                len: n as u32,
            };
            len -= n;
            skip = 0;
            Some(out)
        })
        .filter(|b| b.len > 0)
}

fn stream_len(bufs: &[Buffer]) -> u64 {
    bufs.iter().map(|b| b.len as u64).sum()
}

fn read_stream(mem: &GuestRam, bufs: &[Buffer], skip: u64, out: &mut [u8]) -> Result<(), Reject> {
    // The usual case: the bytes lie in the first buffer and one region.
    if let Some(first) = bufs.first() {
        if skip + out.len() as u64 <= first.len as u64
            && mem.read(first.addr.0.wrapping_add(skip), out)
        {
            return Ok(());
        }
    }
    let mut off = 0usize;
    for b in sub_buffers(bufs, skip, out.len() as u64) {
        let n = b.len as usize;
        if !mem.read(b.addr.0, &mut out[off..off + n]) {
            return Err(ioerr(format!(
                "buffer at {:#x} is outside guest memory",
                b.addr.0
            )));
        }
        off += n;
    }
    if off != out.len() {
        return Err(ioerr("chain too short"));
    }
    Ok(())
}

/// Translate guest buffers into host iovecs, refusing anything outside the
/// guest's memory regions, and lists of more than [`IOV_MAX`] host pieces
/// (buffers split at region boundaries): at most 2 pieces per segment with
/// regions of at least `size_max`, so only a frontend with tiny regions
/// meets this, and it bounds a request's iovec whatever the memory layout.
pub(crate) fn to_iovec<M: RequestMemory>(
    keep: &Rc<M>,
    bufs: impl IntoIterator<Item = Buffer>,
) -> Result<IoVec, Reject> {
    let mem: &GuestRam = (**keep).as_ref();
    let bufs = bufs.into_iter();
    let mut iov = Vec::with_capacity(bufs.size_hint().0.max(1));
    for b in bufs {
        let inside = mem.for_each_piece(b.addr.0, b.len as u64, |p, n| {
            iov.push(libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: n,
            })
        });
        if !inside {
            return Err(ioerr(format!(
                "buffer {:#x}+{} is outside guest memory",
                b.addr.0, b.len
            )));
        }
        if iov.len() > IOV_MAX {
            return Err(ioerr(format!(
                "data split into over {IOV_MAX} pieces at memory region boundaries"
            )));
        }
    }
    // SAFETY: every pointer lies inside one mapped guest region (checked by
    // for_each_piece), which only the kernel and volatile copies touch, and
    // `keep` (the keepalive) keeps the mappings alive.
    Ok(unsafe { IoVec::from_raw(iov, Some(keep.clone())) })
}

fn byte_range(sector: u64, len: u64, limits: &Limits) -> Result<u64, Reject> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| ioerr(format!("sector {sector} overflows")))?;
    let bs = limits.block_size as u64;
    if offset % bs != 0 || !len.is_multiple_of(bs) {
        return Err(ioerr(format!(
            "offset {offset} length {len} not aligned to the {bs}-byte block size"
        )));
    }
    Ok(offset)
}

/// The data buffers of a read or write against the advertised limits: at
/// most `seg_max` segments of at most `size_max` bytes. O(segments), no
/// allocation.
fn check_data(
    bufs: impl Iterator<Item = Buffer> + Clone,
    total: u64,
    limits: &Limits,
) -> Result<(), Reject> {
    let segments = bufs.clone().count();
    if segments > limits.seg_max as usize {
        return Err(ioerr(format!(
            "{segments} data segments, max {}",
            limits.seg_max
        )));
    }
    if let Some(b) = bufs.into_iter().find(|b| b.len > limits.size_max) {
        return Err(ioerr(format!(
            "data segment of {} bytes, max {}",
            b.len, limits.size_max
        )));
    }
    // Implied by the two checks above; kept so the cap stays explicit.
    // u32 × u32 cannot overflow u64; the used length must fit a u32.
    let cap = (limits.seg_max as u64 * limits.size_max as u64).min(u32::MAX as u64 - 1);
    if total > cap {
        return Err(ioerr(format!("{total} data bytes, max {cap}")));
    }
    Ok(())
}

fn parse_segment(
    mem: &GuestRam,
    chain: &Chain,
    is_zeroes: bool,
    limits: &Limits,
) -> Result<Op, Reject> {
    let payload = stream_len(&chain.readable) - HEADER_LEN as u64;
    if payload == 0 || !payload.is_multiple_of(SEGMENT_LEN as u64) {
        return Err(ioerr(format!("discard payload of {payload} bytes")));
    }
    if payload / SEGMENT_LEN as u64 > limits.max_segments as u64 {
        return Err(unsupp(format!(
            "{} segments, max {}",
            payload / 16,
            limits.max_segments
        )));
    }
    let mut seg = [0u8; SEGMENT_LEN];
    read_stream(mem, &chain.readable, HEADER_LEN as u64, &mut seg)?;
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
    let (max, allowed_flags) = if is_zeroes {
        (
            limits.max_write_zeroes_sectors,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        )
    } else {
        (limits.max_discard_sectors, 0)
    };
    if flags & !allowed_flags != 0 {
        return Err(unsupp(format!("segment flags {flags:#x}")));
    }
    if sectors > max {
        return Err(ioerr(format!("{sectors} sectors, max {max}")));
    }
    let len = sectors as u64 * SECTOR_SIZE;
    let offset = byte_range(sector, len, limits)?;
    Ok(if is_zeroes {
        Op::WriteZeroes {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    } else {
        Op::Discard { offset, len }
    })
}

/// Parse a chain into where its completion goes and what to do. Never
/// fails: a malformed request becomes `Err(Reject)`. The request keeps
/// `keep` (moved, not cloned: each clone is an atomic write per request).
pub(crate) fn parse<M: RequestMemory>(
    keep: Rc<M>,
    chain: &Chain,
    limits: &Limits,
) -> (Request<M>, Result<Op, Reject>) {
    let mem: &GuestRam = (*keep).as_ref();
    // The status byte is the last byte of the device-writable part.
    let writable_len = stream_len(&chain.writable);
    let status = (writable_len > 0)
        .then(|| sub_buffers(&chain.writable, writable_len - 1, 1).next())
        .flatten()
        .map(|b| b.addr)
        .filter(|a| mem.host_range(a.0, 1).is_some());
    let mut data_written = 0;
    let action = match status {
        None => Err(ioerr("no status byte")),
        Some(_) => parse_op(&keep, chain, limits, writable_len, &mut data_written),
    };
    let req = Request {
        mem: keep,
        status,
        data_written,
    };
    (req, action)
}

/// The operation a chain with a status byte asks for; sets
/// `data_written` to the bytes a successful read puts in guest memory.
fn parse_op<M: RequestMemory>(
    keep: &Rc<M>,
    chain: &Chain,
    limits: &Limits,
    writable_len: u64,
    data_written: &mut u32,
) -> Result<Op, Reject> {
    let mem: &GuestRam = (**keep).as_ref();
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = read_stream(mem, &chain.readable, 0, &mut header) {
        return Err(ioerr(format!("bad request header: {}", e.reason)));
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    if chain.excess > 0 {
        return Err(ioerr(format!(
            "chain of over {} descriptors",
            chain.readable.len() + chain.writable.len() + chain.excess
        )));
    }
    // Data the device would write (besides the status byte) and read
    // (besides the header). Each request type has one direction at most.
    let in_data = writable_len - 1;
    let out_data = stream_len(&chain.readable) - HEADER_LEN as u64;
    let direction = |name: &str, allow_in: bool, allow_out: bool| {
        if in_data > 0 && !allow_in {
            Err(ioerr(format!(
                "{name} with {in_data} device-writable data bytes"
            )))
        } else if out_data > 0 && !allow_out {
            Err(ioerr(format!(
                "{name} with {out_data} device-readable data bytes"
            )))
        } else {
            Ok(())
        }
    };
    match kind {
        VIRTIO_BLK_T_IN => direction("read", true, false).and_then(|()| {
            if in_data == 0 {
                return Err(ioerr("read without data buffers"));
            }
            let bufs = sub_buffers(&chain.writable, 0, in_data);
            check_data(bufs.clone(), in_data, limits)?;
            let offset = byte_range(sector, in_data, limits)?;
            let data = to_iovec(keep, bufs)?;
            // Fits: check_data caps it below u32::MAX.
            *data_written = in_data as u32;
            Ok(Op::Read { offset, data })
        }),
        VIRTIO_BLK_T_OUT => direction("write", false, true).and_then(|()| {
            if out_data == 0 {
                return Err(ioerr("write without data buffers"));
            }
            let bufs = sub_buffers(&chain.readable, HEADER_LEN as u64, out_data);
            check_data(bufs.clone(), out_data, limits)?;
            let offset = byte_range(sector, out_data, limits)?;
            let data = to_iovec(keep, bufs)?;
            Ok(Op::Write { offset, data })
        }),
        VIRTIO_BLK_T_FLUSH => direction("flush", false, false).map(|()| Op::Flush),
        VIRTIO_BLK_T_GET_ID => direction("get-id", true, false).and_then(|()| {
            if in_data == 0 {
                return Err(ioerr("get-id without a buffer for the id"));
            }
            let n = in_data.min(VIRTIO_BLK_ID_BYTES as u64);
            to_iovec(keep, sub_buffers(&chain.writable, 0, n)).map(|data| {
                *data_written = n as u32;
                Op::GetId { data }
            })
        }),
        VIRTIO_BLK_T_DISCARD => direction("discard", false, true)
            .and_then(|()| parse_segment(mem, chain, false, limits)),
        VIRTIO_BLK_T_WRITE_ZEROES => direction("write-zeroes", false, true)
            .and_then(|()| parse_segment(mem, chain, true, limits)),
        other => Err(unsupp(format!("request type {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::super::chain::tests::memory;
    use super::*;

    const HEADER: u64 = 0x1000;
    const STATUS: u64 = 0x9000;

    fn limits() -> Limits {
        Limits {
            block_size: 512,
            size_max: 4096,
            seg_max: 4,
            max_discard_sectors: 8,
            max_write_zeroes_sectors: 8,
            max_segments: 1,
            serial: [0; VIRTIO_BLK_ID_BYTES],
        }
    }

    fn buf(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
        }
    }

    /// Parse a write whose readable part is `readable` (header first).
    fn write_with(readable: Vec<Buffer>) -> Result<Op, Reject> {
        let mem = Rc::new(memory());
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        mem.mmap().write_slice(&h, GuestAddress(HEADER)).unwrap();
        let chain = Chain {
            readable,
            writable: vec![buf(STATUS, 1)],
            excess: 0,
        };
        let (req, op) = parse(mem, &chain, &limits());
        assert!(req.has_status());
        op
    }

    #[test]
    fn data_segments_are_held_to_seg_max_and_size_max() {
        let segs = |n: u64, len: u32| {
            let mut v = vec![buf(HEADER, 16)];
            v.extend((0..n).map(|i| buf(0x10000 + i * 0x2000, len)));
            v
        };
        // At the cap: seg_max segments of size_max.
        assert!(matches!(write_with(segs(4, 4096)), Ok(Op::Write { .. })));
        let refused = |r: Result<Op, Reject>| match r {
            Err(e) => e,
            Ok(op) => panic!("{} accepted", op.name()),
        };
        let e = refused(write_with(segs(5, 512)));
        assert_eq!(e.status, VIRTIO_BLK_S_IOERR);
        assert!(e.reason.contains("5 data segments"), "{}", e.reason);
        let e = refused(write_with(segs(1, 4096 + 512)));
        assert!(e.reason.contains("segment of 4608 bytes"), "{}", e.reason);
        // Header and data in one descriptor: only the data part counts.
        assert!(write_with(vec![buf(HEADER, 16 + 4096)]).is_ok());
        let e = refused(write_with(vec![buf(HEADER, 16 + 8192)]));
        assert!(e.reason.contains("segment of 8192 bytes"), "{}", e.reason);
    }

    #[test]
    fn the_total_cap_holds_on_its_own() {
        let mut l = limits();
        l.seg_max = u32::MAX;
        l.size_max = u32::MAX;
        let big = [buf(0, u32::MAX), buf(0, u32::MAX)];
        let e = check_data(big.iter().copied(), 2 * u32::MAX as u64, &l).unwrap_err();
        assert_eq!(e.status, VIRTIO_BLK_S_IOERR);
        let l = limits();
        let e = check_data([buf(0, 4096)].into_iter(), 5 * 4096, &l).unwrap_err();
        assert!(e.reason.contains("max 16384"), "{}", e.reason);
    }

    #[test]
    fn data_split_into_too_many_pieces_is_refused() {
        use vm_memory::GuestMemoryMmap;
        // Three adjacent 4 KiB regions; each buffer crosses a boundary.
        let ranges: Vec<_> = (0..3u64)
            .map(|i| (GuestAddress(i * 0x1000), 0x1000))
            .collect();
        let mem = Rc::new(GuestRam::new(
            GuestMemoryMmap::from_ranges(&ranges).unwrap(),
        ));
        let crossing = |n: usize| vec![buf(0x800, 0x1000); n];
        let iov = to_iovec(&mem, crossing(IOV_MAX / 2)).ok().unwrap();
        assert_eq!(iov.iovecs().len(), IOV_MAX);
        let e = to_iovec(&mem, crossing(IOV_MAX / 2 + 1)).err().unwrap();
        assert_eq!(e.status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn chains_with_descriptors_beyond_the_limit_are_io_errors() {
        let mem = Rc::new(memory());
        let chain = Chain {
            readable: vec![buf(HEADER, 16)],
            writable: vec![buf(0x10000, 512), buf(STATUS, 1)],
            excess: 3000,
        };
        let (req, op) = parse(mem, &chain, &limits());
        assert!(req.has_status());
        assert_eq!(op.err().map(|e| e.status), Some(VIRTIO_BLK_S_IOERR));
    }
}

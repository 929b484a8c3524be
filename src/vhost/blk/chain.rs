//! Walking a descriptor chain the guest placed in a split virtqueue.
//!
//! Everything here is guest-controlled: table addresses, indices, lengths,
//! flags. The walk reads descriptors only through the guest memory map and
//! returns a precise error for each kind of malformed chain.

use virtio_bindings::bindings::virtio_ring;
use vm_memory::GuestAddress;

use crate::vhost::memory::GuestRam;

// The descriptor's flags field is 16 bits; the bindings' values are u32.
const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
const DESC_SIZE: u64 = std::mem::size_of::<virtio_ring::vring_desc>() as u64;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    #[error("descriptor index {0} out of range")]
    IndexOutOfRange(u16),
    #[error("descriptor table at {0:#x} is not in guest memory")]
    TableNotInMemory(u64),
    #[error("chain is longer than {0} descriptors (loop?)")]
    TooLong(usize),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT set, or not negotiated")]
    BadIndirect,
    #[error("indirect table length {0} is not a non-zero multiple of 16")]
    BadIndirectLength(u32),
}

/// Most entries an indirect table may have: the largest queue size, hence
/// the longest chain any driver may build. Longer tables are not walked.
pub(crate) const MAX_INDIRECT: u32 = 32768;

/// One guest buffer: guest-physical address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into its device-readable and device-writable buffers.
///
/// At most `max_descs` buffers (plus one) are kept, so a hostile chain costs
/// no more memory than a legal one; the rest are only counted in `excess`,
/// except that the last device-writable buffer is always kept last (it
/// holds the status byte, so even an oversized request can be answered).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Chain {
    pub readable: Vec<Buffer>,
    pub writable: Vec<Buffer>,
    /// Non-empty descriptors beyond `max_descs` that were not kept.
    pub excess: usize,
}

impl Chain {
    /// Empty the chain, keeping its buffers' capacity for the next walk.
    pub(crate) fn clear(&mut self) {
        self.readable.clear();
        self.writable.clear();
        self.excess = 0;
    }

    fn keep(&mut self, buf: Buffer, writable: bool, max_descs: usize) {
        if self.readable.len() + self.writable.len() < max_descs {
            if writable {
                self.writable.push(buf);
            } else {
                self.readable.push(buf);
            }
            return;
        }
        self.excess += 1;
        if writable {
            match self.writable.last_mut() {
                Some(last) => *last = buf,
                None => self.writable.push(buf),
            }
        }
    }
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn from_le(raw: [u8; 16]) -> Desc {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }
}

/// A descriptor table being walked: where it is in host memory when it
/// lies inside one region (the usual case: one translation per table, then
/// one 16-byte volatile load per descriptor), else read through the guest
/// memory map descriptor by descriptor.
struct Table {
    gpa: GuestAddress,
    /// Host address of the whole table, if it lies inside one region.
    host: Option<*const [u8; 16]>,
}

impl Table {
    fn new(mem: &GuestRam, gpa: GuestAddress, entries: u32) -> Table {
        let host = mem
            .host_range(gpa.0, entries as u64 * DESC_SIZE)
            .map(|p| p as *const [u8; 16]);
        Table { gpa, host }
    }

    /// Descriptor `idx`; `idx` is below the table's entry count.
    fn read(&self, mem: &GuestRam, idx: u16) -> Result<Desc, ChainError> {
        if let Some(host) = self.host {
            // SAFETY: `idx` is below the entry count the host range was
            // checked for, so the 16 bytes are inside one mapped region,
            // which stays mapped while `mem` lives. The guest may change
            // them at any time, so they are read with one volatile load
            // (align 1: the type is a byte array) and never referenced.
            let raw = unsafe { std::ptr::read_volatile(host.add(idx as usize)) };
            return Ok(Desc::from_le(raw));
        }
        read_desc(mem, self.gpa, idx)
    }
}

fn read_desc(mem: &GuestRam, table: GuestAddress, idx: u16) -> Result<Desc, ChainError> {
    let addr = table
        .0
        .checked_add(idx as u64 * DESC_SIZE)
        .ok_or(ChainError::TableNotInMemory(table.0))?;
    let mut raw = [0u8; 16];
    if !mem.read(addr, &mut raw) {
        return Err(ChainError::TableNotInMemory(addr));
    }
    Ok(Desc::from_le(raw))
}

/// Start loading what the walks of a batch of chains read first, for the
/// whole batch at once: each head descriptor, then the buffer it points to
/// (the request header, or an indirect table). The driver's CPU wrote
/// these lines just before, so each read is a cache miss; one walk after
/// another they were ~30% of a polling client's profile, started together
/// they overlap. (Prefetching the chains' next descriptors too measured no
/// better.) Only hints: nothing read here is trusted or kept.
pub(crate) fn prefetch_heads(mem: &GuestRam, table: GuestAddress, queue_size: u16, heads: &[u16]) {
    let Some(host) = mem.host_range(table.0, queue_size as u64 * DESC_SIZE) else {
        return;
    };
    let host = host as *const [u8; 16];
    let in_table = || heads.iter().filter(|&&h| h < queue_size);
    for &h in in_table() {
        // SAFETY: h < queue_size: inside the table's range, checked above.
        prefetch(unsafe { host.add(h as usize) } as *const u8);
    }
    for &h in in_table() {
        // SAFETY: as above; read as the walk reads it (volatile, 16 bytes).
        let raw = unsafe { std::ptr::read_volatile(host.add(h as usize)) };
        if let Some(p) = mem.host_range(Desc::from_le(raw).addr, 1) {
            prefetch(p);
        }
    }
}

/// Hint the CPU to load the cache line at `p`; no effect on what runs.
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no memory; `p` is a
    // host address inside guest memory in any case.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Walk the chain starting at `head` in the table at `table` of `queue_size`
/// entries, keeping at most `max_descs` buffers (see [`Chain`]). A chain that
/// visits more descriptors than its table has loops and is refused. (The
/// queue walks into a chain it keeps, `walk_into`; this is for the tests
/// and the fuzzer.)
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn walk(
    mem: &GuestRam,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_ok: bool,
    max_descs: usize,
) -> Result<Chain, ChainError> {
    let mut chain = Chain::default();
    walk_into(
        &mut chain,
        mem,
        table,
        queue_size,
        head,
        indirect_ok,
        max_descs,
    )?;
    Ok(chain)
}

/// [`walk`] into `chain` (cleared first), reusing its buffers' capacity so
/// that walking costs no allocation once a queue has warmed up.
pub(crate) fn walk_into(
    chain: &mut Chain,
    mem: &GuestRam,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_ok: bool,
    max_descs: usize,
) -> Result<(), ChainError> {
    chain.clear();
    let mut size = queue_size as u32;
    let mut table = Table::new(mem, table, size);
    let mut idx = head;
    let mut in_indirect = false;
    // Descriptors visited in the current table.
    let mut count = 0u32;
    loop {
        if idx as u32 >= size {
            return Err(ChainError::IndexOutOfRange(idx));
        }
        count += 1;
        if count > size {
            return Err(ChainError::TooLong(size as usize));
        }
        let d = table.read(mem, idx)?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if !indirect_ok || d.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            if d.len == 0 || !(d.len as u64).is_multiple_of(DESC_SIZE) {
                return Err(ChainError::BadIndirectLength(d.len));
            }
            let entries = d.len / DESC_SIZE as u32;
            if entries > MAX_INDIRECT {
                return Err(ChainError::TooLong(MAX_INDIRECT as usize));
            }
            size = entries;
            table = Table::new(mem, GuestAddress(d.addr), size);
            idx = 0;
            in_indirect = true;
            count = 0;
            continue;
        }
        let buf = Buffer {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
        if !writable && !chain.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        if d.len > 0 {
            chain.keep(buf, writable, max_descs);
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(());
        }
        idx = d.next;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    pub(crate) const MEM_SIZE: usize = 1 << 20;

    pub(crate) fn memory() -> GuestRam {
        GuestRam::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
    }

    pub(crate) fn put_desc(
        mem: &GuestRam,
        table: u64,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.mmap()
            .write_slice(&raw, GuestAddress(table + idx as u64 * 16))
            .unwrap();
    }

    const T: u64 = 0x1000;
    const N: u16 = VIRTQ_DESC_F_NEXT;
    const W: u16 = VIRTQ_DESC_F_WRITE;

    #[test]
    fn simple_chain() {
        let m = memory();
        put_desc(&m, T, 0, 0x10000, 16, N, 1);
        put_desc(&m, T, 1, 0x20000, 4096, N | W, 2);
        put_desc(&m, T, 2, 0x30000, 1, W, 0);
        let c = walk(&m, GuestAddress(T), 8, 0, true, 8).unwrap();
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!(c.writable[1].len, 1);
    }

    #[test]
    fn loop_is_caught() {
        let m = memory();
        put_desc(&m, T, 0, 0x10000, 16, N, 1);
        put_desc(&m, T, 1, 0x10000, 16, N, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::TooLong(8))
        );
    }

    #[test]
    fn next_out_of_range() {
        let m = memory();
        put_desc(&m, T, 0, 0x10000, 16, N, 200);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::IndexOutOfRange(200))
        );
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 9, true, 8),
            Err(ChainError::IndexOutOfRange(9))
        );
    }

    #[test]
    fn readable_after_writable() {
        let m = memory();
        put_desc(&m, T, 0, 0x10000, 16, N | W, 1);
        put_desc(&m, T, 1, 0x20000, 16, 0, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::ReadableAfterWritable)
        );
    }

    #[test]
    fn table_outside_memory() {
        let m = memory();
        let far = (MEM_SIZE as u64) + 0x1000;
        assert!(matches!(
            walk(&m, GuestAddress(far), 8, 0, true, 8),
            Err(ChainError::TableNotInMemory(_))
        ));
        assert!(matches!(
            walk(&m, GuestAddress(u64::MAX - 8), 8, 1, true, 8),
            Err(ChainError::TableNotInMemory(_))
        ));
    }

    #[test]
    fn indirect_tables() {
        let m = memory();
        let it = 0x8000;
        put_desc(&m, it, 0, 0x10000, 16, N, 1);
        put_desc(&m, it, 1, 0x30000, 1, W, 0);
        put_desc(&m, T, 0, it, 32, VIRTQ_DESC_F_INDIRECT, 0);
        let c = walk(&m, GuestAddress(T), 8, 0, true, 8).unwrap();
        assert_eq!((c.readable.len(), c.writable.len()), (1, 1));
        // Not negotiated.
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, false, 8),
            Err(ChainError::BadIndirect)
        );
        // Bad length.
        put_desc(&m, T, 0, it, 20, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::BadIndirectLength(20))
        );
        put_desc(&m, T, 0, it, 0, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::BadIndirectLength(0))
        );
        // A table longer than any queue.
        put_desc(
            &m,
            T,
            0,
            it,
            16 * (MAX_INDIRECT + 1),
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::TooLong(MAX_INDIRECT as usize))
        );
        // Nested.
        put_desc(&m, T, 0, it, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&m, it, 1, it, 32, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::NestedIndirect)
        );
        // Indirect with NEXT.
        put_desc(&m, T, 0, it, 32, VIRTQ_DESC_F_INDIRECT | N, 1);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::BadIndirect)
        );
        // Loop inside an indirect table.
        put_desc(&m, T, 0, it, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&m, it, 1, 0x30000, 1, N, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::TooLong(2))
        );
    }

    #[test]
    fn over_four_gib_is_walked_and_left_to_the_request_checks() {
        let m = memory();
        put_desc(&m, T, 0, 0x10000, u32::MAX, N, 1);
        put_desc(&m, T, 1, 0x10000, u32::MAX, N, 2);
        put_desc(&m, T, 2, 0x10000, 16, W, 0);
        let c = walk(&m, GuestAddress(T), 8, 0, true, 8).unwrap();
        assert_eq!((c.readable.len(), c.writable.len()), (2, 1));
    }

    #[test]
    fn long_indirect_chains_keep_max_descs_buffers_and_the_status_last() {
        let m = memory();
        let it = 0x8000;
        const N_DESCS: u16 = 2000;
        put_desc(&m, it, 0, 0x10000, 16, N, 1);
        for i in 1..N_DESCS - 1 {
            put_desc(&m, it, i, 0x20000 + i as u64 * 8, 8, N | W, i + 1);
        }
        put_desc(&m, it, N_DESCS - 1, 0x30000, 1, W, 0);
        put_desc(&m, T, 0, it, 16 * N_DESCS as u32, VIRTQ_DESC_F_INDIRECT, 0);
        let c = walk(&m, GuestAddress(T), 256, 0, true, 256).unwrap();
        assert_eq!(c.readable.len() + c.writable.len(), 256);
        assert_eq!(c.excess, N_DESCS as usize - 256);
        assert_eq!(
            c.writable.last(),
            Some(&Buffer {
                addr: GuestAddress(0x30000),
                len: 1
            })
        );
        // A loop in a long table is still a loop.
        put_desc(&m, it, N_DESCS - 1, 0x30000, 1, N | W, 1);
        assert_eq!(
            walk(&m, GuestAddress(T), 256, 0, true, 256),
            Err(ChainError::TooLong(N_DESCS as usize))
        );
    }
}

//! Walking a descriptor chain the guest placed in a split virtqueue.
//!
//! Everything here is guest-controlled: table addresses, indices, lengths,
//! flags. The walk reads descriptors only through the guest memory map and
//! returns a precise error for each kind of malformed chain.

use vm_memory::GuestAddress;

use crate::vhost::memory::GuestRam;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
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
    #[error("chain data exceeds 4 GiB")]
    TooLarge,
}

/// One guest buffer: guest-physical address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into its device-readable and device-writable buffers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub readable: Vec<Buffer>,
    pub writable: Vec<Buffer>,
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
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
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    Ok(Desc {
        addr: le64(&raw[0..8]),
        len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        flags: u16::from_le_bytes([raw[12], raw[13]]),
        next: u16::from_le_bytes([raw[14], raw[15]]),
    })
}

/// Walk the chain starting at `head` in the table at `table` of `queue_size`
/// entries. At most `max_descs` descriptors are accepted in total.
pub fn walk(
    mem: &GuestRam,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_ok: bool,
    max_descs: usize,
) -> Result<Chain, ChainError> {
    let mut chain = Chain::default();
    let (mut table, mut size, mut idx) = (table, queue_size, head);
    let mut in_indirect = false;
    let mut count = 0usize;
    let mut total: u64 = 0;
    loop {
        if idx >= size {
            return Err(ChainError::IndexOutOfRange(idx));
        }
        count += 1;
        if count > max_descs {
            return Err(ChainError::TooLong(max_descs));
        }
        let d = read_desc(mem, table, idx)?;
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
            let entries = d.len as u64 / DESC_SIZE;
            if entries > max_descs as u64 {
                return Err(ChainError::TooLong(max_descs));
            }
            table = GuestAddress(d.addr);
            size = entries as u16;
            idx = 0;
            in_indirect = true;
            count = 0;
            continue;
        }
        total += d.len as u64;
        if total > u32::MAX as u64 {
            return Err(ChainError::TooLarge);
        }
        let buf = Buffer {
            addr: GuestAddress(d.addr),
            len: d.len,
        };
        if d.flags & VIRTQ_DESC_F_WRITE != 0 {
            if d.len > 0 {
                chain.writable.push(buf);
            }
        } else {
            if !chain.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            if d.len > 0 {
                chain.readable.push(buf);
            }
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(chain);
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
        // Huge table.
        put_desc(&m, T, 0, it, 16 * 4096, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::TooLong(8))
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
            Err(ChainError::TooLong(8))
        );
    }

    #[test]
    fn over_four_gib() {
        let m = memory();
        put_desc(&m, T, 0, 0x10000, u32::MAX, N, 1);
        put_desc(&m, T, 1, 0x10000, 16, W, 0);
        assert_eq!(
            walk(&m, GuestAddress(T), 8, 0, true, 8),
            Err(ChainError::TooLarge)
        );
    }
}

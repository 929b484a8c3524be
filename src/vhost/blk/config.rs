//! The virtio-blk device: feature bits and configuration space layout.

use std::mem::offset_of;

use virtio_bindings::bindings::virtio_blk::virtio_blk_config;
use vm_memory::ByteValued;

use super::request::{Limits, SECTOR_SIZE};

pub(crate) use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
pub(crate) use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
pub(crate) use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Byte offset of `writeback` (the bindings' `wce`) in struct virtio_blk_config.
pub(crate) const CONFIG_WRITEBACK_OFFSET: usize = offset_of!(virtio_blk_config, wce);
/// Size of struct virtio_blk_config up to and including write_zeroes_may_unmap
/// and its padding (the fields we implement; secure erase and zoned follow).
pub(crate) const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// struct virtio_blk_config as bytes: vm-memory's trait cannot be
/// implemented on the bindings' type itself.
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct ConfigSpace(virtio_blk_config);

// SAFETY: virtio_blk_config is repr(C, packed) and made only of integers
// and arrays of integers (its nested structs are repr(C) without padding),
// so it has no padding bytes and every bit pattern is valid; the wrapper
// is repr(transparent).
unsafe impl ByteValued for ConfigSpace {}

/// Largest single data segment we advertise (size_max).
pub(crate) const SIZE_MAX: u32 = 1 << 20;

/// Most data segments per request we advertise, whatever the queue size.
///
/// Every request in flight costs memory in proportion to its segments (its
/// kept descriptors, 16 bytes each, and its host iovec, 16 bytes a piece),
/// and a queue may hold up to 32768 requests, so seg_max must not grow with
/// the queue: `queue size − 2` would allow 32766 segments, about 1 MiB of
/// bookkeeping per request and 32 GiB per queue. 254 is what the default
/// 256-entry queue gives (queue minus header and status), so defaults are
/// unchanged; guests split larger requests themselves (Linux sizes its
/// requests by seg_max and size_max), and with size_max a request carries
/// up to 254 MiB, which no bounce buffer has to hold (they are chunked).
pub(crate) const SEG_MAX_CAP: u32 = 254;

/// seg_max for a queue of `queue_size` entries: the queue minus header and
/// status descriptors, at most [`SEG_MAX_CAP`].
pub(crate) fn seg_max_for(queue_size: u16) -> u32 {
    (queue_size as u32).saturating_sub(2).clamp(1, SEG_MAX_CAP)
}

/// Static properties of an exported disk.
#[derive(Clone, Debug)]
pub struct BlkGeometry {
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub limits: Limits,
}

impl BlkGeometry {
    /// Data segments per request the guest may use (see [`SEG_MAX_CAP`]).
    pub fn seg_max(&self) -> u32 {
        self.limits.seg_max
    }

    pub fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// struct virtio_blk_config for a disk of `capacity` bytes.
    pub fn config_space(&self, capacity: u64, writeback: bool) -> [u8; CONFIG_LEN] {
        let bs = self.limits.block_size;
        let config = virtio_blk_config {
            capacity: (capacity / SECTOR_SIZE).to_le(),
            size_max: self.limits.size_max.to_le(),
            seg_max: self.seg_max().to_le(),
            // geometry left zero: guests compute their own.
            blk_size: bs.to_le(),
            // Topology: a physical block is a logical one, no offset,
            // no preferred I/O size beyond one block.
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1u16.to_le(),
            opt_io_size: 0,
            wce: writeback as u8,
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: self.limits.max_discard_sectors.to_le(),
            max_discard_seg: self.limits.max_segments.to_le(),
            discard_sector_alignment: (bs / SECTOR_SIZE as u32).to_le(),
            max_write_zeroes_sectors: self.limits.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: self.limits.max_segments.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let mut c = [0u8; CONFIG_LEN];
        c.copy_from_slice(&ConfigSpace(config).as_slice()[..CONFIG_LEN]);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(read_only: bool) -> BlkGeometry {
        BlkGeometry {
            num_queues: 4,
            queue_size: 256,
            read_only,
            limits: Limits {
                block_size: 4096,
                size_max: SIZE_MAX,
                seg_max: seg_max_for(256),
                max_discard_sectors: 1 << 21,
                max_write_zeroes_sectors: 1 << 20,
                max_segments: 1,
                serial: [0; 20],
            },
        }
    }

    #[test]
    fn config_space_layout_matches_virtio_blk_config() {
        let c = geometry(false).config_space(10 << 30, true);
        let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (10 << 30) / 512
        );
        assert_eq!(u32_at(8), SIZE_MAX);
        assert_eq!(u32_at(12), 254, "seg_max = queue size - 2");
        assert_eq!((seg_max_for(2), seg_max_for(128)), (1, 126));
        assert_eq!(seg_max_for(32768), SEG_MAX_CAP, "capped for big queues");
        assert_eq!(u32_at(20), 4096, "blk_size");
        assert_eq!(c[CONFIG_WRITEBACK_OFFSET], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4, "num_queues");
        assert_eq!(u32_at(36), 1 << 21, "max_discard_sectors");
        assert_eq!(u32_at(40), 1, "max_discard_seg");
        assert_eq!(u32_at(44), 8, "discard_sector_alignment in sectors");
        assert_eq!(u32_at(48), 1 << 20, "max_write_zeroes_sectors");
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
        assert_eq!(u32_at(52), 1, "max_write_zeroes_seg");
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 1, "min_io_size");
        assert_eq!(
            (CONFIG_WRITEBACK_OFFSET, CONFIG_LEN),
            (32, 60),
            "the virtio spec's offsets"
        );
        assert_eq!(
            geometry(false).config_space(1 << 20, false)[CONFIG_WRITEBACK_OFFSET],
            0
        );
    }

    #[test]
    fn read_only_devices_offer_ro_and_no_discard() {
        let f = geometry(true).features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        let f = geometry(false).features();
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    }
}

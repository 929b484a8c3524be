//! Reading zlib-compressed clusters (`qemu-img convert -c`). Writing them
//! is not supported.

use std::io;

use miniz_oxide::inflate::{decompress_slice_iter_to_slice, TINFLStatus};

use super::cache::read_bytes;
use crate::formats::ChildRef;

/// Host byte offset and length of the compressed data an L2 entry names.
pub(super) fn locate(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let extra_sectors = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
    // The data runs to the end of the last sector it touches.
    let len = (extra_sectors + 1) * 512 - (offset % 512);
    (offset, len)
}

/// Read and inflate one compressed cluster.
pub(super) async fn read_cluster(
    file: &ChildRef,
    entry: u64,
    cluster_bits: u32,
) -> io::Result<Vec<u8>> {
    let (offset, len) = locate(entry, cluster_bits);
    // The last compressed cluster may end in a partial sector at end of file.
    let len = len.min(file.size().saturating_sub(offset));
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("compressed cluster at {offset:#x} is outside the image"),
        ));
    }
    let raw = read_bytes(file, offset, len as usize).await?;
    let mut out = vec![0u8; 1 << cluster_bits];
    // Decompression stops once a whole cluster came out.
    match decompress_slice_iter_to_slice(&mut out, std::iter::once(raw.as_slice()), false, true) {
        Ok(n) if n == out.len() => Ok(out),
        Err(TINFLStatus::HasMoreOutput) => Ok(out),
        r => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("compressed cluster at {offset:#x} does not inflate to a cluster ({r:?})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::locate;

    #[test]
    fn descriptor_fields() {
        // 64 KiB clusters: x = 54; offset in bits 0-53, sectors above.
        let entry = (3u64 << 54) | 0x1_0200;
        assert_eq!(locate(entry, 16), (0x1_0200, 4 * 512));
        let entry = 0x1_0210; // no extra sectors
        assert_eq!(locate(entry, 16), (0x1_0210, 512 - 0x10));
    }
}

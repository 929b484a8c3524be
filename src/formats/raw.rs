//! `raw`: the identity format. Byte offsets pass straight to the child.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use super::driver::{failed, BlockDriver, BlockIo, ChildRef, IoFuture};
use crate::error::Error;
use crate::uring::{AlignedBuf, IoVec};

/// The bytes a format probe looks at: the first sector.
const PROBE_LEN: usize = 512;

pub(crate) struct RawDriver {
    file: ChildRef,
    read_only: AtomicBool,
    /// The format was probed, not given: the guest must not make the image
    /// probe as something else (QEMU's rule since CVE-2008-2004).
    probed: bool,
    /// QEMU's raw `offset`: where the disk starts in the file.
    offset: u64,
    /// QEMU's raw `size`; None: the rest of the file.
    size: Option<u64>,
}

impl RawDriver {
    pub(crate) fn new(file: ChildRef, read_only: bool) -> Self {
        RawDriver {
            file,
            read_only: AtomicBool::new(read_only),
            probed: false,
            offset: 0,
            size: None,
        }
    }

    /// A raw driver over `size` bytes (default: the rest) of `file` from
    /// `offset` on, both multiples of 512 and inside the file.
    pub(crate) fn window(
        file: ChildRef,
        read_only: bool,
        offset: u64,
        size: Option<u64>,
    ) -> Result<Self, Error> {
        let len = file.size();
        if !offset.is_multiple_of(512) || size.is_some_and(|s| !s.is_multiple_of(512)) {
            return Err(Error::invalid(
                "raw offset and size must be multiples of 512",
            ));
        }
        if offset > len || size.is_some_and(|s| s > len - offset) {
            return Err(Error::invalid(format!(
                "offset {offset} and size {size:?} reach past the end of the file ({len} bytes)"
            )));
        }
        Ok(RawDriver {
            offset,
            size,
            ..Self::new(file, read_only)
        })
    }

    /// Run `op` at the file offset of `len` bytes at `offset`, which the
    /// caller checked against `size()` (checked again: a window must never
    /// be left).
    fn in_window<'a>(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce(u64) -> IoFuture<'a>,
    ) -> IoFuture<'a> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => op(self.offset + offset),
            _ => failed(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are outside the raw node's {} bytes",
                    self.size()
                ),
            )),
        }
    }

    /// A raw driver over an image whose format was probed as raw.
    pub(crate) fn probed(file: ChildRef, read_only: bool) -> Self {
        RawDriver {
            probed: true,
            ..Self::new(file, read_only)
        }
    }

    /// A write to the first sector of a probed image: the sector is copied
    /// out of the guest's buffer first (so the guest cannot change it after
    /// the check) and refused if it would make the image look like a format
    /// that names other files.
    async fn write_probed_head(&self, offset: u64, buf: &IoVec) -> io::Result<()> {
        if offset != 0 || buf.len() < PROBE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "write of {} bytes at {offset} changes part of sector 0 of an image whose format was probed",
                    buf.len()
                ),
            ));
        }
        let mut head = AlignedBuf::zeroed(PROBE_LEN, 4096);
        buf.slice(0, PROBE_LEN).copy_to(head.as_mut_slice());
        if let Some(format) = names_other_files(head.as_slice()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refused a write that makes sector 0 of an image whose format was probed as raw look like {format}; give the format explicitly to allow it"),
            ));
        }
        let head = IoVec::from_buf(head);
        let data = IoVec::concat(&[&head, &buf.tail(PROBE_LEN)]);
        self.file.write(0, &data).await
    }
}

/// Which image format, if any, whose headers can name other host files
/// (backing files, extents) `sector` would be probed as. QEMU probes these
/// by the first sector; ringblk probes only qcow2, but an image a guest
/// turned into one of them is dangerous to whoever probes it next.
pub(crate) fn names_other_files(sector: &[u8]) -> Option<&'static str> {
    const MAGICS: [(&[u8], &str); 4] = [
        (b"QFI\xfb", "qcow/qcow2"),
        (b"QED\0", "QED"),
        (b"KDMV", "VMDK"),
        (b"COWD", "VMDK"),
    ];
    if let Some((_, name)) = MAGICS.iter().find(|(m, _)| sector.starts_with(m)) {
        return Some(name);
    }
    // A VMDK text descriptor names its extents' files.
    let has = |needle: &[u8]| sector.windows(needle.len()).any(|w| w == needle);
    if has(b"createType=") && has(b"version=") {
        return Some("a VMDK descriptor");
    }
    None
}

impl BlockIo for RawDriver {
    fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.file.size().saturating_sub(self.offset))
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.in_window(offset, buf.len() as u64, |at| self.file.read(at, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        if self.probed && offset < PROBE_LEN as u64 && !buf.is_empty() {
            return Box::pin(self.write_probed_head(offset, buf));
        }
        self.in_window(offset, buf.len() as u64, |at| self.file.write(at, buf))
    }
    fn flush(&self) -> IoFuture<'_> {
        self.file.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.in_window(offset, len, |at| self.file.discard(at, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.in_window(offset, len, |at| self.file.write_zeroes(at, len, may_unmap))
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        if self.offset != 0 || self.size.is_some() {
            return failed(io::Error::new(
                io::ErrorKind::Unsupported,
                "a raw node with an offset or size cannot be resized",
            ));
        }
        self.file.grow(new_size)
    }
}

impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }
    fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    fn reopen(&self, read_only: bool) -> Result<(), Error> {
        // The graph reopens the file child; raw itself only checks.
        self.read_only.store(read_only, Ordering::Release);
        Ok(())
    }
    fn close(&self) -> io::Result<()> {
        // The child node closes itself when its last reference goes.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_that_name_files_are_recognised() {
        let mut s = [0u8; 512];
        assert_eq!(names_other_files(&s), None);
        s[..4].copy_from_slice(b"QFI\xfb");
        assert_eq!(names_other_files(&s), Some("qcow/qcow2"));
        s[..4].copy_from_slice(b"KDMV");
        assert_eq!(names_other_files(&s), Some("VMDK"));
        let text = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"/etc/shadow\" 0\n";
        let mut t = [0u8; 512];
        t[..text.len()].copy_from_slice(text);
        assert_eq!(names_other_files(&t), Some("a VMDK descriptor"));
        // A boot sector or a partition table is fine.
        let mut mbr = [0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(names_other_files(&mbr), None);
    }
}

//! `raw`: the identity format. Byte offsets pass straight to the child.

use std::io;

use super::driver::{BlockDriver, BlockIo, ChildRef, IoFuture};
use crate::uring::IoVec;

pub struct RawDriver {
    file: ChildRef,
    read_only: bool,
}

impl RawDriver {
    pub fn new(file: ChildRef, read_only: bool) -> Self {
        RawDriver { file, read_only }
    }
}

impl BlockIo for RawDriver {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.file.read(offset, buf)
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.file.write(offset, buf)
    }
    fn flush(&self) -> IoFuture<'_> {
        self.file.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.file.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.file.write_zeroes(offset, len, may_unmap)
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        self.file.grow(new_size)
    }
}

impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn close(&self) -> io::Result<()> {
        // The child node closes itself when its last reference goes.
        Ok(())
    }
}

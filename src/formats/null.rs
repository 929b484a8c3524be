//! `null`: no storage at all. Reads return zeros, writes are dropped. The
//! baseline for measuring the data path (QEMU's null-co).

use std::io;

use super::driver::{BlockDriver, BlockIo, IoFuture};
use crate::uring::IoVec;

pub(crate) struct NullDriver {
    size: u64,
}

impl NullDriver {
    pub(crate) fn new(size: u64) -> Self {
        NullDriver { size }
    }
}

/// A future that is done at once. Zero-sized, so boxing it allocates
/// nothing (`std::future::Ready` holds its output and would allocate on
/// every request).
struct Done;

impl std::future::Future for Done {
    type Output = io::Result<()>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

fn ready<'a>() -> IoFuture<'a> {
    Box::pin(Done)
}

impl BlockIo for NullDriver {
    fn size(&self) -> u64 {
        self.size
    }
    fn read<'a>(&'a self, _offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        buf.fill_zero();
        ready()
    }
    fn write<'a>(&'a self, _offset: u64, _buf: &'a IoVec) -> IoFuture<'a> {
        ready()
    }
    fn flush(&self) -> IoFuture<'_> {
        ready()
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_> {
        ready()
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_> {
        ready()
    }
}

impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

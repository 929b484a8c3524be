//! Async I/O operations on the current iothread's ring.
//!
//! Each returns the kernel's result as `io::Result`. Buffers are moved into
//! the operation's slot, so they outlive the kernel's use even if the future
//! is dropped early.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types};

use super::executor::with_reactor;
use super::iovec::IoVec;

fn to_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Owned copy of an iovec array plus whatever keeps its buffers mapped.
struct IovKeep {
    iov: Box<[libc::iovec]>,
    _keep: Option<super::iovec::KeepAlive>,
}

fn keep_iov(buf: &IoVec) -> Box<IovKeep> {
    Box::new(IovKeep {
        iov: buf.iovecs().into(),
        _keep: buf.keepalive().cloned(),
    })
}

/// One readv/writev at `offset`; returns the byte count (may be short).
async fn rw_once(fd: RawFd, buf: &IoVec, offset: u64, write: bool) -> io::Result<usize> {
    let keep = keep_iov(buf);
    let (ptr, n) = (keep.iov.as_ptr(), keep.iov.len() as u32);
    let entry = if write {
        opcode::Writev::new(types::Fd(fd), ptr, n)
            .offset(offset)
            .build()
    } else {
        opcode::Readv::new(types::Fd(fd), ptr, n)
            .offset(offset)
            .build()
    };
    let op = with_reactor(|r| r.start(entry, Some(keep)));
    to_result(op.await)
}

/// Read the whole of `buf` from `fd` at `offset`. Hitting end of file is an
/// error (`UnexpectedEof`); short reads are resumed.
pub async fn readv(fd: RawFd, buf: &IoVec, offset: u64) -> io::Result<()> {
    rw_full(fd, buf, offset, false).await
}

/// Write the whole of `buf` to `fd` at `offset`; short writes are resumed.
pub async fn writev(fd: RawFd, buf: &IoVec, offset: u64) -> io::Result<()> {
    rw_full(fd, buf, offset, true).await
}

async fn rw_full(fd: RawFd, buf: &IoVec, offset: u64, write: bool) -> io::Result<()> {
    let mut done = rw_once(fd, buf, offset, write).await?;
    if done == buf.len() {
        return Ok(());
    }
    // Rare: a short transfer. Continue with the remaining tail.
    while done < buf.len() {
        if done == 0 && !write {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let rest = buf.tail(done);
        let n = rw_once(fd, &rest, offset + done as u64, write).await?;
        if n == 0 {
            return Err(if write {
                io::ErrorKind::WriteZero.into()
            } else {
                io::ErrorKind::UnexpectedEof.into()
            });
        }
        done += n;
    }
    Ok(())
}

/// fsync (`datasync == false`) or fdatasync.
pub async fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    let mut e = opcode::Fsync::new(types::Fd(fd));
    if datasync {
        e = e.flags(types::FsyncFlags::DATASYNC);
    }
    let op = with_reactor(|r| r.start(e.build(), None));
    to_result(op.await).map(|_| ())
}

/// fallocate(fd, mode, offset, len): punch hole, zero range, allocate.
pub async fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let e = opcode::Fallocate::new(types::Fd(fd), len)
        .offset(offset)
        .mode(mode)
        .build();
    let op = with_reactor(|r| r.start(e, None));
    to_result(op.await).map(|_| ())
}

/// Wait until an eventfd is signalled (reading resets its counter). This is
/// how kicks and other notifications reach a task.
pub async fn read_eventfd(fd: RawFd) -> io::Result<()> {
    let buf = Box::new(0u64);
    let ptr = &*buf as *const u64 as *mut u8;
    let e = opcode::Read::new(types::Fd(fd), ptr, 8).build();
    let op = with_reactor(|r| r.start(e, Some(buf as Box<dyn std::any::Any>)));
    match to_result(op.await)? {
        8 => Ok(()),
        _ => Err(io::Error::other("short eventfd read")),
    }
}

/// Wait until `fd` is readable (POLLIN).
pub async fn wait_readable(fd: RawFd) -> io::Result<()> {
    let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
    let op = with_reactor(|r| r.start(e, None));
    to_result(op.await).map(|_| ())
}

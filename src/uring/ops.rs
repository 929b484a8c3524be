//! Async I/O operations on the current iothread's ring.
//!
//! Each returns the kernel's result as `io::Result`. Buffers are moved into
//! the operation's slot, so they outlive the kernel's use even if the future
//! is dropped early.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types};

use super::executor::with_reactor;
use super::iovec::{IoVec, IOV_MAX};

fn to_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// When a read's or write's SQE goes to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Submit {
    /// With the rest of the loop turn's, in one system call: for work the
    /// kernel does inline (buffered I/O on the page cache), where batching
    /// saves system calls and delays nothing.
    WithTurn,
    /// At once: for I/O a device then works on while we go on (O_DIRECT).
    /// Held until the end of the turn, a kick's worth of requests reached
    /// a virtio disk in one burst, the first having waited while we
    /// parsed the rest: at QD32, 14% fewer reads and half the writes per
    /// second than submitting each at once (as fio does), which costs one
    /// system call per request.
    Now,
    /// Not through the ring: a plain preadv/pwritev on the calling thread.
    /// For memory-backed files (tmpfs), where the kernel only copies pages
    /// but io_uring, lacking non-blocking support there, hands every write
    /// to a worker thread and pays a thread wake-up for a microsecond's copy.
    Inline,
}

/// One readv/writev at `offset`; returns the byte count (may be short).
async fn rw_once(
    fd: RawFd,
    buf: &IoVec,
    offset: u64,
    write: bool,
    submit: Submit,
) -> io::Result<usize> {
    if buf.iovecs().len() > IOV_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} iovec pieces, at most {IOV_MAX}", buf.iovecs().len()),
        ));
    }
    if !write && !buf.is_writable() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "read into a read-only buffer",
        ));
    }
    if submit == Submit::Inline {
        return rw_inline(fd, buf, offset, write);
    }
    let op = with_reactor(|r| {
        let op = r.start_vectored(buf, |ptr, n| {
            if write {
                opcode::Writev::new(types::Fd(fd), ptr, n)
                    .offset(offset)
                    .build()
            } else {
                opcode::Readv::new(types::Fd(fd), ptr, n)
                    .offset(offset)
                    .build()
            }
        });
        if submit == Submit::Now {
            r.submit_now();
        }
        op
    });
    to_result(op.await)
}

/// One preadv/pwritev on the calling thread (see [`Submit::Inline`]).
fn rw_inline(fd: RawFd, buf: &IoVec, offset: u64, write: bool) -> io::Result<usize> {
    let iov = buf.iovecs();
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
    loop {
        // SAFETY: `iov` describes memory `buf` keeps alive for the call, at
        // most IOV_MAX pieces (checked by the caller); a read writes only
        // into a buffer the caller checked is writable.
        let n = unsafe {
            if write {
                libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, offset)
            } else {
                libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, offset)
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One read into `buf` at `offset`; returns how many bytes arrived (short
/// at end of file).
pub(crate) async fn read_some(
    fd: RawFd,
    buf: &IoVec,
    offset: u64,
    submit: Submit,
) -> io::Result<usize> {
    rw_once(fd, buf, offset, false, submit).await
}

/// Read the whole of `buf` from `fd` at `offset`. Hitting end of file is an
/// error (`UnexpectedEof`); short reads are resumed.
pub(crate) async fn readv(fd: RawFd, buf: &IoVec, offset: u64, submit: Submit) -> io::Result<()> {
    rw_full(fd, buf, offset, false, submit).await
}

/// Write the whole of `buf` to `fd` at `offset`; short writes are resumed.
pub(crate) async fn writev(fd: RawFd, buf: &IoVec, offset: u64, submit: Submit) -> io::Result<()> {
    rw_full(fd, buf, offset, true, submit).await
}

/// The whole of `buf`, in as many system calls as it takes: short
/// transfers are resumed, and a list of more than [`IOV_MAX`] pieces goes
/// [`IOV_MAX`] pieces at a time. The common case (one call, all done)
/// allocates nothing beyond the operation itself.
async fn rw_full(
    fd: RawFd,
    buf: &IoVec,
    offset: u64,
    write: bool,
    submit: Submit,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest;
        let cur = if done == 0 {
            buf
        } else {
            rest = buf.tail(done);
            &rest
        };
        let window = cur.first_pieces(IOV_MAX);
        let n = rw_once(
            fd,
            window.as_ref().unwrap_or(cur),
            offset + done as u64,
            write,
            submit,
        )
        .await?;
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
pub(crate) async fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    let mut e = opcode::Fsync::new(types::Fd(fd));
    if datasync {
        e = e.flags(types::FsyncFlags::DATASYNC);
    }
    let op = with_reactor(|r| r.start(e.build(), None));
    to_result(op.await).map(|_| ())
}

/// fallocate(fd, mode, offset, len): punch hole, zero range, allocate.
pub(crate) async fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let e = opcode::Fallocate::new(types::Fd(fd), len)
        .offset(offset)
        .mode(mode)
        .build();
    let op = with_reactor(|r| r.start(e, None));
    to_result(op.await).map(|_| ())
}

/// Wait until an eventfd is signalled (reading resets its counter). This is
/// how kicks and other notifications reach a task. `owner` (the file, say)
/// (`()` for none) is kept until the kernel is done with the fd, so its
/// number cannot be reused under the operation. Dropping the future cancels the wait.
pub(crate) async fn read_eventfd(fd: RawFd, owner: impl std::any::Any) -> io::Result<()> {
    let buf = Box::new(0u64);
    let ptr = &*buf as *const u64 as *mut u8;
    let e = opcode::Read::new(types::Fd(fd), ptr, 8).build();
    let keep: Box<dyn std::any::Any> = Box::new((buf, owner));
    let op = with_reactor(|r| r.start(e, Some(keep))).cancel_on_drop();
    match to_result(op.await)? {
        8 => Ok(()),
        _ => Err(io::Error::other("short eventfd read")),
    }
}

/// Add 1 to an eventfd without ever waiting, whatever its O_NONBLOCK flag
/// (which a frontend sharing the eventfd can clear at any time): the write
/// goes through the ring with RWF_NOWAIT, so the kernel neither sleeps in
/// it nor hands it to a worker thread; a write that would wait fails with
/// EAGAIN instead (on an eventfd without O_NONBLOCK, always). The write is
/// submitted at once (one system call, as a plain write(2) would be), not
/// at the end of the loop turn: a notification is for someone waiting.
/// Dropping the returned future lets it complete on its own. `owner` as
/// for [`read_eventfd`].
pub(crate) fn signal_eventfd_nowait(
    fd: RawFd,
    owner: impl std::any::Any,
) -> impl std::future::Future<Output = io::Result<()>> {
    /// What every signal adds; the kernel only reads it.
    static ONE: u64 = 1;
    let ptr = &ONE as *const u64 as *const u8;
    let e = opcode::Write::new(types::Fd(fd), ptr, 8)
        .rw_flags(libc::RWF_NOWAIT)
        .build();
    let keep: Box<dyn std::any::Any> = Box::new(owner);
    let op = with_reactor(|r| {
        let op = r.start(e, Some(keep));
        r.submit_now();
        op
    });
    async move {
        match to_result(op.await)? {
            8 => Ok(()),
            _ => Err(io::Error::other("short eventfd write")),
        }
    }
}

/// Sleep on the ring until `deadline` (CLOCK_MONOTONIC, as `Instant`): a
/// timer that costs no thread, and wakes the iothread by a completion like
/// any other. Returns at once if the deadline has passed. Dropping the
/// future cancels the timer.
pub(crate) async fn sleep_until(deadline: std::time::Instant) -> io::Result<()> {
    let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
        return Ok(());
    };
    // A relative timeout: the kernel measures it on CLOCK_MONOTONIC, the
    // clock `Instant` reads.
    let ts = Box::new(types::Timespec::from(left));
    let ptr = &*ts as *const types::Timespec;
    let e = opcode::Timeout::new(ptr).build();
    let keep: Box<dyn std::any::Any> = Box::new(ts);
    let op = with_reactor(|r| r.start(e, Some(keep))).cancel_on_drop();
    match op.await {
        // The timer expired: the one way it is meant to end.
        r if r == -libc::ETIME => Ok(()),
        r => to_result(r).map(|_| ()),
    }
}

/// Wait until `fd` is readable (POLLIN); `owner` as for [`read_eventfd`].
/// Dropping the future cancels the wait.
pub(crate) async fn wait_readable(fd: RawFd, owner: impl std::any::Any) -> io::Result<()> {
    let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
    let keep: Box<dyn std::any::Any> = Box::new(owner);
    let op = with_reactor(|r| r.start(e, Some(keep))).cancel_on_drop();
    to_result(op.await).map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::uring::{AlignedBuf, IoThread};

    #[test]
    fn sleep_until_waits_for_its_deadline_on_the_ring() {
        let t = IoThread::start("sleep-test", Duration::ZERO).unwrap();
        let start = std::time::Instant::now();
        let slept = t
            .handle()
            .block_on(move || async move { sleep_until(start + Duration::from_millis(30)).await });
        slept.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
        // A deadline already past returns at once.
        let past = t
            .handle()
            .block_on(move || async move { sleep_until(start).await });
        past.unwrap();
        t.stop();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ringblk-ops-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn create(path: &std::path::Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writev_then_readv_round_trip_and_fsync() {
        let path = scratch("rw");
        let f = Arc::new(create(&path));
        let t = IoThread::start("ops-test", Duration::ZERO).unwrap();
        let file = f.clone();
        let out = t.handle().block_on(move || async move {
            let mut src = AlignedBuf::zeroed(8192, 4096);
            src.as_mut_slice()
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = i as u8);
            writev(
                file.as_raw_fd(),
                &IoVec::from_buf(src),
                4096,
                Submit::WithTurn,
            )
            .await
            .unwrap();
            fsync(file.as_raw_fd(), true).await.unwrap();
            fsync(file.as_raw_fd(), false).await.unwrap();
            let dst = IoVec::from_buf(AlignedBuf::zeroed(8192, 4096));
            readv(file.as_raw_fd(), &dst, 4096, Submit::Now)
                .await
                .unwrap();
            dst.into_buf().unwrap().as_slice().to_vec()
        });
        assert!(out.iter().enumerate().all(|(i, &b)| b == i as u8));
        let mut on_disk = vec![0u8; 8192];
        let mut g = File::open(&path).unwrap();
        g.seek(SeekFrom::Start(4096)).unwrap();
        g.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk, out);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn lists_longer_than_iov_max_go_in_several_calls() {
        let path = scratch("iovmax");
        let f = Arc::new(create(&path));
        let t = IoThread::start("ops-iovmax", Duration::ZERO).unwrap();
        let file = f.clone();
        // 2,500 pieces of 3 bytes, each from a different place in the buffer.
        const PIECES: usize = 2500;
        let out = t.handle().block_on(move || async move {
            let mut src = AlignedBuf::zeroed(PIECES * 4, 4096);
            for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let src = IoVec::from_buf(src);
            let parts: Vec<IoVec> = (0..PIECES).map(|i| src.slice(i * 4, 3)).collect();
            let list = IoVec::concat(&parts.iter().collect::<Vec<_>>());
            assert_eq!(list.iovecs().len(), PIECES);
            writev(file.as_raw_fd(), &list, 100, Submit::WithTurn)
                .await
                .unwrap();
            let dst = IoVec::from_buf(AlignedBuf::zeroed(PIECES * 4, 4096));
            let dparts: Vec<IoVec> = (0..PIECES).map(|i| dst.slice(i * 4, 3)).collect();
            let dlist = IoVec::concat(&dparts.iter().collect::<Vec<_>>());
            readv(file.as_raw_fd(), &dlist, 100, Submit::WithTurn)
                .await
                .unwrap();
            drop((dlist, dparts));
            dst.into_buf().unwrap().as_slice().to_vec()
        });
        for (i, b) in out.iter().enumerate() {
            let want = if i % 4 == 3 { 0 } else { (i % 251) as u8 };
            assert_eq!(*b, want, "byte {i}");
        }
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 100 + PIECES * 3);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_read_dropped_before_submission_still_lands_in_memory_its_slot_keeps() {
        use std::cell::UnsafeCell;
        use std::future::Future;
        use std::rc::Rc;
        use std::task::{Context, Waker};

        let path = scratch("dropped");
        std::fs::write(&path, [0x5au8; 4096]).unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        let t = IoThread::start("ops-dropped", Duration::ZERO).unwrap();
        let (data, decoy) = t.handle().block_on(move || async move {
            let fd = f.as_raw_fd();
            // Where the read goes; the list's keep-alive is a clone.
            let mem = Rc::new(UnsafeCell::new([0u8; 4096]));
            let keep: super::super::iovec::KeepAlive = mem.clone();
            let iov = vec![libc::iovec {
                iov_base: mem.get().cast(),
                iov_len: 4096,
            }];
            // SAFETY: `mem` stays valid while `keep` lives, and is read
            // below only once the kernel is done with it.
            let list = unsafe { IoVec::from_raw(iov, Some(keep)) };
            {
                let mut read = std::pin::pin!(read_some(fd, &list, 0, Submit::WithTurn));
                // One poll queues the SQE; it goes to the kernel with the turn.
                let mut cx = Context::from_waker(Waker::noop());
                assert!(read.as_mut().poll(&mut cx).is_pending());
            }
            drop(list);
            // A new list of the same size likely takes the freed one's
            // memory: a kernel reading the freed array would fill `decoy`.
            let decoy = Rc::new(UnsafeCell::new([0u8; 4096]));
            let scribble = vec![libc::iovec {
                iov_base: decoy.get().cast(),
                iov_len: 4096,
            }];
            assert_eq!(Rc::strong_count(&mem), 2, "the slot keeps the memory");
            // Each awaited read goes through the ring's wait, which reaps
            // the abandoned read's completion too.
            let probe = IoVec::from_buf(AlignedBuf::zeroed(512, 512));
            for _ in 0..1000 {
                if Rc::strong_count(&mem) == 1 {
                    break;
                }
                read_some(fd, &probe, 0, Submit::Now).await.unwrap();
            }
            assert_eq!(Rc::strong_count(&mem), 1, "the slot let the memory go");
            drop(scribble);
            // SAFETY: the kernel is done with both buffers.
            unsafe { ((*mem.get()).to_vec(), (*decoy.get()).to_vec()) }
        });
        assert!(data.iter().all(|&b| b == 0x5a), "the read landed");
        assert!(decoy.iter().all(|&b| b == 0), "nothing read the freed list");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reading_past_end_of_file_is_an_error() {
        let path = scratch("eof");
        File::create(&path).unwrap().write_all(&[1u8; 512]).unwrap();
        let f = Arc::new(File::open(&path).unwrap());
        let t = IoThread::start("ops-eof", Duration::ZERO).unwrap();
        let r = t.handle().block_on(move || async move {
            let buf = AlignedBuf::zeroed(4096, 512);
            readv(f.as_raw_fd(), &IoVec::from_buf(buf), 0, Submit::WithTurn)
                .await
                .map_err(|e| e.kind())
        });
        assert_eq!(r, Err(io::ErrorKind::UnexpectedEof));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fallocate_punches_a_hole() {
        let path = scratch("punch");
        File::create(&path)
            .unwrap()
            .write_all(&[7u8; 65536])
            .unwrap();
        let f = Arc::new(File::options().read(true).write(true).open(&path).unwrap());
        let t = IoThread::start("ops-punch", Duration::ZERO).unwrap();
        let g = f.clone();
        let r = t.handle().block_on(move || async move {
            fallocate(
                g.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                8192,
            )
            .await
        });
        if let Err(e) = &r {
            // tmp filesystems without hole punching are allowed to refuse.
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
            return;
        }
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 65536);
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert!(data[..4096].iter().chain(&data[12288..]).all(|&b| b == 7));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn eventfd_signal_never_waits_whatever_the_flags() {
        let t = IoThread::start("ops-nowait", Duration::ZERO).unwrap();
        for (nonblock, saturated) in [(true, false), (true, true), (false, true), (false, false)] {
            let flags = libc::EFD_CLOEXEC | if nonblock { libc::EFD_NONBLOCK } else { 0 };
            // SAFETY: plain syscall; checked.
            let fd = unsafe { libc::eventfd(0, flags) };
            assert!(fd >= 0);
            if saturated {
                let v = u64::MAX - 1;
                // SAFETY: 8-byte write from a valid u64.
                let n = unsafe { libc::write(fd, &v as *const u64 as *const libc::c_void, 8) };
                assert_eq!(n, 8);
            }
            let r = t
                .handle()
                .block_on(move || signal_eventfd_nowait(fd, ()))
                .map_err(|e| e.raw_os_error());
            if saturated || !nonblock {
                assert_eq!(r, Err(Some(libc::EAGAIN)), "nonblock {nonblock}");
            } else {
                assert_eq!(r, Ok(()));
            }
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn eventfd_wait_and_cross_thread_wake() {
        // SAFETY: plain syscall; checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        let t = IoThread::start("ops-eventfd", Duration::ZERO).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        t.handle().run(move || {
            crate::uring::spawn(async move {
                let r = read_eventfd(fd, ()).await;
                tx.send(r.is_ok()).unwrap();
            })
        });
        // The task is parked in the ring until another thread signals.
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        let one = 1u64;
        // SAFETY: 8-byte write from a valid u64.
        assert_eq!(
            unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) },
            8
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    }
}

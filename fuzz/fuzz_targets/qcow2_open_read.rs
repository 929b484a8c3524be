//! Arbitrary bytes as a qcow2 image: open it (read-only and writable), read
//! and write a few ranges. Any panic, hang or huge allocation is a bug; open
//! errors and I/O errors are the expected outcome for garbage.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use ringblk::formats::qcow2::{Qcow2Driver, Qcow2Options};
use ringblk::formats::{BlockIo, ChildRef, IoFuture};
use ringblk::uring::{AlignedBuf, IoVec};

/// The image file, in memory (a stand-in for the file driver below qcow2).
struct MemFile(Mutex<Vec<u8>>);

impl BlockIo for MemFile {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        let data = self.0.lock().unwrap();
        let end = offset.checked_add(buf.len() as u64);
        let r = match end {
            Some(end) if end <= data.len() as u64 => {
                buf.copy_from(&data[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        };
        Box::pin(std::future::ready(r))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        let mut data = self.0.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > 64 << 20 {
            return Box::pin(std::future::ready(Err(io::Error::other(
                "fuzz file size limit",
            ))));
        }
        if data.len() < end {
            data.resize(end, 0);
        }
        buf.copy_to(&mut data[offset as usize..end]);
        Box::pin(std::future::ready(Ok(())))
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

const OPTS: Qcow2Options = Qcow2Options {
    l2_cache_bytes: 1 << 20,
    refcount_cache_bytes: 1 << 20,
};

fuzz_target!(|data: &[u8]| {
    if data.len() > 4 << 20 {
        return;
    }
    for writable in [false, true] {
        let file: ChildRef = Arc::new(MemFile(Mutex::new(data.to_vec())));
        let _ = ringblk::uring::block_on(|| async {
            let Ok(q) = Qcow2Driver::open("fuzz", file.clone(), None, !writable, OPTS).await else {
                return;
            };
            let size = q.size();
            let buf = IoVec::from_buf(AlignedBuf::zeroed(65536, 4096));
            for i in 0..8u64 {
                let off = (size / 8 * i) & !511;
                let len = (size - off).min(65536) as usize & !511;
                if len == 0 {
                    continue;
                }
                let part = buf.slice(0, len);
                let _ = q.read(off, &part).await;
                if writable {
                    let _ = q.write(off, &part).await;
                    let _ = q.write_zeroes(off, len as u64, i % 2 == 0).await;
                }
            }
            let _ = q.flush().await;
        });
    }
});

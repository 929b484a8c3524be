//! The driver trait every format and protocol driver implements.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::Error;
use crate::uring::IoVec;

/// A request in flight on the current iothread.
pub type IoFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + 'a>>;

/// Lets the graph recognise one of its own nodes behind a `dyn BlockIo`
/// (see [`BlockDriver::passes_to`]). Implemented for every type.
pub trait AsAny {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The I/O interface shared by drivers and by the graph's nodes.
///
/// Offsets and lengths are bytes; callers (the BlockBackend) have already
/// checked them against `size()`. Futures run on the caller's iothread and
/// submit to that thread's ring.
pub trait BlockIo: AsAny + Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a>;
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a>;
    /// A format driver's own metadata (tables, header), which guest
    /// requests wait for: as `write`, done however is quickest for a short
    /// write the caller waits on.
    fn write_metadata<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.write(offset, buf)
    }
    /// A format driver's metadata stored at once, where a store is as good
    /// as a completed write (a file in memory, through a shared mapping),
    /// so the caller needs neither a buffer of its own nor a future. None:
    /// not here, use `write_metadata`.
    fn store_metadata(&self, offset: u64, bytes: &[u8]) -> Option<io::Result<()>> {
        let _ = (offset, bytes);
        None
    }
    /// Size (and alignment) of the smallest write this node takes as it is,
    /// without a read-modify-write: the unit a format driver writes its
    /// tables back in.
    fn write_granularity(&self) -> usize {
        4096
    }
    /// Make every completed write durable.
    fn flush(&self) -> IoFuture<'_>;
    /// Hint that a range is unused; its contents become unspecified.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_>;
    /// Make a range read as zeros; `may_unmap` allows freeing its storage.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_>;
    /// Grow to `new_size` bytes. Drivers that cannot, say so.
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        let _ = new_size;
        failed(io::Error::new(
            io::ErrorKind::Unsupported,
            "this driver cannot be resized",
        ))
    }
}

/// A request that fails before it starts.
pub(crate) fn failed<'a>(e: io::Error) -> IoFuture<'a> {
    Box::pin(std::future::ready(Err(e)))
}

/// A child a format driver reads through (in the graph: a child edge's node).
pub type ChildRef = Arc<dyn BlockIo>;

/// A driver instance: the thing a graph node wraps.
pub trait BlockDriver: BlockIo {
    /// The driver's name as QMP reports it (`file`, `null-co`, `raw`).
    fn driver_name(&self) -> &'static str;
    fn is_read_only(&self) -> bool;
    /// Flush synchronously and release resources; called once, on the
    /// control thread, when the node's last reference goes away.
    fn close(&self) -> io::Result<()>;
    /// The host file behind a protocol driver.
    fn filename(&self) -> Option<String> {
        None
    }
    /// True if I/O bypasses the host page cache (O_DIRECT).
    fn cache_direct(&self) -> bool {
        false
    }
    /// The node entered a drained section: no request will arrive until
    /// `drained_end`. Must not wait.
    fn drained_begin(&self) {}
    fn drained_end(&self) {}
    /// Requests waiting inside this driver that a drained section leaves
    /// where they are (a throttle filter's queue): counted as in flight by
    /// the node and everything above it, but not waited for.
    fn parked(&self) -> u64 {
        0
    }
    /// Whether the driver only passes requests on to its `file` child,
    /// changing nothing (QEMU's filters).
    fn is_filter(&self) -> bool {
        false
    }
    /// The child a read or write starting now would reach unchanged: a
    /// filter with nothing to do (a throttle filter whose group has no
    /// limits) lets its node hand the request straight to the child,
    /// saving a layer per request. None: the request goes through
    /// `read`/`write` as usual.
    fn passes_to(&self) -> Option<&dyn BlockIo> {
        None
    }
    /// What the driver shows of its state in `query-named-block-nodes`
    /// and `query-blockstats` (ringblk's own `x-` members).
    fn info(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    /// Switch between read-only and read-write use. Called on the control
    /// thread with the node drained; going read-only, a driver writes back
    /// what it caches (syncing is left to the next flush).
    fn reopen(&self, read_only: bool) -> Result<(), Error> {
        if read_only == self.is_read_only() {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "the {} driver cannot be reopened read-{}",
                self.driver_name(),
                if read_only { "only" } else { "write" }
            )))
        }
    }
    /// The backing image has writes no flush covered yet: the next flush
    /// here must flush it too. Drivers without a backing image ignore it.
    fn backing_unflushed(&self) {}
    /// Replace the backing image (drained). Drivers without one refuse.
    fn set_backing(&self, backing: Option<ChildRef>) -> Result<(), Error> {
        let _ = backing;
        Err(Error::invalid(format!(
            "the {} driver has no backing image",
            self.driver_name()
        )))
    }
    /// Replace the `file` child (drained): filters, which a snapshot may
    /// put a new overlay under, take it; other drivers refuse.
    fn set_file(&self, file: ChildRef) -> Result<(), Error> {
        let _ = file;
        Err(Error::unsupported(format!(
            "the {} driver cannot change its file",
            self.driver_name()
        )))
    }
    /// Whether this layer itself holds the data at guest `offset` (rather
    /// than showing its backing image's). Layers without a backing image
    /// hold everything.
    fn is_allocated(&self, offset: u64) -> BoolFuture<'_> {
        let _ = offset;
        Box::pin(std::future::ready(Ok(true)))
    }
}

/// An answer that needs I/O (metadata lookups).
pub(crate) type BoolFuture<'a> = Pin<Box<dyn Future<Output = io::Result<bool>> + 'a>>;

//! Nodes and child edges.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::formats::{BlockDriver, BlockIo, IoFuture};
use crate::uring::IoVec;

/// What a child is to its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// The storage a format driver interprets.
    File,
    /// The image a copy-on-write format reads unallocated data from.
    Backing,
}

impl fmt::Display for ChildRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
        })
    }
}

/// An edge from a parent node to a child node. Holding it keeps the child
/// open (the Arc's count is the node's refcount).
pub struct Child {
    pub role: ChildRole,
    pub node: Arc<Node>,
}

/// A driver instance with a name, its children and its counters
/// (QEMU: BlockDriverState).
pub struct Node {
    name: String,
    driver: Box<dyn BlockDriver>,
    children: Vec<Child>,
    /// Requests inside this node's driver right now, on any iothread.
    in_flight: AtomicU64,
    /// Nesting depth of drained sections covering this node.
    quiesce_counter: AtomicU32,
}

impl Node {
    pub fn new(name: &str, driver: Box<dyn BlockDriver>, children: Vec<Child>) -> Arc<Self> {
        Arc::new(Node {
            name: name.to_string(),
            driver,
            children,
            in_flight: AtomicU64::new(0),
            quiesce_counter: AtomicU32::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// Child edges (the Vec also holds the references keeping them open).
    pub fn children(&self) -> &[Child] {
        &self.children
    }

    pub fn is_read_only(&self) -> bool {
        self.driver.is_read_only()
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn quiesce_counter(&self) -> u32 {
        self.quiesce_counter.load(Ordering::Acquire)
    }

    fn tracked<'a>(&'a self, fut: IoFuture<'a>) -> IoFuture<'a> {
        let guard = InFlight::begin(&self.in_flight);
        Box::pin(async move {
            let r = fut.await;
            drop(guard);
            r
        })
    }
}

/// Counts one request for as long as it lives.
pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    pub(crate) fn begin(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // The drain machinery (control socket issue) hooks the 1 -> 0
        // transition here to wake a waiting drain.
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BlockIo for Node {
    fn size(&self) -> u64 {
        self.driver.size()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.tracked(self.driver.read(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.tracked(self.driver.write(offset, buf))
    }
    fn flush(&self) -> IoFuture<'_> {
        self.tracked(self.driver.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.tracked(self.driver.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.tracked(self.driver.write_zeroes(offset, len, may_unmap))
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        self.tracked(self.driver.grow(new_size))
    }
}

impl Drop for Node {
    /// The last reference is gone: close the driver (flushes it). Children
    /// close after this, as their references drop with `children`.
    fn drop(&mut self) {
        if let Err(e) = self.driver.close() {
            log::error!("node {}: close failed: {e}", self.name);
        } else {
            log::debug!("node {} closed", self.name);
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver_name())
            .finish()
    }
}

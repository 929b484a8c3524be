//! Nodes and child edges.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use super::in_flight::{InFlight, InFlightCounter};
use super::parent::{Parent, Parents};
use super::registry::Graph;
use crate::error::Error;
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
#[derive(Clone)]
pub struct Child {
    pub role: ChildRole,
    pub node: Arc<Node>,
}

/// A driver instance with a name, its children and its counters
/// (QEMU: BlockDriverState).
pub struct Node {
    name: String,
    /// The graph this node is in.
    graph: Graph,
    driver: Box<dyn BlockDriver>,
    /// Child edges, each with the id of this node's entry in the child's
    /// parent list. Changed only on the control thread in drained sections
    /// (a new backing image); the driver keeps its own references for I/O.
    children: Mutex<Vec<(Child, u64)>>,
    pub(super) parents: Parents,
    /// Requests inside this node's driver right now, on any iothread.
    pub(super) in_flight: InFlightCounter,
    /// Nesting depth of drained sections covering this node.
    pub(super) quiesce_counter: AtomicU32,
    /// QEMU's `cache.no-flush`: flushes return at once (data may be lost
    /// on a host crash; for scratch disks).
    no_flush: AtomicBool,
    /// QEMU's `detect-zeroes` (a [`DetectZeroes`] as u8).
    detect_zeroes: AtomicU8,
    /// `driver.is_filter()`, kept so that a request on any other node
    /// skips asking `passes_to`.
    filter: bool,
}

/// QEMU's `detect-zeroes`: writes of all-zero data become write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DetectZeroes {
    Off = 0,
    On = 1,
    /// Also let the storage be unmapped.
    Unmap = 2,
}

impl Node {
    /// A node of `graph`; its children must be nodes of `graph` too.
    pub fn new(
        graph: &Graph,
        name: &str,
        driver: Box<dyn BlockDriver>,
        children: Vec<Child>,
    ) -> Arc<Self> {
        debug_assert!(children.iter().all(|c| c.node.graph.same(graph)));
        let node = Arc::new_cyclic(|me: &Weak<Node>| {
            let me: Weak<dyn Parent> = me.clone();
            let children = children
                .into_iter()
                .map(|c| {
                    let edge = c.node.parents.attach(me.clone(), false);
                    (c, edge)
                })
                .collect();
            Node {
                name: name.to_string(),
                graph: graph.clone(),
                children: Mutex::new(children),
                parents: Parents::default(),
                in_flight: InFlightCounter::new(),
                // A node born inside drain_all is drained like the rest.
                quiesce_counter: AtomicU32::new(graph.drain_all_depth().load(Ordering::SeqCst)),
                no_flush: AtomicBool::new(false),
                detect_zeroes: AtomicU8::new(DetectZeroes::Off as u8),
                filter: driver.is_filter(),
                driver,
            }
        });
        // A child that is drained already drains its new parent (it could
        // not be called while the parent was being built).
        for c in node.children() {
            if c.node.quiesce_counter() > 0 {
                c.node.parents.drained_begin();
            }
        }
        graph.register(&node);
        node
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The graph this node is in.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// The host file behind a protocol node.
    pub fn filename(&self) -> Option<String> {
        self.driver.filename()
    }

    /// True if this node's storage (its own, or its file child's) bypasses
    /// the host page cache (O_DIRECT).
    pub fn cache_direct(&self) -> bool {
        self.driver.cache_direct()
            || self
                .children()
                .iter()
                .any(|c| c.role == ChildRole::File && c.node.cache_direct())
    }

    /// Options `blockdev-add` sets once, before the node is used.
    pub(crate) fn set_io_options(&self, no_flush: bool, detect_zeroes: DetectZeroes) {
        self.no_flush.store(no_flush, Ordering::Relaxed);
        self.detect_zeroes
            .store(detect_zeroes as u8, Ordering::Relaxed);
    }

    pub(super) fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    fn edges(&self) -> MutexGuard<'_, Vec<(Child, u64)>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The child edges right now.
    pub fn children(&self) -> Vec<Child> {
        self.edges().iter().map(|(c, _)| c.clone()).collect()
    }

    /// The child in `role`, if any (the first: there is one of each).
    pub fn child(&self, role: ChildRole) -> Option<Arc<Node>> {
        self.edges()
            .iter()
            .find(|(c, _)| c.role == role)
            .map(|(c, _)| c.node.clone())
    }

    /// The host file this node's data lives in: its own, or its `file`
    /// child's (what a qcow2 overlay names as its backing file).
    pub fn image_filename(&self) -> Option<String> {
        self.filename()
            .or_else(|| self.child(ChildRole::File)?.image_filename())
    }

    /// Give this node a new backing image (None: none). The caller holds
    /// the node drained: no request can see the old and the new at once.
    pub(crate) fn set_backing(self: &Arc<Self>, backing: Option<Arc<Node>>) -> Result<(), Error> {
        self.driver
            .set_backing(backing.clone().map(|b| b as crate::formats::ChildRef))
            .map_err(|e| Error::unsupported(format!("node '{}': {e}", self.name)))?;
        self.replace_edge(ChildRole::Backing, backing);
        Ok(())
    }

    /// Give this filter node a new `file` child (a snapshot's overlay put
    /// under it). The caller holds the node drained.
    pub(crate) fn set_file(self: &Arc<Self>, file: Arc<Node>) -> Result<(), Error> {
        self.driver
            .set_file(file.clone() as crate::formats::ChildRef)
            .map_err(|e| Error::unsupported(format!("node '{}': {e}", self.name)))?;
        self.replace_edge(ChildRole::File, Some(file));
        Ok(())
    }

    /// The child edge in `role` now leads to `new` (None: no such child),
    /// the driver told already. The new edge is attached before the old
    /// one goes, so a drained section over either never lapses.
    fn replace_edge(self: &Arc<Self>, role: ChildRole, new: Option<Arc<Node>>) {
        let me: Weak<dyn Parent> = Arc::downgrade(self) as Weak<dyn Parent>;
        let mut edges = self.edges();
        let old = edges
            .iter()
            .position(|(c, _)| c.role == role)
            .map(|i| edges.remove(i));
        if let Some(n) = new {
            let edge = n.parents.attach(me, false);
            edges.push((
                Child {
                    role,
                    node: n.clone(),
                },
                edge,
            ));
            drop(edges);
            // A drained child drains its new parent, as in Node::new.
            if n.quiesce_counter() > 0 {
                n.parents.drained_begin();
            }
        } else {
            drop(edges);
        }
        if let Some((c, edge)) = old {
            c.node.parents.detach(edge);
        }
    }

    /// Whether this node only passes requests on to its `file` child
    /// (QEMU's filters: a `throttle` node).
    pub fn is_filter(&self) -> bool {
        self.filter
    }

    /// Switch this node and the storage below it (its `file` children)
    /// between read-only and read-write use, as a snapshot does to the
    /// image it puts an overlay on and a commit to its base. The caller
    /// holds the node drained. On error nothing changed.
    pub(crate) fn reopen(&self, read_only: bool) -> Result<(), Error> {
        let files: Vec<Arc<Node>> = self
            .children()
            .into_iter()
            .filter(|c| c.role == ChildRole::File)
            .map(|c| c.node)
            .collect();
        let was = self.is_read_only();
        let ctx = |e: &dyn std::fmt::Display| Error::io(format!("node '{}': {e}", self.name));
        if read_only {
            // Top down: nothing above writes once this layer refuses to.
            self.driver.reopen(true).map_err(|e| ctx(&e))?;
            for (i, f) in files.iter().enumerate() {
                if let Err(e) = f.reopen(true) {
                    for f in &files[..i] {
                        let _ = f.reopen(was);
                    }
                    let _ = self.driver.reopen(was);
                    return Err(ctx(&e));
                }
            }
        } else {
            // Bottom up: the storage must be writable before the format is.
            for (i, f) in files.iter().enumerate() {
                if let Err(e) = f.reopen(false) {
                    for f in &files[..i] {
                        let _ = f.reopen(true);
                    }
                    return Err(ctx(&e));
                }
            }
            if let Err(e) = self.driver.reopen(false) {
                for f in &files {
                    let _ = f.reopen(true);
                }
                return Err(ctx(&e));
            }
        }
        Ok(())
    }

    /// This node's backing image took writes no flush covered (it was
    /// the active layer until now): our next flush syncs it first.
    pub(crate) fn backing_unflushed(&self) {
        self.driver.backing_unflushed();
    }

    /// Whether this layer itself holds the data at `offset`.
    pub(crate) async fn is_allocated(&self, offset: u64) -> std::io::Result<bool> {
        self.driver.is_allocated(offset).await
    }

    pub fn is_read_only(&self) -> bool {
        self.driver.is_read_only()
    }

    /// The driver's own state for queries (`x-` members).
    pub fn driver_info(&self) -> serde_json::Map<String, serde_json::Value> {
        self.driver.info()
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    /// Requests started on this node since it was opened.
    pub fn requests(&self) -> u64 {
        self.in_flight.started()
    }

    pub fn quiesce_counter(&self) -> u32 {
        self.quiesce_counter.load(Ordering::SeqCst)
    }

    /// How many parents (nodes and BlockBackends) point at this node.
    pub fn parent_count(&self) -> usize {
        self.parents.count()
    }

    /// Count the request before the driver builds its future, so a parent
    /// is always counted no later than the children it calls.
    fn tracked<'a>(
        &'a self,
        make: impl FnOnce(&'a dyn BlockDriver) -> IoFuture<'a>,
    ) -> IoFuture<'a> {
        Box::pin(self.track(make))
    }

    /// [`Node::tracked`] without boxing the result: the guard and the
    /// driver's future side by side in one value the caller owns.
    fn track<'a>(&'a self, make: impl FnOnce(&'a dyn BlockDriver) -> IoFuture<'a>) -> Tracked<'a> {
        let guard = self.in_flight.guard();
        Tracked {
            fut: make(&*self.driver),
            _guard: guard,
            _filter: None,
        }
    }

    /// Count a read or write in and find the node whose driver takes it:
    /// this one, or the child of a filter that would pass it on unchanged
    /// ([`BlockDriver::passes_to`]), counted in as well. The filter's
    /// count is taken first and dropped last, as if it had called the
    /// child itself.
    #[inline]
    fn enter(&self) -> (&Node, InFlight<'_>, Option<InFlight<'_>>) {
        let guard = self.in_flight.guard();
        if !self.filter {
            return (self, guard, None);
        }
        let child = self
            .driver
            .passes_to()
            .and_then(|c| c.as_any().downcast_ref::<Node>());
        match child {
            Some(child) => (child, child.in_flight.guard(), Some(guard)),
            None => (self, guard, None),
        }
    }

    /// A read, as `BlockIo::read`, for a caller that awaits it in place
    /// (a BlockBackend): one heap allocation per request less.
    #[inline]
    pub fn read_in_place<'a>(&'a self, offset: u64, buf: &'a IoVec) -> Tracked<'a> {
        let (node, guard, filter) = self.enter();
        Tracked {
            fut: node.driver.read(offset, buf),
            _guard: guard,
            _filter: filter,
        }
    }

    /// A write, as `BlockIo::write`, awaited in place (see `read_in_place`).
    /// `detect-zeroes` is the first one set on the way down, as when each
    /// node passes the write on itself.
    #[inline]
    pub fn write_in_place<'a>(&'a self, offset: u64, buf: &'a IoVec) -> Tracked<'a> {
        let (node, guard, filter) = self.enter();
        let mut detect = self.detect_zeroes.load(Ordering::Relaxed);
        if detect == DetectZeroes::Off as u8 {
            detect = node.detect_zeroes.load(Ordering::Relaxed);
        }
        let d = &*node.driver;
        let fut = if detect != DetectZeroes::Off as u8 && buf.is_zero() {
            d.write_zeroes(
                offset,
                buf.len() as u64,
                detect == DetectZeroes::Unmap as u8,
            )
        } else {
            d.write(offset, buf)
        };
        Tracked {
            fut,
            _guard: guard,
            _filter: filter,
        }
    }
}

/// A request inside a node: the driver's future, and the node's in-flight
/// count held until it completes or is dropped (and the count of a filter
/// above that passed the request on, see `Node::enter`). Fields drop in
/// order: the future, then the counts, innermost first.
pub struct Tracked<'a> {
    fut: IoFuture<'a>,
    _guard: InFlight<'a>,
    _filter: Option<InFlight<'a>>,
}

impl Future for Tracked<'_> {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.fut.as_mut().poll(cx)
    }
}

impl BlockIo for Node {
    fn size(&self) -> u64 {
        self.driver.size()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.read_in_place(offset, buf))
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.write_in_place(offset, buf))
    }
    fn write_granularity(&self) -> usize {
        self.driver.write_granularity()
    }
    fn write_metadata<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        Box::pin(self.track(|d| d.write_metadata(offset, buf)))
    }
    fn store_metadata(&self, offset: u64, bytes: &[u8]) -> Option<io::Result<()>> {
        let _guard = self.in_flight.guard();
        self.driver.store_metadata(offset, bytes)
    }
    fn flush(&self) -> IoFuture<'_> {
        if self.no_flush.load(Ordering::Relaxed) {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.tracked(|d| d.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.tracked(|d| d.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.tracked(|d| d.write_zeroes(offset, len, may_unmap))
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        self.tracked(|d| d.grow(new_size))
    }
}

impl Drop for Node {
    /// The last reference is gone: close the driver (flushes it). Children
    /// close after this, as their references drop with `children`.
    fn drop(&mut self) {
        let edges = std::mem::take(&mut *self.edges());
        for (c, edge) in &edges {
            c.node.parents.detach(*edge);
        }
        self.graph.unregister_dead();
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

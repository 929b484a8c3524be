//! BlockBackend: the root parent an export talks to. It checks bounds and
//! read-only, counts its own requests, and survives having its tree ejected.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Poll, Waker};

use super::in_flight::{InFlight, InFlightCounter};
use super::node::{ChildRole, Node};
use super::parent::Parent;
use super::registry::Graph;
use crate::formats::BlockIo;
use crate::uring::{fence, IoVec};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{backend}: no medium (the tree was ejected)")]
    Ejected { backend: String },
    #[error("{backend}: request at offset {offset} length {len} is past the end ({size} bytes)")]
    OutOfRange {
        backend: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{backend}: a medium is attached already")]
    HasMedium { backend: String },
    #[error("{backend}: read-only")]
    ReadOnly { backend: String },
    #[error("{backend}: I/O error at offset {offset}: {source}")]
    Io {
        backend: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// What the device using a BlockBackend does when the tree below it is
/// drained or resized (QEMU: BlockDevOps). The vhost export implements it.
pub trait DeviceOps: Send + Sync {
    /// Stop submitting new requests. Must not wait.
    fn drained_begin(&self);
    /// Resume, and process what arrived meanwhile. Must not wait.
    fn drained_end(&self);
    /// Whether the device still has requests of its own in flight, beyond
    /// `parked` ones waiting in a throttle queue (see `Parent::drained_poll`).
    fn drained_poll(&self, parked: u64) -> bool;
    /// The medium's size changed.
    fn resized(&self);
}

struct Attached {
    node: Arc<Node>,
    /// Our edge in the node's parent list.
    edge: u64,
}

pub struct BlockBackend {
    name: String,
    /// The graph of the root it was made with.
    graph: Graph,
    /// The root and our edge in its parent list.
    root: RwLock<Option<Attached>>,
    read_only: bool,
    /// This backend's own requests, counted before they reach the root node.
    in_flight: InFlightCounter,
    /// Drained sections covering this backend (through its root edge).
    quiesce_counter: AtomicU32,
    dev_ops: Mutex<Option<Weak<dyn DeviceOps>>>,
    /// Internal requests wait while drained; a device that stops itself on
    /// drained_begin (an export) turns this off so its requests already in
    /// progress can finish (QEMU: disable_request_queuing).
    request_queuing: AtomicBool,
    /// Requests waiting for the drained section to end.
    queued: Mutex<Vec<Waker>>,
    me: Weak<BlockBackend>,
}

enum Access {
    Read,
    Write,
}

impl BlockBackend {
    /// A BlockBackend on `root`, in `root`'s graph.
    pub fn new(name: &str, root: Arc<Node>, read_only: bool) -> Arc<Self> {
        let graph = root.graph().clone();
        let b = Arc::new_cyclic(|me| BlockBackend {
            name: name.to_string(),
            graph: graph.clone(),
            root: RwLock::new(None),
            read_only,
            in_flight: InFlightCounter::new(),
            quiesce_counter: AtomicU32::new(0),
            dev_ops: Mutex::new(None),
            request_queuing: AtomicBool::new(true),
            queued: Mutex::new(Vec::new()),
            me: me.clone(),
        });
        // Cannot fail: a new backend has no root.
        let _ = b.attach(root);
        graph.register_backend(&b);
        b
    }

    /// The graph this backend is in.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn root(&self) -> Option<Arc<Node>> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|a| a.node.clone())
    }

    /// Size of the medium in bytes; 0 after eject.
    pub fn size(&self) -> u64 {
        self.root().map_or(0, |n| n.size())
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    pub fn quiesce_counter(&self) -> u32 {
        self.quiesce_counter.load(Ordering::SeqCst)
    }

    pub fn set_dev_ops(&self, ops: Weak<dyn DeviceOps>) {
        *self.dev_ops.lock().unwrap_or_else(|e| e.into_inner()) = Some(ops);
    }

    pub fn set_request_queuing(&self, on: bool) {
        self.request_queuing.store(on, Ordering::SeqCst);
    }

    fn dev_ops(&self) -> Option<Arc<dyn DeviceOps>> {
        self.dev_ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// Attach a tree. If its root is drained, this backend is drained with
    /// it until that section ends.
    pub fn attach(&self, node: Arc<Node>) -> Result<(), BackendError> {
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        if root.is_some() {
            return Err(BackendError::HasMedium {
                backend: self.name.clone(),
            });
        }
        let me: Weak<dyn Parent> = self.me.clone();
        let edge = node.parents.attach(me, false);
        *root = Some(Attached {
            node: node.clone(),
            edge,
        });
        drop(root);
        if node.quiesce_counter() > 0 {
            node.parents.drained_begin();
        }
        Ok(())
    }

    /// Point this backend at `new` instead of its current root (a snapshot's
    /// overlay, a commit's base), in the caller's drained section. The new
    /// edge is attached before the old one goes, so the drain the backend
    /// is under never lapses in between. Requests already inside the old
    /// tree finish there; new ones go to `new`.
    pub fn replace_root(&self, new: Arc<Node>) -> Result<Arc<Node>, BackendError> {
        let me: Weak<dyn Parent> = self.me.clone();
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = root.take() else {
            return Err(BackendError::Ejected {
                backend: self.name.clone(),
            });
        };
        let edge = new.parents.attach(me, false);
        *root = Some(Attached {
            node: new.clone(),
            edge,
        });
        drop(root);
        if new.quiesce_counter() > 0 {
            new.parents.drained_begin();
        }
        old.node.parents.detach(old.edge);
        Ok(old.node)
    }

    /// Detach the tree. Requests already inside it finish; new ones fail with
    /// `Ejected`. Returns the old root so the caller decides when it closes.
    pub fn eject(&self) -> Option<Arc<Node>> {
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let old = root.take()?;
        drop(root);
        // Ends the drain the edge held on us, if any.
        old.node.parents.detach(old.edge);
        Some(old.node)
    }

    /// Wait for this backend's own requests to complete (QEMU: blk_drain).
    /// Unlike a drained section, nobody is stopped from submitting more.
    pub fn drain_requests(&self) {
        super::in_flight::poll_while(|| self.in_flight.get() > 0);
    }

    /// QEMU's blk_drain: stop the device from submitting, wait until every
    /// request of this backend has completed, throttled ones included (a
    /// throttle filter below goes on granting them within its limits), and
    /// let the device go on.
    pub fn drain(&self) {
        Parent::drained_begin(self);
        super::in_flight::poll_while(|| Parent::drained_poll(self, 0));
        Parent::drained_end(self);
    }

    /// Count a request in, waiting first while a drained section holds
    /// internal requests back.
    async fn enter(&self) -> InFlight<'_> {
        loop {
            let g = self.in_flight.guard();
            // Either the drain (heavy fence in poll_while) sees our count,
            // or we see its quiesce_counter.
            fence::light();
            if !self.request_queuing.load(Ordering::SeqCst)
                || self.quiesce_counter.load(Ordering::SeqCst) == 0
            {
                return g;
            }
            drop(g);
            poll_fn(|cx| {
                let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
                if self.quiesce_counter.load(Ordering::SeqCst) == 0 {
                    Poll::Ready(())
                } else {
                    q.push(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
        }
    }

    /// The root for a batch of requests (see [`HeldRoot`]).
    pub fn hold_root(&self) -> HeldRoot {
        HeldRoot(self.root())
    }

    /// The root a request goes to (`held`, or the current one), if it may
    /// do `access` on `[offset, offset + len)`.
    fn check<'a>(
        &self,
        held: Option<&'a HeldRoot>,
        access: Access,
        offset: u64,
        len: u64,
    ) -> Result<RequestRoot<'a>, BackendError> {
        let root = match held {
            Some(HeldRoot(Some(node))) => Some(RequestRoot::Held(node)),
            Some(HeldRoot(None)) => None,
            None => self.root().map(RequestRoot::Own),
        }
        .ok_or_else(|| BackendError::Ejected {
            backend: self.name.clone(),
        })?;
        if matches!(access, Access::Write) && self.read_only {
            return Err(BackendError::ReadOnly {
                backend: self.name.clone(),
            });
        }
        let size = root.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BackendError::OutOfRange {
                backend: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(root)
    }

    fn io_error(&self, offset: u64) -> impl FnOnce(io::Error) -> BackendError + '_ {
        move |source| BackendError::Io {
            backend: self.name.clone(),
            offset,
            source,
        }
    }

    pub async fn read(&self, offset: u64, buf: &IoVec) -> Result<(), BackendError> {
        self.read_on(None, offset, buf).await
    }

    /// A read on `held` (None: on the current root, looked up once the
    /// request has entered).
    pub async fn read_on(
        &self,
        held: Option<&HeldRoot>,
        offset: u64,
        buf: &IoVec,
    ) -> Result<(), BackendError> {
        let _g = self.enter().await;
        let root = self.check(held, Access::Read, offset, buf.len() as u64)?;
        root.read_in_place(offset, buf)
            .await
            .map_err(self.io_error(offset))
    }

    pub async fn write(&self, offset: u64, buf: &IoVec) -> Result<(), BackendError> {
        self.write_on(None, offset, buf).await
    }

    pub async fn write_on(
        &self,
        held: Option<&HeldRoot>,
        offset: u64,
        buf: &IoVec,
    ) -> Result<(), BackendError> {
        let _g = self.enter().await;
        let root = self.check(held, Access::Write, offset, buf.len() as u64)?;
        root.write_in_place(offset, buf)
            .await
            .map_err(self.io_error(offset))
    }

    pub async fn flush(&self) -> Result<(), BackendError> {
        self.flush_on(None).await
    }

    pub async fn flush_on(&self, held: Option<&HeldRoot>) -> Result<(), BackendError> {
        let _g = self.enter().await;
        let root = self.check(held, Access::Read, 0, 0)?;
        root.flush().await.map_err(self.io_error(0))
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.discard_on(None, offset, len).await
    }

    pub async fn discard_on(
        &self,
        held: Option<&HeldRoot>,
        offset: u64,
        len: u64,
    ) -> Result<(), BackendError> {
        let _g = self.enter().await;
        let root = self.check(held, Access::Write, offset, len)?;
        root.discard(offset, len)
            .await
            .map_err(self.io_error(offset))
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BackendError> {
        self.write_zeroes_on(None, offset, len, may_unmap).await
    }

    pub async fn write_zeroes_on(
        &self,
        held: Option<&HeldRoot>,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BackendError> {
        let _g = self.enter().await;
        let root = self.check(held, Access::Write, offset, len)?;
        root.write_zeroes(offset, len, may_unmap)
            .await
            .map_err(self.io_error(offset))
    }
}

/// A BlockBackend's root looked up once for a batch of requests: a vhost
/// queue takes one per batch it pops (one lock and one reference count per
/// batch instead of per request, each a locked instruction) and its
/// requests share it. Requests of a batch that races with a graph change
/// finish on the root they were popped for, as requests already in flight
/// do; changes made in a drained section cannot race, as the section waits
/// for the popped requests.
pub struct HeldRoot(Option<Arc<Node>>);

/// The root one request runs on: a batch's, or its own reference.
enum RequestRoot<'a> {
    Held(&'a Arc<Node>),
    Own(Arc<Node>),
}

impl std::ops::Deref for RequestRoot<'_> {
    type Target = Node;
    fn deref(&self) -> &Node {
        match self {
            RequestRoot::Held(n) => n,
            RequestRoot::Own(n) => n,
        }
    }
}

/// Point every BlockBackend on `from` at `to` (in the caller's drained
/// section: a snapshot's overlay, a commit's filter or base); returns how
/// many moved.
fn move_backends(from: &Arc<Node>, to: &Arc<Node>) -> usize {
    let mut moved = 0;
    for b in from.graph().all_backends() {
        if b.root().is_some_and(|r| Arc::ptr_eq(&r, from)) {
            match b.replace_root(to.clone()) {
                Ok(_) => moved += 1,
                Err(e) => log::error!("moving {} to node '{}': {e}", b.name(), to.name()),
            }
        }
    }
    moved
}

/// Everything that uses `from` as the disk: its BlockBackends, and the
/// filter nodes (`throttle`) whose `file` it is, which then filter `to`.
/// Returns how many moved. The caller holds both drained.
pub(super) fn move_users(from: &Arc<Node>, to: &Arc<Node>) -> usize {
    let mut moved = move_backends(from, to);
    for f in filter_parents(from) {
        match f.set_file(to.clone()) {
            Ok(()) => moved += 1,
            Err(e) => log::error!("moving filter '{}' to node '{}': {e}", f.name(), to.name()),
        }
    }
    moved
}

/// The filter nodes whose `file` child is `node`.
fn filter_parents(node: &Arc<Node>) -> Vec<Arc<Node>> {
    node.graph()
        .all_nodes()
        .into_iter()
        .filter(|p| {
            p.is_filter()
                && p.child(ChildRole::File)
                    .is_some_and(|c| Arc::ptr_eq(&c, node))
        })
        .collect()
}

/// The BlockBackend is its root node's parent.
impl Parent for BlockBackend {
    fn drained_begin(&self) {
        if self.quiesce_counter.fetch_add(1, Ordering::SeqCst) == 0 {
            if let Some(ops) = self.dev_ops() {
                ops.drained_begin();
            }
        }
    }

    fn drained_end(&self) {
        let prev = self
            .quiesce_counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1));
        if prev != Ok(1) {
            if prev.is_err() {
                log::error!("{}: drained_end without drained_begin", self.name);
            }
            return;
        }
        if let Some(ops) = self.dev_ops() {
            ops.drained_end();
        }
        let waiters = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
        for w in waiters {
            w.wake();
        }
    }

    fn drained_poll(&self, parked: u64) -> bool {
        self.in_flight.get() > parked || self.dev_ops().is_some_and(|d| d.drained_poll(parked))
    }

    fn resized(&self) {
        if let Some(ops) = self.dev_ops() {
            ops.resized();
        }
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        drop(self.eject());
        self.graph.unregister_dead_backends();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::formats::{BlockDriver, IoFuture, NullDriver};
    use crate::uring::{AlignedBuf, IoThread};

    fn buf(len: usize) -> IoVec {
        IoVec::from_buf(AlignedBuf::zeroed(len, 512))
    }

    #[test]
    fn bounds_are_checked_with_overflow_in_mind() {
        let b = BlockBackend::new(
            "b",
            Node::new(&Graph::new(), "n", Box::new(NullDriver::new(4096)), vec![]),
            false,
        );
        let t = IoThread::start("bb-bounds", Duration::ZERO).unwrap();
        let bb = b.clone();
        let results = t.handle().block_on(move || async move {
            let mut r = Vec::new();
            r.push(bb.read(0, &buf(4096)).await.is_ok());
            r.push(bb.read(512, &buf(4096)).await.is_err());
            r.push(bb.read(u64::MAX - 100, &buf(512)).await.is_err());
            r.push(bb.discard(4096, 1).await.is_err());
            r.push(bb.write_zeroes(u64::MAX, 2, false).await.is_err());
            r
        });
        assert!(results.iter().all(|&ok| ok), "{results:?}");
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn read_only_backend_refuses_writes_but_reads_and_flushes() {
        let b = BlockBackend::new(
            "ro",
            Node::new(&Graph::new(), "n", Box::new(NullDriver::new(4096)), vec![]),
            true,
        );
        let t = IoThread::start("bb-ro", Duration::ZERO).unwrap();
        let bb = b.clone();
        let (w, d, z, r, f) = t.handle().block_on(move || async move {
            (
                bb.write(0, &buf(512)).await,
                bb.discard(0, 512).await,
                bb.write_zeroes(0, 512, true).await,
                bb.read(0, &buf(512)).await,
                bb.flush().await,
            )
        });
        assert!(matches!(w, Err(BackendError::ReadOnly { .. })));
        assert!(matches!(d, Err(BackendError::ReadOnly { .. })));
        assert!(matches!(z, Err(BackendError::ReadOnly { .. })));
        assert!(r.is_ok() && f.is_ok());
    }

    /// A driver that counts closes: a stand-in for a real one, to watch
    /// the graph's refcounting.
    struct Counting(Arc<AtomicUsize>);
    impl BlockIo for Counting {
        fn size(&self) -> u64 {
            4096
        }
        fn read<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn write<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
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
    impl BlockDriver for Counting {
        fn driver_name(&self) -> &'static str {
            "counting"
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn close(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn eject_fails_new_requests_and_the_tree_closes_with_its_last_reference() {
        let closes = Arc::new(AtomicUsize::new(0));
        let g = Graph::new();
        let child = Node::new(&g, "child", Box::new(Counting(closes.clone())), vec![]);
        let parent = Node::new(
            &g,
            "parent",
            Box::new(Counting(closes.clone())),
            vec![crate::graph::node::Child {
                role: crate::graph::ChildRole::File,
                node: child,
            }],
        );
        let b = BlockBackend::new("e", parent, false);
        let t = IoThread::start("bb-eject", Duration::ZERO).unwrap();
        let root = b.eject().expect("had a tree");
        assert_eq!(b.size(), 0);
        let bb = b.clone();
        let r = t
            .handle()
            .block_on(move || async move { bb.read(0, &buf(512)).await });
        assert!(matches!(r, Err(BackendError::Ejected { .. })), "{r:?}");
        assert_eq!(
            closes.load(Ordering::SeqCst),
            0,
            "still referenced by the caller"
        );
        drop(root);
        assert_eq!(closes.load(Ordering::SeqCst), 2, "parent and child closed");
    }
}

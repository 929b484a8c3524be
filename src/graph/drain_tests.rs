//! Drain tests modelled on QEMU's tests/unit/test-bdrv-drain.c: quiesce
//! counters through parents, nesting, drain_all, requests on iothreads,
//! nodes deleted while a drain waits, edges changed inside a section.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::drain::DrainError;
use super::node::Child;
use super::*;
use crate::error::ErrorKind;
use crate::formats::{BlockDriver, BlockIo, IoFuture};
use crate::uring::{AlignedBuf, IoThread, IoVec};

/// Requests block until the test opens the gate (a stand-in for slow I/O).
#[derive(Default)]
pub(super) struct Gate {
    state: Mutex<(bool, Vec<Waker>)>,
    /// Run by the first request through the open gate, still inside the
    /// driver: a completion that changes the graph.
    on_pass: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Gate {
    pub(super) fn open(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        for w in s.1.drain(..) {
            w.wake();
        }
    }
    fn wait(&self) -> IoFuture<'_> {
        Box::pin(poll_fn(move |cx| {
            let mut s = self.state.lock().unwrap();
            if s.0 {
                drop(s);
                if let Some(hook) = self.on_pass.lock().unwrap().take() {
                    hook();
                }
                Poll::Ready(Ok(()))
            } else {
                s.1.push(cx.waker().clone());
                Poll::Pending
            }
        }))
    }
}

struct GateDriver(Arc<Gate>);

impl BlockIo for GateDriver {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
        self.0.wait()
    }
    fn write<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
        self.0.wait()
    }
    fn flush(&self) -> IoFuture<'_> {
        self.0.wait()
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_> {
        self.0.wait()
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> IoFuture<'_> {
        self.0.wait()
    }
}

impl BlockDriver for GateDriver {
    fn driver_name(&self) -> &'static str {
        "gate"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) fn gate_node(g: &Graph, name: &str, gate: &Arc<Gate>) -> Arc<Node> {
    Node::new(g, name, Box::new(GateDriver(gate.clone())), vec![])
}

/// A format-like node over `child`, forwarding everything to it.
struct Forward(Arc<Node>);

impl BlockIo for Forward {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read<'a>(&'a self, o: u64, b: &'a IoVec) -> IoFuture<'a> {
        self.0.read(o, b)
    }
    fn write<'a>(&'a self, o: u64, b: &'a IoVec) -> IoFuture<'a> {
        self.0.write(o, b)
    }
    fn flush(&self) -> IoFuture<'_> {
        self.0.flush()
    }
    fn discard(&self, o: u64, l: u64) -> IoFuture<'_> {
        self.0.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> IoFuture<'_> {
        self.0.write_zeroes(o, l, u)
    }
}

impl BlockDriver for Forward {
    fn driver_name(&self) -> &'static str {
        "forward"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
}

fn format_over(name: &str, child: &Arc<Node>) -> Arc<Node> {
    Node::new(
        child.graph(),
        name,
        Box::new(Forward(child.clone())),
        vec![Child {
            role: ChildRole::File,
            node: child.clone(),
        }],
    )
}

/// Device ops that count calls.
#[derive(Default)]
struct Dev {
    begins: AtomicUsize,
    ends: AtomicUsize,
    resizes: AtomicUsize,
}

impl DeviceOps for Dev {
    fn drained_begin(&self) {
        self.begins.fetch_add(1, Ordering::SeqCst);
    }
    fn drained_end(&self) {
        self.ends.fetch_add(1, Ordering::SeqCst);
    }
    fn drained_poll(&self, _parked: u64) -> bool {
        false
    }
    fn resized(&self) {
        self.resizes.fetch_add(1, Ordering::SeqCst);
    }
}

fn with_dev(b: &Arc<BlockBackend>) -> Arc<Dev> {
    let dev = Arc::new(Dev::default());
    let weak: Weak<dyn DeviceOps> = Arc::downgrade(&dev) as Weak<dyn DeviceOps>;
    b.set_dev_ops(weak);
    dev
}

fn buf() -> IoVec {
    IoVec::from_buf(AlignedBuf::zeroed(512, 512))
}

/// Runs its closure when dropped. Declared after a test's iothreads, it
/// unblocks their tasks if an assertion fails, so the iothreads can stop
/// and the failure is reported instead of hanging.
pub(super) struct OnDrop<F: FnMut()>(pub(super) F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Wait (bounded) for a condition another thread makes true.
pub(super) fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn quiesce_spreads_to_parents_once_and_nests() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    let file = gate_node(&g, "t-nest-file", &gate);
    let fmt = format_over("t-nest-fmt", &file);
    let b = BlockBackend::new("t-nest", fmt.clone(), false);
    let dev = with_dev(&b);

    file.drained_begin();
    assert_eq!(
        (
            file.quiesce_counter(),
            fmt.quiesce_counter(),
            b.quiesce_counter()
        ),
        (1, 1, 1)
    );
    assert_eq!(dev.begins.load(Ordering::SeqCst), 1);

    // Nested sections on the same node and on its parent.
    file.drained_begin();
    fmt.drained_begin();
    assert_eq!(
        (
            file.quiesce_counter(),
            fmt.quiesce_counter(),
            b.quiesce_counter()
        ),
        (2, 2, 1)
    );
    assert_eq!(dev.begins.load(Ordering::SeqCst), 1, "device quiesced once");

    fmt.drained_end().unwrap();
    file.drained_end().unwrap();
    assert_eq!(dev.ends.load(Ordering::SeqCst), 0, "still inside a section");
    file.drained_end().unwrap();
    assert_eq!(
        (
            file.quiesce_counter(),
            fmt.quiesce_counter(),
            b.quiesce_counter()
        ),
        (0, 0, 0)
    );
    assert_eq!(dev.ends.load(Ordering::SeqCst), 1);
    assert!(matches!(
        file.drained_end(),
        Err(DrainError::NotDrained { .. })
    ));
    assert_eq!(file.quiesce_counter(), 0, "a failed end changes nothing");
}

#[test]
fn drain_waits_for_requests_on_two_iothreads() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    let file = gate_node(&g, "t-io-file", &gate);
    let fmt = format_over("t-io-fmt", &file);
    let b = BlockBackend::new("t-io", fmt.clone(), false);
    b.set_request_queuing(false);
    let threads: Vec<_> = (0..2)
        .map(|i| IoThread::start(&format!("t-io-{i}"), Duration::ZERO).unwrap())
        .collect();
    let _unstick = OnDrop(|| gate.open());
    let (tx, rx) = mpsc::channel();
    for t in &threads {
        let (bb, tx) = (b.clone(), tx.clone());
        t.handle().run(move || {
            crate::uring::spawn(async move {
                let r = bb.write(0, &buf()).await;
                tx.send(r.is_ok()).unwrap();
            });
        });
    }
    // Every layer counts both requests.
    eventually("two requests in flight", || {
        (file.in_flight(), fmt.in_flight(), b.in_flight()) == (2, 2, 2)
    });

    let (done_tx, done_rx) = mpsc::channel();
    let f2 = file.clone();
    let drainer = std::thread::spawn(move || {
        f2.drained_begin();
        done_tx.send(f2.in_flight()).unwrap();
    });
    // While the requests are stuck, the drain must not return.
    assert!(done_rx.recv_timeout(Duration::from_millis(100)).is_err());
    eventually("the backend to be quiesced before the poll", || {
        b.quiesce_counter() == 1
    });
    gate.open();
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
    drainer.join().unwrap();
    let ten = Duration::from_secs(10);
    assert!(rx.recv_timeout(ten).unwrap() && rx.recv_timeout(ten).unwrap());
    assert_eq!((fmt.in_flight(), b.in_flight()), (0, 0));
    file.drained_end().unwrap();
}

#[test]
fn internal_requests_wait_for_drained_end() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    gate.open();
    let file = gate_node(&g, "t-queue-file", &gate);
    let b = BlockBackend::new("t-queue", file.clone(), false);
    let t = IoThread::start("t-queue", Duration::ZERO).unwrap();
    file.drained_begin();
    let _unstick = OnDrop(|| {
        // Normally ended below already; then this is a refused no-op.
        let _ = file.drained_end();
    });
    let before = file.requests();
    let (tx, rx) = mpsc::channel();
    let bb = b.clone();
    t.handle().run(move || {
        crate::uring::spawn(async move {
            tx.send(bb.read(0, &buf()).await.is_ok()).unwrap();
        });
    });
    // Queued, not counted as in flight (a drain must not wait for it).
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    assert_eq!(file.requests(), before, "nothing reached the node");
    eventually("the queued request to stop counting", || b.in_flight() == 0);
    file.drained_end().unwrap();
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    assert_eq!(file.requests(), before + 1);
}

#[test]
fn device_requests_pass_when_request_queuing_is_off() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    gate.open();
    let file = gate_node(&g, "t-pass-file", &gate);
    let b = BlockBackend::new("t-pass", file.clone(), false);
    b.set_request_queuing(false);
    let t = IoThread::start("t-pass", Duration::ZERO).unwrap();
    file.drained_begin();
    let bb = b.clone();
    let ok = t
        .handle()
        .block_on(move || async move { bb.read(0, &buf()).await.is_ok() });
    assert!(ok);
    file.drained_end().unwrap();
}

#[test]
fn drain_all_quiesces_every_tree_and_new_nodes() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    gate.open();
    let a = gate_node(&g, "t-all-a", &gate);
    let c = gate_node(&g, "t-all-c", &gate);
    let ba = BlockBackend::new("t-all-ba", a.clone(), false);
    let bc = BlockBackend::new("t-all-bc", c.clone(), false);
    let (da, dc) = (with_dev(&ba), with_dev(&bc));
    g.drain_all_begin();
    assert!(a.quiesce_counter() >= 1 && c.quiesce_counter() >= 1);
    assert_eq!(da.begins.load(Ordering::SeqCst), 1);
    assert_eq!(dc.begins.load(Ordering::SeqCst), 1);
    let late = gate_node(&g, "t-all-late", &gate);
    assert!(
        late.quiesce_counter() >= 1,
        "a node opened inside starts drained"
    );
    g.drain_all_end();
    assert_eq!(late.quiesce_counter(), 0);
    assert_eq!(da.ends.load(Ordering::SeqCst), 1);
    assert_eq!(dc.ends.load(Ordering::SeqCst), 1);
    assert_eq!(ba.quiesce_counter() + bc.quiesce_counter(), 0);
}

#[test]
fn a_node_deleted_by_a_completion_during_drain_all() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    let node = gate_node(&g, "t-del-node", &gate);
    let weak = Arc::downgrade(&node);
    let b = BlockBackend::new("t-del", node, false);
    b.set_request_queuing(false);
    // The driver ejects its backend's tree while completing the read, so
    // the node closes before the backend's count drops: the drain must
    // survive a node vanishing while it waits.
    let backend = Arc::downgrade(&b);
    *gate.on_pass.lock().unwrap() = Some(Box::new(move || {
        if let Some(b) = backend.upgrade() {
            drop(b.eject());
        }
    }));
    let t = IoThread::start("t-del", Duration::ZERO).unwrap();
    let _unstick = OnDrop(|| gate.open());
    let bb = b.clone();
    let (tx, rx) = mpsc::channel();
    t.handle().run(move || {
        crate::uring::spawn(async move {
            tx.send(bb.read(0, &buf()).await.is_ok()).unwrap();
        });
    });

    eventually("request in flight", || {
        weak.upgrade().is_some_and(|n| n.in_flight() == 1)
    });
    let g2 = gate.clone();
    let opener = std::thread::spawn(move || g2.open());
    g.drain_all_begin();
    opener.join().unwrap();
    assert!(weak.upgrade().is_none(), "the node closed during the drain");
    assert!(rx.recv().unwrap(), "the request itself succeeded");

    assert!(g.find_node("t-del-node").is_none());
    g.drain_all_end();
    assert_eq!(b.quiesce_counter(), 0);
}

#[test]
fn detach_and_attach_inside_a_drained_section() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    gate.open();
    let a = gate_node(&g, "t-edge-a", &gate);
    let fresh = gate_node(&g, "t-edge-b", &gate);
    let drained = gate_node(&g, "t-edge-c", &gate);
    let b = BlockBackend::new("t-edge", a.clone(), false);
    let dev = with_dev(&b);

    a.drained_begin();
    assert_eq!(b.quiesce_counter(), 1);
    // Detaching ends the drain the edge held on the backend.
    let old = b.eject().unwrap();
    assert_eq!(b.quiesce_counter(), 0);
    assert_eq!(dev.ends.load(Ordering::SeqCst), 1);
    assert_eq!(old.parent_count(), 0);

    // Attaching to an undrained node leaves the backend running...
    b.attach(fresh.clone()).unwrap();
    assert_eq!(b.quiesce_counter(), 0);
    assert!(b.attach(drained.clone()).is_err(), "one medium at a time");
    b.eject();
    // ...attaching to a drained one drains it until that section ends.
    drained.drained_begin();
    b.attach(drained.clone()).unwrap();
    assert_eq!(b.quiesce_counter(), 1);
    assert_eq!(dev.begins.load(Ordering::SeqCst), 2);
    drained.drained_end().unwrap();
    assert_eq!(b.quiesce_counter(), 0);
    assert_eq!(dev.ends.load(Ordering::SeqCst), 2);
    // Ending the first section on the detached node touches nobody else.
    a.drained_end().unwrap();
    assert_eq!(dev.ends.load(Ordering::SeqCst), 2);
}

#[test]
fn a_parent_node_built_over_a_drained_child_starts_drained() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    let file = gate_node(&g, "t-born-file", &gate);
    file.drained_begin();
    let fmt = format_over("t-born-fmt", &file);
    assert_eq!(fmt.quiesce_counter(), 1);
    file.drained_end().unwrap();
    assert_eq!(fmt.quiesce_counter(), 0);
}

#[test]
fn resize_reaches_the_device_through_every_parent() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    let file = gate_node(&g, "t-rs-file", &gate);
    let fmt = format_over("t-rs-fmt", &file);
    let b = BlockBackend::new("t-rs", fmt, false);
    let dev = with_dev(&b);
    file.notify_resized();
    assert_eq!(dev.resizes.load(Ordering::SeqCst), 1);
}

#[test]
fn drain_requests_waits_for_own_requests_without_stopping_anyone() {
    // A graph of its own: drain_all here touches only this test's nodes.
    let g = Graph::new();
    let gate = Arc::new(Gate::default());
    let file = gate_node(&g, "t-blk-file", &gate);
    let b = BlockBackend::new("t-blk", file.clone(), false);
    let dev = with_dev(&b);
    let t = IoThread::start("t-blk", Duration::ZERO).unwrap();
    let _unstick = OnDrop(|| gate.open());
    let bb = b.clone();
    t.handle().run(move || {
        crate::uring::spawn(async move {
            let _ = bb.write(0, &buf()).await;
        });
    });
    eventually("request in flight", || b.in_flight() == 1);
    let (tx, rx) = mpsc::channel();
    let b2 = b.clone();
    let waiter = std::thread::spawn(move || {
        b2.drain_requests();
        tx.send(b2.in_flight()).unwrap();
    });
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    // blk_drain is not a drained section: nobody was told to stop.
    assert_eq!((b.quiesce_counter(), file.quiesce_counter()), (0, 0));
    assert_eq!(dev.begins.load(Ordering::SeqCst), 0);
    gate.open();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
    waiter.join().unwrap();
}

#[test]
fn two_graphs_share_nothing() {
    let (g1, g2) = (Graph::new(), Graph::new());
    let gate = Arc::new(Gate::default());
    let a = gate_node(&g1, "same-name", &gate);
    let b = gate_node(&g2, "same-name", &gate);
    g1.drain_all_begin();
    assert_eq!(a.quiesce_counter(), 1);
    assert_eq!(b.quiesce_counter(), 0, "another graph's drain_all");
    let late = gate_node(&g2, "late", &gate);
    assert_eq!(late.quiesce_counter(), 0, "born in another graph");
    g1.drain_all_end();
    assert!(Arc::ptr_eq(&g1.find_node("same-name").unwrap(), &a));
    assert!(Arc::ptr_eq(&g2.find_node("same-name").unwrap(), &b));
    // Node names, the monitor's nodes and jobs are each graph's own.
    let null = |name: &str| serde_json::json!({"driver": "null-co", "node-name": name});
    g1.blockdev_add(null("n0")).unwrap();
    g2.blockdev_add(null("n0")).unwrap();
    let e = g1.blockdev_add(null("n0")).unwrap_err();
    assert_eq!(e.message(), "Duplicate nodes with node-name='n0'");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    g1.release_monitor_nodes();
    let e = g1.blockdev_del("n0").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(g1.find_node("n0").is_none());
    assert!(g2.find_node("n0").is_some());
    assert_eq!(g2.jobs().query_jobs(), serde_json::json!([]));
}

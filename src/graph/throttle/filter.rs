//! The `throttle` filter driver: every read, write, write-zeroes and
//! discard takes its share of the group's budget before it goes on to the
//! `file` child; flushes and size changes pass. Its drain hooks stop the
//! group from granting its requests (see `group.rs`).

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::bucket::Direction;
use super::group::{Member, ThrottleGroup, Waiter};
use crate::formats::{BlockDriver, BlockIo, ChildRef, IoFuture};
use crate::uring::IoVec;

/// The filter's `file` child, read on every request without a lock or a
/// reference count (a locked instruction per request was measured at a
/// quarter of null's IOPS through the filter): a pointer to a boxed
/// `ChildRef`, published with a release store. A child replaced by
/// `set` (a snapshot's overlay put under the filter, in a drained
/// section) stays allocated, and referenced, until the filter closes, so a
/// reference a reader took before the swap stays valid. The old child is
/// the overlay's backing image then, in the graph anyway.
struct FileChild {
    current: AtomicPtr<ChildRef>,
    /// Every child the filter had, the current one included. Boxed: the
    /// pointer in `current` must stay valid when the Vec grows.
    #[allow(clippy::vec_box)]
    all: Mutex<Vec<Box<ChildRef>>>,
}

impl FileChild {
    fn new(child: ChildRef) -> Self {
        let mut b = Box::new(child);
        let p: *mut ChildRef = &mut *b;
        FileChild {
            current: AtomicPtr::new(p),
            all: Mutex::new(vec![b]),
        }
    }

    fn get(&self) -> &ChildRef {
        // SAFETY: `current` always points into a Box held in `all`, which
        // is only emptied when `self` is dropped (so not while this borrow
        // of `self` lives), and a published ChildRef is never written
        // again. Moving a Box within the Vec does not move what it points
        // to.
        unsafe { &*self.current.load(Ordering::Acquire) }
    }

    fn set(&self, child: ChildRef) {
        let mut b = Box::new(child);
        let p: *mut ChildRef = &mut *b;
        self.all.lock().unwrap_or_else(|e| e.into_inner()).push(b);
        self.current.store(p, Ordering::Release);
    }
}

pub(crate) struct ThrottleDriver {
    file: FileChild,
    /// As the child: the filter is as writable as what it filters.
    read_only: AtomicBool,
    group: Arc<ThrottleGroup>,
    member: Arc<Member>,
}

impl ThrottleDriver {
    /// A filter over `file` in `group`.
    pub(crate) fn new(file: ChildRef, read_only: bool, group: Arc<ThrottleGroup>) -> Self {
        let member = group.join();
        ThrottleDriver {
            file: FileChild::new(file),
            read_only: AtomicBool::new(read_only),
            group,
            member,
        }
    }

    fn file(&self) -> &dyn BlockIo {
        &**self.file.get()
    }

    /// Wait until the group grants `bytes` in `dir`, then run the request
    /// `op` makes on the file child as it is then. It is made only then: a
    /// child node counts a request from the moment its future exists, and
    /// a parked one must not count below the filter (nor go to a child a
    /// snapshot replaced meanwhile).
    fn throttled<'a>(
        &'a self,
        dir: Direction,
        bytes: u64,
        op: impl FnOnce(&'a dyn BlockIo) -> IoFuture<'a> + 'a,
    ) -> IoFuture<'a> {
        if self.group.passes_freely(&self.member) {
            return op(self.file());
        }
        Box::pin(async move {
            self.admit(dir, bytes).await;
            op(self.file()).await
        })
    }

    async fn admit(&self, dir: Direction, bytes: u64) {
        let Some(waiter) = self.group.arrive(&self.member, dir, bytes) else {
            return;
        };
        let queued = Instant::now();
        let mut guard = Queued {
            group: &self.group,
            member: &self.member,
            dir,
            waiter,
            done: false,
        };
        let mut first = true;
        poll_fn(|cx| {
            if !first && !guard.waiter.granted() {
                // Woken without a grant (a drained section ended, the
                // limits changed): look at the group ourselves.
                self.group.poll_queue(dir);
            }
            first = false;
            if guard.waiter.granted_or_wait(cx.waker()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        guard.done = true;
        self.member.add_throttled(queued.elapsed());
    }
}

/// A queued request; dropped before its grant, it leaves the queue.
struct Queued<'a> {
    group: &'a Arc<ThrottleGroup>,
    member: &'a Arc<Member>,
    dir: Direction,
    waiter: Arc<Waiter>,
    done: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.done && !self.waiter.granted() {
            self.group.cancel(self.member, self.dir, &self.waiter);
        }
    }
}

impl BlockIo for ThrottleDriver {
    fn size(&self) -> u64 {
        self.file().size()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.throttled(Direction::Read, buf.len() as u64, move |f| {
            f.read(offset, buf)
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.throttled(Direction::Write, buf.len() as u64, move |f| {
            f.write(offset, buf)
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        self.file().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.throttled(Direction::Write, len, move |f| f.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.throttled(Direction::Write, len, move |f| {
            f.write_zeroes(offset, len, may_unmap)
        })
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        self.file().grow(new_size)
    }
    fn write_granularity(&self) -> usize {
        self.file().write_granularity()
    }
}

impl BlockDriver for ThrottleDriver {
    fn driver_name(&self) -> &'static str {
        "throttle"
    }
    fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }
    fn close(&self) -> io::Result<()> {
        Ok(())
    }
    fn drained_begin(&self) {
        self.group.member_drained_begin(&self.member);
    }
    fn drained_end(&self) {
        self.group.member_drained_end(&self.member);
    }
    fn parked(&self) -> u64 {
        self.member.parked()
    }
    fn info(&self) -> Map<String, Value> {
        let (throttled, throttled_ns) = self.member.throttled();
        let mut m = Map::new();
        m.insert("x-throttle-group".into(), json!(self.group.name()));
        m.insert("x-throttle-queued".into(), json!(self.member.parked()));
        m.insert("x-throttled-requests".into(), json!(throttled));
        m.insert("x-throttled-ns".into(), json!(throttled_ns));
        m
    }
    fn is_filter(&self) -> bool {
        true
    }
    /// What `throttled` does without a wait, decided the same way.
    fn passes_to(&self) -> Option<&dyn BlockIo> {
        self.group.passes_freely(&self.member).then(|| self.file())
    }
    /// Drained: no request is between its grant and its child's count;
    /// parked ones go to the new child when they go on.
    fn set_file(&self, file: ChildRef) -> Result<(), crate::error::Error> {
        self.file.set(file);
        Ok(())
    }
    /// Nothing to write back: the node reopens the child (`Node::reopen`).
    fn reopen(&self, read_only: bool) -> Result<(), crate::error::Error> {
        self.read_only.store(read_only, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Waker};

    use super::*;
    use crate::graph::drain_tests::{gate_node, Gate};
    use crate::graph::node::{Child, DetectZeroes};
    use crate::graph::throttle::Limits;
    use crate::graph::{ChildRole, Graph, Node};
    use crate::uring::AlignedBuf;

    fn filter_over(g: &Graph, file: &Arc<Node>, group: Arc<ThrottleGroup>) -> Arc<Node> {
        let driver = ThrottleDriver::new(file.clone(), false, group);
        Node::new(
            g,
            "t0",
            Box::new(driver),
            vec![Child {
                role: ChildRole::File,
                node: file.clone(),
            }],
        )
    }

    /// With nothing to limit, the filter's node hands a read to the child's
    /// driver itself; both nodes count it until it is done.
    #[test]
    fn unlimited_filter_passes_requests_to_its_child_counted_in_both() {
        let g = Graph::new();
        let gate = Arc::new(Gate::default());
        let file = gate_node(&g, "n0", &gate);
        let filter = filter_over(&g, &file, ThrottleGroup::new("tg0", Limits::default()));
        let iov = IoVec::from_buf(AlignedBuf::zeroed(512, 512));
        let mut cx = Context::from_waker(Waker::noop());

        let mut read = Box::pin(filter.read_in_place(0, &iov));
        assert!(read.as_mut().poll(&mut cx).is_pending());
        assert_eq!((filter.in_flight(), file.in_flight()), (1, 1));
        assert_eq!(file.requests(), 1);
        gate.open();
        assert!(read.as_mut().poll(&mut cx).is_ready());
        drop(read);
        assert_eq!((filter.in_flight(), file.in_flight()), (0, 0));
    }

    /// In a drained section the same filter passes nothing: the request
    /// waits in the group's queue, parked, and the child never sees it.
    #[test]
    fn drained_unlimited_filter_parks_requests_above_the_child() {
        let g = Graph::new();
        let gate = Arc::new(Gate::default());
        gate.open();
        let file = gate_node(&g, "n0", &gate);
        let filter = filter_over(&g, &file, ThrottleGroup::new("tg0", Limits::default()));
        let iov = IoVec::from_buf(AlignedBuf::zeroed(512, 512));
        let mut cx = Context::from_waker(Waker::noop());

        filter.drained_begin();
        let mut write = Box::pin(filter.write_in_place(0, &iov));
        assert!(write.as_mut().poll(&mut cx).is_pending());
        assert_eq!((filter.in_flight(), file.in_flight()), (1, 0));
        assert_eq!(filter.driver_info()["x-throttle-queued"], 1);
        assert_eq!(file.requests(), 0);
        filter.drained_end().unwrap();
        assert!(write.as_mut().poll(&mut cx).is_ready());
        drop(write);
        assert_eq!(file.requests(), 1);
        assert_eq!((filter.in_flight(), file.in_flight()), (0, 0));
    }

    /// Records which operation reached it.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<&'static str>>);

    impl Recorder {
        fn op(&self, name: &'static str) -> IoFuture<'_> {
            self.0.lock().unwrap().push(name);
            Box::pin(std::future::ready(Ok(())))
        }
    }

    impl BlockIo for Arc<Recorder> {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
            self.op("read")
        }
        fn write<'a>(&'a self, _: u64, _: &'a IoVec) -> IoFuture<'a> {
            self.op("write")
        }
        fn flush(&self) -> IoFuture<'_> {
            self.op("flush")
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_> {
            self.op("discard")
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> IoFuture<'_> {
            self.op("write_zeroes")
        }
    }

    impl BlockDriver for Arc<Recorder> {
        fn driver_name(&self) -> &'static str {
            "recorder"
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn close(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A write passed straight to the child still meets the child's
    /// `detect-zeroes`, as if the filter had passed it on itself.
    #[test]
    fn passed_writes_keep_the_childs_detect_zeroes() {
        let g = Graph::new();
        let rec = Arc::new(Recorder::default());
        let file = Node::new(&g, "n0", Box::new(rec.clone()), vec![]);
        file.set_io_options(false, DetectZeroes::On);
        let filter = filter_over(&g, &file, ThrottleGroup::new("tg0", Limits::default()));
        let mut cx = Context::from_waker(Waker::noop());
        let zeroes = IoVec::from_buf(AlignedBuf::zeroed(512, 512));
        let mut data = AlignedBuf::zeroed(512, 512);
        data.as_mut_slice()[7] = 1;
        let data = IoVec::from_buf(data);

        for iov in [&zeroes, &data] {
            let mut w = Box::pin(filter.write_in_place(0, iov));
            assert!(w.as_mut().poll(&mut cx).is_ready());
        }
        assert_eq!(*rec.0.lock().unwrap(), ["write_zeroes", "write"]);
    }
}

//! The `throttle` filter driver: every read, write, write-zeroes and
//! discard takes its share of the group's budget before it goes on to the
//! `file` child; flushes and size changes pass. Its drain hooks stop the
//! group from granting its requests (see `group.rs`).

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::bucket::Direction;
use super::group::{Member, ThrottleGroup, Waiter};
use crate::formats::{BlockDriver, BlockIo, ChildRef, IoFuture};
use crate::uring::IoVec;

pub(crate) struct ThrottleDriver {
    /// Changed only in a drained section (a snapshot puts an overlay
    /// under the filter); read when a request is dispatched.
    file: RwLock<ChildRef>,
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
            file: RwLock::new(file),
            read_only: AtomicBool::new(read_only),
            group,
            member,
        }
    }

    fn file(&self) -> ChildRef {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
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
        op: impl FnOnce(ChildRef) -> IoFuture<'a> + 'a,
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
            Box::pin(async move { f.read(offset, buf).await })
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVec) -> IoFuture<'a> {
        self.throttled(Direction::Write, buf.len() as u64, move |f| {
            Box::pin(async move { f.write(offset, buf).await })
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        let f = self.file();
        Box::pin(async move { f.flush().await })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        self.throttled(Direction::Write, len, move |f| {
            Box::pin(async move { f.discard(offset, len).await })
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_> {
        self.throttled(Direction::Write, len, move |f| {
            Box::pin(async move { f.write_zeroes(offset, len, may_unmap).await })
        })
    }
    fn grow(&self, new_size: u64) -> IoFuture<'_> {
        let f = self.file();
        Box::pin(async move { f.grow(new_size).await })
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
    /// Drained: no request is between its grant and its child's count.
    fn set_file(&self, file: ChildRef) -> Result<(), crate::error::Error> {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = file;
        Ok(())
    }
    /// Nothing to write back: the node reopens the child (`Node::reopen`).
    fn reopen(&self, read_only: bool) -> Result<(), crate::error::Error> {
        self.read_only.store(read_only, Ordering::SeqCst);
        Ok(())
    }
}

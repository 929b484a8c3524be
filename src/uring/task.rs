//! Task futures in recycled memory. Every guest request is a task; with a
//! queue's worth of them in flight, each allocation and free went past
//! glibc's per-thread cache (7 blocks per size) into its slower paths
//! and the arena lock: `_int_free` alone was 15% of a polling-client
//! profile. An iothread
//! keeps the blocks of finished tasks, by layout, for the next ones.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Blocks kept per layout: far more than a queue of the default size has
/// requests in flight; beyond that, finished tasks' memory is freed.
const KEEP_PER_LAYOUT: usize = 4096;

/// A future the runtime polls in place, in memory from [`TaskMemory`].
pub(super) struct Task {
    fut: NonNull<dyn Future<Output = ()>>,
    layout: Layout,
}

impl Task {
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `fut` points to a live future we own (written in `spawn`,
        // dropped only in `finish` or `drop`), which never moves until
        // then: pinning holds.
        unsafe { Pin::new_unchecked(self.fut.as_mut()) }.poll(cx)
    }

    /// Drop the future and keep its memory for the next task.
    pub(super) fn finish(self, memory: &TaskMemory) {
        let (fut, layout) = (self.fut, self.layout);
        std::mem::forget(self);
        // SAFETY: we own the future and drop it exactly once (`self` is
        // forgotten, so `Drop` does not run).
        unsafe { std::ptr::drop_in_place(fut.as_ptr()) };
        memory.recycle(fut.cast(), layout);
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // SAFETY: as in `finish`: the future is ours, dropped once, then
        // its block is returned to the allocator it came from.
        unsafe {
            std::ptr::drop_in_place(self.fut.as_ptr());
            dealloc(self.fut.cast(), self.layout);
        }
    }
}

/// Blocks of finished tasks, by layout (a handful of future types run as
/// tasks, so a short list).
#[derive(Default)]
pub(super) struct TaskMemory {
    free: RefCell<Vec<(Layout, Vec<NonNull<u8>>)>>,
}

impl TaskMemory {
    /// Build the future `make` returns in a kept block of its layout, or a
    /// new one. Built there, not moved there: a request's future is ~1 KiB,
    /// and copying it was ~5% of a polling-client profile.
    pub(super) fn spawn<F: Future<Output = ()> + 'static>(&self, make: impl FnOnce() -> F) -> Task {
        let layout = Layout::new::<F>();
        let block = self.take(layout).unwrap_or_else(|| alloc_block(layout));
        let ptr = block.cast::<F>();
        // SAFETY: `block` is valid for `layout`, that is for one F, and
        // holds no value (new, or recycled after its future was dropped).
        unsafe { ptr.as_ptr().write(make()) };
        Task { fut: ptr, layout }
    }

    fn take(&self, layout: Layout) -> Option<NonNull<u8>> {
        let mut free = self.free.borrow_mut();
        free.iter_mut().find(|(l, _)| *l == layout)?.1.pop()
    }

    fn recycle(&self, block: NonNull<u8>, layout: Layout) {
        let mut free = self.free.borrow_mut();
        let list = match free.iter().position(|(l, _)| *l == layout) {
            Some(i) => &mut free[i].1,
            None => {
                free.push((layout, Vec::new()));
                &mut free.last_mut().expect("just pushed").1
            }
        };
        if list.len() < KEEP_PER_LAYOUT {
            list.push(block);
        } else {
            // SAFETY: the block came from `alloc_block` with this layout
            // and holds no value any more.
            unsafe { dealloc(block, layout) };
        }
    }
}

impl Drop for TaskMemory {
    fn drop(&mut self) {
        for (layout, blocks) in self.free.get_mut().drain(..) {
            for b in blocks {
                // SAFETY: kept blocks came from `alloc_block` with their
                // list's layout and hold no value.
                unsafe { dealloc(b, layout) };
            }
        }
    }
}

fn alloc_block(layout: Layout) -> NonNull<u8> {
    if layout.size() == 0 {
        // A zero-sized future needs an aligned address, not memory.
        return NonNull::new(std::ptr::without_provenance_mut(layout.align()))
            .expect("alignments are never 0");
    }
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc::alloc(layout) };
    NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

/// # Safety
/// `block` came from [`alloc_block`] with `layout` and holds no value.
unsafe fn dealloc(block: NonNull<u8>, layout: Layout) {
    if layout.size() != 0 {
        // SAFETY: the caller's contract.
        unsafe { alloc::dealloc(block.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    /// Counts its drops; ready at once. The payload gives it a size of
    /// its own (blocks are kept by layout).
    struct Probe(Rc<Cell<u32>>, #[allow(dead_code)] [u64; 8]);

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn a_finished_task_s_block_serves_the_next_task_of_its_layout() {
        let memory = TaskMemory::default();
        let drops = Rc::new(Cell::new(0));
        let mut t = memory.spawn(|| Probe(drops.clone(), [1; 8]));
        let first = t.fut.cast::<u8>();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(t.poll(&mut cx).is_ready());
        t.finish(&memory);
        assert_eq!(drops.get(), 1, "finish drops the future");
        let t = memory.spawn(|| Probe(drops.clone(), [2; 8]));
        assert_eq!(t.fut.cast::<u8>(), first, "the block was reused");
        let other = memory.spawn(|| async {});
        drop(other);
        drop(t);
        assert_eq!(
            drops.get(),
            2,
            "dropping an unfinished task drops its future"
        );
    }
}

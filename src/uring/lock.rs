//! An async mutex for state shared between iothreads (qcow2 metadata).
//! A waiter parks its task; the unlocking thread wakes it through its
//! waker, which posts to the waiter's own iothread.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

struct State {
    locked: bool,
    waiters: VecDeque<Waker>,
}

pub(crate) struct AsyncMutex<T> {
    state: Mutex<State>,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`, like std's Mutex.
unsafe impl<T: Send> Send for AsyncMutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for AsyncMutex<T> {}

impl<T> AsyncMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        AsyncMutex {
            state: Mutex::new(State {
                locked: false,
                waiters: VecDeque::new(),
            }),
            value: UnsafeCell::new(value),
        }
    }

    pub(crate) fn lock(&self) -> Lock<'_, T> {
        Lock { mutex: self }
    }

    fn unlock(&self) {
        let waiters = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.locked = false;
            std::mem::take(&mut st.waiters)
        };
        // Wake everyone: a woken waiter whose future was dropped cannot
        // swallow the only wake-up this way.
        for w in waiters {
            w.wake();
        }
    }
}

pub(crate) struct Lock<'a, T> {
    mutex: &'a AsyncMutex<T>,
}

impl<'a, T> Future for Lock<'a, T> {
    type Output = Guard<'a, T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Guard<'a, T>> {
        let mut st = self.mutex.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.locked {
            st.locked = true;
            return Poll::Ready(Guard { mutex: self.mutex });
        }
        if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            st.waiters.push_back(cx.waker().clone());
        }
        Poll::Pending
    }
}

pub(crate) struct Guard<'a, T> {
    mutex: &'a AsyncMutex<T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves we hold the lock.
        unsafe { &*self.mutex.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves we hold the lock, exclusively.
        unsafe { &mut *self.mutex.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::uring::{ops, IoThread};

    #[test]
    fn holders_on_two_iothreads_exclude_each_other() {
        let m = Arc::new(AsyncMutex::new((0u64, false)));
        let threads: Vec<_> = (0..2)
            .map(|i| IoThread::start(&format!("lock{i}"), Duration::ZERO).unwrap())
            .collect();
        let results: Vec<_> = threads
            .iter()
            .map(|t| {
                let m = m.clone();
                let (tx, rx) = std::sync::mpsc::channel();
                t.handle().run(move || {
                    for _ in 0..50 {
                        let m = m.clone();
                        let tx = tx.clone();
                        crate::uring::spawn(async move {
                            for _ in 0..20 {
                                let mut g = m.lock().await;
                                assert!(!g.1, "two holders at once");
                                g.1 = true;
                                // Yield to the ring while holding the lock.
                                ops::fsync(-1, true).await.ok();
                                g.0 += 1;
                                g.1 = false;
                            }
                            tx.send(()).unwrap();
                        });
                    }
                });
                rx
            })
            .collect();
        for rx in results {
            for _ in 0..50 {
                rx.recv_timeout(Duration::from_secs(30)).unwrap();
            }
        }
        let total = threads[0]
            .handle()
            .block_on(move || async move { m.lock().await.0 });
        assert_eq!(total, 2 * 50 * 20);
    }
}

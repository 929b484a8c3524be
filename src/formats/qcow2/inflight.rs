//! Serialising cluster allocation: while one request allocates a guest
//! cluster, others that want to allocate the same cluster wait, then find
//! it allocated and write in place. Two writers never both allocate it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use super::keyed::U64Map;

#[derive(Default)]
pub(super) struct ClusterLocks {
    held: Mutex<U64Map<Vec<Waker>>>,
}

impl ClusterLocks {
    pub(super) fn lock(&self, cluster: u64) -> LockCluster<'_> {
        LockCluster {
            locks: self,
            cluster,
        }
    }
}

pub(super) struct LockCluster<'a> {
    locks: &'a ClusterLocks,
    cluster: u64,
}

impl<'a> Future for LockCluster<'a> {
    type Output = ClusterGuard<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ClusterGuard<'a>> {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.get_mut(&self.cluster) {
            None => {
                held.insert(self.cluster, Vec::new());
                Poll::Ready(ClusterGuard {
                    locks: self.locks,
                    cluster: self.cluster,
                })
            }
            Some(waiters) => {
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

pub(super) struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    cluster: u64,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let waiters = self
            .locks
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.cluster)
            .unwrap_or_default();
        for w in waiters {
            w.wake();
        }
    }
}

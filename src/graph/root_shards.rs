//! A BlockBackend's root as its requests read it: one copy per thread
//! shard. Every request used to take the backend's `RwLock` for reading and
//! clone the root's `Arc`: two atomic writes to cache lines that every
//! iothread serving a queue of the backend shares. Here a request locks its
//! own shard (nobody else takes it but a graph change) and clones that
//! shard's handle, whose count lives on a line of its own.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use super::in_flight::{my_shard, SHARDS};
use super::Node;

/// A shard's handle on the root, alone on its cache lines (128 bytes:
/// adjacent-line prefetching pairs 64-byte lines on x86), so that the
/// `Arc` counts of two shards never share a line.
#[repr(align(128))]
pub(crate) struct RootHandle(Arc<Node>);

impl Deref for RootHandle {
    type Target = Arc<Node>;
    fn deref(&self) -> &Arc<Node> {
        &self.0
    }
}

#[repr(align(128))]
struct Shard(Mutex<Option<Arc<RootHandle>>>);

pub(super) struct RootShards {
    shards: [Shard; SHARDS],
}

impl RootShards {
    pub(super) fn new() -> Self {
        RootShards {
            shards: std::array::from_fn(|_| Shard(Mutex::new(None))),
        }
    }

    /// The root for one request on this thread (None: ejected).
    pub(super) fn get(&self) -> Option<Arc<RootHandle>> {
        self.shards[my_shard()]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Point every shard at `node` (attach, replace_root, eject; the
    /// caller holds the backend's root lock). Requests holding the old
    /// handle finish with it; the old root is released when the last does.
    pub(super) fn set(&self, node: Option<&Arc<Node>>) {
        for s in &self.shards {
            let handle = node.map(|n| Arc::new(RootHandle(n.clone())));
            *s.0.lock().unwrap_or_else(|e| e.into_inner()) = handle;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::NullDriver;

    fn node(name: &str) -> Arc<Node> {
        Node::new(name, Box::new(NullDriver::new(4096)), vec![])
    }

    #[test]
    fn every_thread_sees_the_new_root_and_old_handles_keep_theirs() {
        let (a, b) = (node("a"), node("b"));
        let roots = Arc::new(RootShards::new());
        assert!(roots.get().is_none(), "nothing attached yet");
        roots.set(Some(&a));
        let held = roots.get().expect("attached");
        roots.set(Some(&b));
        // More threads than shards: every shard was updated.
        let threads: Vec<_> = (0..2 * SHARDS)
            .map(|_| {
                let roots = roots.clone();
                std::thread::spawn(move || roots.get().map(|h| h.name().to_string()))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().as_deref(), Some("b"));
        }
        // A request that took the old root finishes with it.
        assert_eq!(held.name(), "a");
        let weak_a = Arc::downgrade(&a);
        drop(a);
        assert!(weak_a.upgrade().is_some(), "the held handle keeps it");
        drop(held);
        assert!(weak_a.upgrade().is_none(), "no shard keeps the old root");
        roots.set(None);
        assert!(roots.get().is_none(), "ejected");
    }
}

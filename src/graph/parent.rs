//! The parent side of a child edge (QEMU: BdrvChildClass). Drain spreads
//! from a node to its parents through these callbacks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// What a node's parent (another node, or a BlockBackend) must do when the
/// node is drained or resized.
pub(crate) trait Parent: Send + Sync {
    /// Stop sending new requests to the child. Must not change the graph
    /// and must not wait.
    fn drained_begin(&self);
    /// Resume sending requests. Must not wait.
    fn drained_end(&self);
    /// Whether the parent still has requests of its own in flight, beyond
    /// `parked` of them: requests waiting in a throttle queue below it,
    /// which its count includes but which stay where they are while the
    /// section lasts.
    fn drained_poll(&self, parked: u64) -> bool;
    /// The child's size changed.
    fn resized(&self);
}

/// Edge ids are unique in the process, not per graph: a counter, not
/// graph state (no graph ever sees another's edges).
static NEXT_EDGE: AtomicU64 = AtomicU64::new(1);

struct Edge {
    id: u64,
    parent: Weak<dyn Parent>,
    /// This edge holds one drained_begin on the parent (QEMU:
    /// BdrvChild.quiesced_parent), so each edge is ended exactly once.
    quiesced: bool,
}

/// The edges pointing at a node from its parents.
#[derive(Default)]
pub(super) struct Parents(Mutex<Vec<Edge>>);

impl Parents {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Edge>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    // The callbacks below run with this node's parent list locked, so an
    // edge's `quiesced` flag and the drain it holds on its parent change
    // together even if an edge is detached concurrently. Locks are only
    // ever taken child first, then parent (drain spreads upwards), so
    // holding them across the calls cannot deadlock. Parents we upgraded
    // are released only after the lock: dropping the last reference to a
    // parent node would detach it from us, which needs this lock.

    /// Add an edge; if the child is quiesced the new parent is drained at
    /// once, so a parent never sends requests into a drained node.
    pub(super) fn attach(&self, parent: Weak<dyn Parent>, child_quiesced: bool) -> u64 {
        let id = NEXT_EDGE.fetch_add(1, Ordering::Relaxed);
        let p = parent.upgrade();
        let mut edges = self.lock();
        if let (true, Some(p)) = (child_quiesced, &p) {
            p.drained_begin();
        }
        edges.push(Edge {
            id,
            parent,
            quiesced: child_quiesced && p.is_some(),
        });
        id
    }

    /// Remove an edge, ending the drain it held on the parent.
    pub(super) fn detach(&self, id: u64) {
        let mut keep = None;
        let mut edges = self.lock();
        let Some(i) = edges.iter().position(|e| e.id == id) else {
            return;
        };
        let edge = edges.swap_remove(i);
        if edge.quiesced {
            keep = edge.parent.upgrade();
            if let Some(p) = &keep {
                p.drained_end();
            }
        }
        drop(edges);
        drop(keep);
    }

    /// Mark every edge quiesced and call the parents' `drained_begin` (a
    /// parent node recurses into its own parents).
    pub(super) fn drained_begin(&self) {
        let mut keep = Vec::new();
        let mut edges = self.lock();
        for e in edges.iter_mut().filter(|e| !e.quiesced) {
            if let Some(p) = e.parent.upgrade() {
                e.quiesced = true;
                p.drained_begin();
                keep.push(p);
            }
        }
        drop(edges);
    }

    pub(super) fn drained_end(&self) {
        let mut keep = Vec::new();
        let mut edges = self.lock();
        for e in edges.iter_mut().filter(|e| e.quiesced) {
            e.quiesced = false;
            if let Some(p) = e.parent.upgrade() {
                p.drained_end();
                keep.push(p);
            }
        }
        drop(edges);
    }

    /// The live parents right now (never cached across a wait).
    pub(super) fn live(&self) -> Vec<Arc<dyn Parent>> {
        self.lock()
            .iter()
            .filter_map(|e| e.parent.upgrade())
            .collect()
    }

    pub(super) fn count(&self) -> usize {
        self.lock()
            .iter()
            .filter(|e| e.parent.strong_count() > 0)
            .count()
    }
}

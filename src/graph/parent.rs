//! The parent side of a child edge (QEMU: BdrvChildClass). Drain spreads
//! from a node to its parents through these callbacks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// What a node's parent (another node, or a BlockBackend) must do when the
/// node is drained or resized.
pub trait Parent: Send + Sync {
    /// Stop sending new requests to the child. Must not change the graph
    /// and must not wait.
    fn drained_begin(&self);
    /// Resume sending requests. Must not wait.
    fn drained_end(&self);
    /// Whether the parent still has requests of its own in flight.
    fn drained_poll(&self) -> bool;
    /// The child's size changed.
    fn resized(&self);
}

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

    /// Add an edge; if the child is quiesced the new parent is drained at
    /// once, so a parent never sends requests into a drained node.
    pub(super) fn attach(&self, parent: Weak<dyn Parent>, child_quiesced: bool) -> u64 {
        let id = NEXT_EDGE.fetch_add(1, Ordering::Relaxed);
        let p = parent.upgrade();
        self.lock().push(Edge {
            id,
            parent,
            quiesced: child_quiesced && p.is_some(),
        });
        if let (true, Some(p)) = (child_quiesced, p) {
            p.drained_begin();
        }
        id
    }

    /// Remove an edge, ending the drain it held on the parent.
    pub(super) fn detach(&self, id: u64) {
        let edge = {
            let mut edges = self.lock();
            let Some(i) = edges.iter().position(|e| e.id == id) else {
                return;
            };
            edges.swap_remove(i)
        };
        if edge.quiesced {
            if let Some(p) = edge.parent.upgrade() {
                p.drained_end();
            }
        }
    }

    /// Mark every edge quiesced and call the parents' `drained_begin`
    /// (outside the lock: a parent node recurses into its own parents).
    pub(super) fn drained_begin(&self) {
        let todo: Vec<Arc<dyn Parent>> = self
            .lock()
            .iter_mut()
            .filter(|e| !e.quiesced)
            .filter_map(|e| {
                let p = e.parent.upgrade()?;
                e.quiesced = true;
                Some(p)
            })
            .collect();
        for p in todo {
            p.drained_begin();
        }
    }

    pub(super) fn drained_end(&self) {
        let todo: Vec<Arc<dyn Parent>> = self
            .lock()
            .iter_mut()
            .filter(|e| e.quiesced)
            .filter_map(|e| {
                e.quiesced = false;
                e.parent.upgrade()
            })
            .collect();
        for p in todo {
            p.drained_end();
        }
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

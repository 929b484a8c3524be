//! Every open node, in opening order (QEMU: all_bdrv_states), and every
//! BlockBackend: for `query-named-block-nodes`, lookups by node-name and
//! drain_all.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::backend::BlockBackend;
use super::node::Node;

/// Weak references to every live object of one kind.
struct Registry<T>(Mutex<Vec<Weak<T>>>);

impl<T> Registry<T> {
    const fn new() -> Self {
        Registry(Mutex::new(Vec::new()))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Weak<T>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, item: &Arc<T>) {
        self.lock().push(Arc::downgrade(item));
    }

    /// Forget items that are gone (called from a dying item's drop).
    fn unregister_dead(&self) {
        self.lock().retain(|w| w.strong_count() > 0);
    }

    fn all(&self) -> Vec<Arc<T>> {
        self.lock().iter().filter_map(Weak::upgrade).collect()
    }
}

static NODES: Registry<Node> = Registry::new();
static BACKENDS: Registry<BlockBackend> = Registry::new();

pub(super) fn register(node: &Arc<Node>) {
    NODES.register(node);
}

/// Forget nodes that have closed (called from a closing node's drop).
pub(super) fn unregister_dead() {
    NODES.unregister_dead();
}

/// Every node open right now.
pub fn all_nodes() -> Vec<Arc<Node>> {
    NODES.all()
}

/// The open node called `name`.
/// A name for a node nobody named (QEMU's `#blockNNN`; users cannot
/// give names starting with '#').
pub(crate) fn auto_node_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("#block{n:03}")
}

pub fn find_node(name: &str) -> Option<Arc<Node>> {
    all_nodes().into_iter().find(|n| n.name() == name)
}

pub(super) fn register_backend(b: &Arc<BlockBackend>) {
    BACKENDS.register(b);
}

pub(super) fn unregister_dead_backends() {
    BACKENDS.unregister_dead();
}

/// Every BlockBackend alive right now, with or without a medium.
pub fn all_backends() -> Vec<Arc<BlockBackend>> {
    BACKENDS.all()
}

//! Every open node, in opening order (QEMU: all_bdrv_states), for
//! `query-named-block-nodes`, lookups by node-name and drain_all.

use std::sync::{Arc, Mutex, Weak};

use super::backend::BlockBackend;
use super::node::Node;

static NODES: Mutex<Vec<Weak<Node>>> = Mutex::new(Vec::new());

fn lock() -> std::sync::MutexGuard<'static, Vec<Weak<Node>>> {
    NODES.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn register(node: &Arc<Node>) {
    lock().push(Arc::downgrade(node));
}

/// Forget nodes that have closed (called from a closing node's drop).
pub(super) fn unregister_dead() {
    lock().retain(|w| w.strong_count() > 0);
}

/// Every node open right now.
pub fn all_nodes() -> Vec<Arc<Node>> {
    lock().iter().filter_map(Weak::upgrade).collect()
}

/// The open node called `name`.
pub fn find_node(name: &str) -> Option<Arc<Node>> {
    all_nodes().into_iter().find(|n| n.name() == name)
}

static BACKENDS: Mutex<Vec<Weak<BlockBackend>>> = Mutex::new(Vec::new());

fn backends_lock() -> std::sync::MutexGuard<'static, Vec<Weak<BlockBackend>>> {
    BACKENDS.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn register_backend(b: &Arc<BlockBackend>) {
    backends_lock().push(Arc::downgrade(b));
}

pub(super) fn unregister_dead_backends() {
    backends_lock().retain(|w| w.strong_count() > 0);
}

/// Every BlockBackend alive right now, with or without a medium.
pub fn all_backends() -> Vec<Arc<BlockBackend>> {
    backends_lock().iter().filter_map(Weak::upgrade).collect()
}

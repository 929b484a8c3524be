//! The block graph as a value: every open node (in opening order, QEMU's
//! all_bdrv_states), every BlockBackend, the nodes the monitor holds, the
//! jobs, the drain_all depth and the lock graph changes take. The daemon
//! owns one; tests build as many as they like. Nodes and BlockBackends
//! keep a handle to the graph they belong to.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::backend::BlockBackend;
use super::job::Jobs;
use super::node::Node;
use super::throttle::ThrottleGroups;

/// Weak references to every live object of one kind.
struct Registry<T>(Mutex<Vec<Weak<T>>>);

impl<T> Registry<T> {
    fn new() -> Self {
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

struct Inner {
    nodes: Registry<Node>,
    backends: Registry<BlockBackend>,
    /// Nodes added by `blockdev-add` (QMP or `--blockdev`): the monitor
    /// holds them open until `blockdev-del` or shutdown (QEMU's
    /// monitor-owned nodes).
    monitor_owned: Mutex<Vec<Arc<Node>>>,
    jobs: Arc<Jobs>,
    /// `throttle-group` objects, which `throttle` nodes name.
    throttle_groups: ThrottleGroups,
    lock: Mutex<()>,
    /// Depth of `drain_all` sections: a node opened inside one starts drained.
    drain_all_depth: AtomicU32,
    next_auto_name: AtomicU64,
}

/// One block graph. Cloning gives another handle to the same graph.
///
/// A monitor-owned node holds the graph it is in, so a graph lives until
/// `release_monitor_nodes` (shutdown) and its last node are gone.
#[derive(Clone)]
pub struct Graph(Arc<Inner>);

impl Default for Graph {
    fn default() -> Self {
        Self::new()
    }
}

impl Graph {
    pub fn new() -> Self {
        Graph(Arc::new(Inner {
            nodes: Registry::new(),
            backends: Registry::new(),
            monitor_owned: Mutex::new(Vec::new()),
            jobs: Arc::new(Jobs::default()),
            throttle_groups: ThrottleGroups::default(),
            lock: Mutex::new(()),
            drain_all_depth: AtomicU32::new(0),
            next_auto_name: AtomicU64::new(0),
        }))
    }

    /// Graph changes (QMP commands, a job finishing) run one at a time
    /// under this lock, on the thread that took it. Iothreads never take
    /// it: they are kept out by drained sections.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.0.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every node open right now.
    pub fn all_nodes(&self) -> Vec<Arc<Node>> {
        self.0.nodes.all()
    }

    /// The open node called `name`.
    pub fn find_node(&self, name: &str) -> Option<Arc<Node>> {
        self.all_nodes().into_iter().find(|n| n.name() == name)
    }

    /// Every BlockBackend alive right now, with or without a medium.
    pub fn all_backends(&self) -> Vec<Arc<BlockBackend>> {
        self.0.backends.all()
    }

    /// The BlockBackend called `name` (an export's id) that has a medium
    /// (QEMU's blk_by_name).
    pub fn find_backend(&self, name: &str) -> Option<Arc<BlockBackend>> {
        self.all_backends()
            .into_iter()
            .find(|b| b.name() == name && b.root().is_some())
    }

    /// A node named by QEMU's `device` (a BlockBackend, meaning its root)
    /// or, failing that, `node-name` (QEMU's bdrv_lookup_bs).
    pub fn lookup_node(&self, device: Option<&str>, node_name: Option<&str>) -> Option<Arc<Node>> {
        device
            .and_then(|d| self.find_backend(d))
            .and_then(|b| b.root())
            .or_else(|| node_name.and_then(|n| self.find_node(n)))
    }

    /// The throttle groups of this graph.
    pub fn throttle_groups(&self) -> &ThrottleGroups {
        &self.0.throttle_groups
    }

    /// The jobs of this graph.
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.0.jobs
    }

    /// A name for a node nobody named (QEMU's `#blockNNN`; users cannot
    /// give names starting with '#').
    pub(crate) fn auto_node_name(&self) -> String {
        let n = self.0.next_auto_name.fetch_add(1, Ordering::Relaxed);
        format!("#block{n:03}")
    }

    pub(super) fn register(&self, node: &Arc<Node>) {
        self.0.nodes.register(node);
    }

    /// Forget nodes that have closed (called from a closing node's drop).
    pub(super) fn unregister_dead(&self) {
        self.0.nodes.unregister_dead();
    }

    pub(super) fn register_backend(&self, b: &Arc<BlockBackend>) {
        self.0.backends.register(b);
    }

    pub(super) fn unregister_dead_backends(&self) {
        self.0.backends.unregister_dead();
    }

    pub(super) fn monitor_owned(&self) -> MutexGuard<'_, Vec<Arc<Node>>> {
        self.0
            .monitor_owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn drain_all_depth(&self) -> &AtomicU32 {
        &self.0.drain_all_depth
    }

    /// Whether two handles are to the same graph.
    pub fn same(&self, other: &Graph) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("nodes", &self.0.nodes.lock().len())
            .finish()
    }
}

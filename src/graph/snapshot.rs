//! External snapshots and QMP transactions of them (QEMU's
//! `blockdev-snapshot-sync`, `blockdev-snapshot`, `transaction`).
//!
//! A snapshot puts a qcow2 overlay above a node: the overlay's backing
//! image is the node, every BlockBackend and throttle filter on the node
//! moves to the overlay, and the node is reopened read-only. A snapshot of
//! a throttle filter is one of the node below it. A transaction applies several at
//! once, all or none. First, with the guest still running and without the
//! graph lock, it creates the new overlay files (the slow, synced part).
//! Then, under the graph lock, it drains the nodes the actions name (and
//! with them their BlockBackends and what lies below; QEMU drains every
//! node here, but the disks a transaction does not name need not wait for
//! it), prepares each action (open the overlay over the node), then
//! commits them all or, if one failed, aborts those prepared, in reverse,
//! and deletes the files it created. Nothing is synced while the guest
//! waits: the overlay's next flush syncs the old image first. Every phase
//! runs on the calling (control) thread; no lock is held across phases
//! that an iothread could want.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::backend::move_users;
use super::blockdev::check_new_node_name;
use super::drain::Drained;
use super::node::{ChildRole, Node};
use super::open::{open_file_node, open_qcow2_node};
use super::registry::Graph;
use crate::error::Error;
use crate::formats::qcow2::create::{create, CreateOptions, DEFAULT_CLUSTER_SIZE};
use crate::formats::qcow2::Qcow2Options;
use crate::formats::{BlockIo, CacheMode, ImageLock};

/// Where a `blockdev-snapshot-sync` overlay comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayMode {
    /// Create the file, naming the node's image as its backing file.
    AbsolutePaths,
    /// Open the file as it is (the caller made it, backing file and all).
    Existing,
}

/// One action of a transaction.
pub enum Action {
    /// `blockdev-snapshot-sync`: an overlay file, created or opened here.
    SnapshotSync {
        node: Arc<Node>,
        file: PathBuf,
        node_name: Option<String>,
        mode: OverlayMode,
    },
    /// `blockdev-snapshot`: an overlay node `blockdev-add` opened.
    Snapshot { node: Arc<Node>, overlay: Arc<Node> },
    /// QEMU's `abort`: fails in prepare, to test the abort path.
    Abort,
}

/// An action whose prepare succeeded: what commit or abort works on.
struct Prepared {
    node: Arc<Node>,
    overlay: Arc<Node>,
    /// The overlay was `blockdev-add`ed: abort only unhooks its backing.
    added: bool,
}

fn err<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::invalid(msg))
}

impl Graph {
    /// Apply `actions` atomically: all of them, or (on the first error, which
    /// is returned) none. Their nodes are nodes of this graph. Takes the
    /// graph lock once the overlay files exist.
    pub fn transaction(&self, actions: Vec<Action>) -> Result<(), Error> {
        let actions: Vec<Action> = actions.into_iter().map(below_filters).collect();
        // Before the drained section, so the guest does not wait for it: the
        // new overlay files are created and synced.
        let mut made: Vec<PathBuf> = Vec::new();
        for a in &actions {
            if let Action::SnapshotSync {
                node,
                file,
                mode: OverlayMode::AbsolutePaths,
                ..
            } = a
            {
                if let Err(e) = create_overlay_file(node, file) {
                    remove_files(&made);
                    return Err(e);
                }
                made.push(file.clone());
            }
        }
        let _lock = self.lock();
        let mut touched: Vec<Arc<Node>> = Vec::new();
        for a in &actions {
            let nodes = match a {
                Action::SnapshotSync { node, .. } => vec![node],
                Action::Snapshot { node, overlay } => vec![node, overlay],
                Action::Abort => vec![],
            };
            for n in nodes {
                if !n.graph().same(self) {
                    remove_files(&made);
                    return err(format!("Node '{}' is not in this graph", n.name()));
                }
                if !touched.iter().any(|t| Arc::ptr_eq(t, n)) {
                    touched.push(n.clone());
                }
            }
        }
        let started = Instant::now();
        let section = Drained::begin(touched);
        let drained = Instant::now();
        let mut prepared: Vec<Prepared> = Vec::new();
        let mut failure = None;
        for a in actions {
            match prepare(a, &prepared) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            None => prepared.into_iter().for_each(commit),
            Some(_) => prepared.into_iter().rev().for_each(abort),
        }
        drop(section);
        log::info!(
            "transaction: {} in {:?} (waiting for requests in flight {:?}, drained {:?})",
            if failure.is_some() { "aborted" } else { "done" },
            started.elapsed(),
            drained - started,
            drained.elapsed()
        );
        if failure.is_some() {
            // The overlays that used them are closed by now.
            remove_files(&made);
        }
        failure.map_or(Ok(()), Err)
    }
}

/// A snapshot of a filter (a `throttle` node) is a snapshot of the node it
/// filters: the overlay goes under the filter, so that the limit keeps
/// applying to the disk's new active layer, and requests waiting in the
/// filter's queue go to the overlay when they go on. (QEMU would put the
/// overlay above the filter, leaving the guest's writes unthrottled.)
fn below_filters(a: Action) -> Action {
    let skip = |mut n: Arc<Node>| {
        while n.is_filter() {
            match n.child(ChildRole::File) {
                Some(f) => n = f,
                None => break,
            }
        }
        n
    };
    match a {
        Action::SnapshotSync {
            node,
            file,
            node_name,
            mode,
        } => Action::SnapshotSync {
            node: skip(node),
            file,
            node_name,
            mode,
        },
        Action::Snapshot { node, overlay } => Action::Snapshot {
            node: skip(node),
            overlay,
        },
        Action::Abort => Action::Abort,
    }
}

fn remove_files(files: &[PathBuf]) {
    for f in files {
        if let Err(e) = std::fs::remove_file(f) {
            log::error!("snapshot abort: cannot remove {}: {e}", f.display());
        }
    }
}

/// Refuse a node that is not at the top of its tree: parent nodes hold
/// their children for good (only BlockBackends and throttle filters are
/// moved to the overlay), and a commit's filter is the job's.
pub(super) fn check_top(node: &Arc<Node>) -> Result<(), Error> {
    for parent in node.graph().all_nodes() {
        if let Some(c) = parent
            .children()
            .iter()
            .find(|c| Arc::ptr_eq(&c.node, node))
        {
            if parent.is_filter() && c.role == ChildRole::File {
                continue;
            }
            // QEMU's words for its op blockers.
            let why = if parent.driver_name() == super::commit::FILTER_DRIVER {
                "block device is in use by block job: commit".to_string()
            } else if c.role == ChildRole::Backing {
                format!("node is used as backing hd of '{}'", parent.name())
            } else {
                format!("node is used as {} of '{}'", c.role, parent.name())
            };
            return Err(Error::busy(format!(
                "Node '{}' is busy: {why}",
                node.name()
            )));
        }
    }
    Ok(())
}

fn prepare(action: Action, earlier: &[Prepared]) -> Result<Prepared, Error> {
    let node = match &action {
        Action::Abort => return err("Transaction aborted using Abort action"),
        Action::SnapshotSync { node, .. } | Action::Snapshot { node, .. } => node.clone(),
    };
    if node.driver_name() == super::commit::FILTER_DRIVER {
        return err(format!(
            "Node '{}' is busy: block device is in use by block job: commit",
            node.name()
        ));
    }
    // Before check_top: an earlier action's overlay is a parent already.
    if earlier.iter().any(|p| Arc::ptr_eq(&p.node, &node)) {
        return err(format!(
            "Node '{}' is snapshotted twice in one transaction",
            node.name()
        ));
    }
    check_top(&node)?;
    match action {
        Action::SnapshotSync {
            node,
            file,
            node_name,
            ..
        } => prepare_sync(node, &file, node_name),
        Action::Snapshot { node, overlay } => prepare_with(node, overlay),
        Action::Abort => unreachable!("returned above"),
    }
}

/// The format a backing file entry records for `node`.
fn backing_format(node: &Node) -> &'static str {
    match node.driver_name() {
        "qcow2" => "qcow2",
        _ => "raw",
    }
}

fn prepare_sync(
    node: Arc<Node>,
    file: &Path,
    node_name: Option<String>,
) -> Result<Prepared, Error> {
    let g = node.graph();
    let name = match node_name {
        Some(n) if g.find_node(&n).is_some() => {
            return err("New overlay node-name already in use");
        }
        Some(n) => {
            check_new_node_name(g, &n)?;
            n
        }
        None => g.auto_node_name(),
    };
    let overlay = open_overlay(&name, file, &node)?;
    Ok(Prepared {
        node,
        overlay,
        added: false,
    })
}

/// Create the qcow2 file a snapshot of `node` writes into: the node's size,
/// the node's image (absolute path) and format as its backing file.
fn create_overlay_file(node: &Arc<Node>, file: &Path) -> Result<(), Error> {
    let Some(backing) = node.image_filename() else {
        return err(format!(
            "Node '{}' has no image file an overlay could name as its backing file",
            node.name()
        ));
    };
    // An absolute name: the overlay may live in another folder.
    let backing = std::fs::canonicalize(&backing)
        .map(|p| p.display().to_string())
        .unwrap_or(backing);
    let opts = CreateOptions {
        size: node.size(),
        cluster_size: DEFAULT_CLUSTER_SIZE,
        backing: Some((&backing, backing_format(node))),
    };
    create(file, &opts).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::invalid(format!(
            "Could not create '{}': the file exists (ringblk never overwrites one; mode 'existing' uses it as the overlay)",
            file.display()
        )),
        _ => Error::io(format!(
            "Could not create '{}': {}",
            file.display(),
            os_text(&e)
        )),
    })
}

/// An I/O error as QEMU words it: the system's text, without Rust's
/// "(os error N)".
fn os_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Open the overlay file at `path` as node `name`, over `backing`.
fn open_overlay(name: &str, path: &Path, backing: &Arc<Node>) -> Result<Arc<Node>, Error> {
    let cache = if backing.cache_direct() {
        CacheMode::None
    } else {
        CacheMode::Writeback
    };
    let g = backing.graph();
    let file = open_file_node(
        g,
        &g.auto_node_name(),
        path,
        false,
        cache,
        512,
        Some(ImageLock::for_open(false, false)),
    )
    .map_err(|e| Error::io(e.to_string()))?;
    let overlay = open_qcow2_node(
        name,
        path,
        file,
        false,
        Some(backing.clone()),
        Qcow2Options::default(),
    )
    .map_err(|e| Error::io(e.to_string()))?;
    if overlay.size() != backing.size() {
        return err(format!(
            "The overlay '{}' is {} bytes, node '{}' is {}",
            path.display(),
            overlay.size(),
            backing.name(),
            backing.size()
        ));
    }
    Ok(overlay)
}

fn prepare_with(node: Arc<Node>, overlay: Arc<Node>) -> Result<Prepared, Error> {
    if Arc::ptr_eq(&node, &overlay) {
        return err("The overlay cannot be the node itself");
    }
    if overlay.child(ChildRole::Backing).is_some() {
        return err(format!(
            "The overlay '{}' already has a backing image",
            overlay.name()
        ));
    }
    let g = node.graph();
    if !overlay.graph().same(g) {
        return err(format!(
            "The overlay '{}' is not in the graph of node '{}'",
            overlay.name(),
            node.name()
        ));
    }
    if g.all_backends()
        .iter()
        .any(|b| b.root().is_some_and(|r| Arc::ptr_eq(&r, &overlay)))
        || g.all_nodes()
            .iter()
            .any(|n| n.children().iter().any(|c| Arc::ptr_eq(&c.node, &overlay)))
    {
        return err(format!(
            "The overlay '{}' is already in use",
            overlay.name()
        ));
    }
    if overlay.is_read_only() {
        return err(format!("The overlay '{}' is read-only", overlay.name()));
    }
    if overlay.size() != node.size() {
        return err(format!(
            "The overlay '{}' is {} bytes, node '{}' is {}",
            overlay.name(),
            overlay.size(),
            node.name(),
            node.size()
        ));
    }
    overlay.set_backing(Some(node.clone())).map_err(|e| {
        Error::unsupported(format!(
            "The overlay '{}' does not support backing images: {e}",
            overlay.name()
        ))
    })?;
    Ok(Prepared {
        node,
        overlay,
        added: true,
    })
}

fn commit(p: Prepared) {
    // The node becomes a backing image: nobody writes it any more (a
    // failure leaves it writable, nothing worse). What the guest wrote to
    // it since its last flush is synced by the overlay's next flush, so the
    // guest's next flush covers it as before, without a sync here while
    // the guest waits.
    if let Err(e) = p.node.reopen(true) {
        log::warn!("snapshot: {e}; it stays writable");
    }
    p.overlay.backing_unflushed();
    let moved = move_users(&p.node, &p.overlay);
    // With no BlockBackend on it, nothing would hold the new overlay: the
    // monitor does, as QEMU's user would expect to find it.
    if moved == 0 && !p.added {
        p.overlay.graph().monitor_adopt(p.overlay.clone());
    }
    log::info!(
        "snapshot: node '{}' is now the backing image of '{}'",
        p.node.name(),
        p.overlay.name()
    );
}

fn abort(p: Prepared) {
    if p.added {
        if let Err(e) = p.overlay.set_backing(None) {
            log::error!("snapshot abort: {e}");
        }
        return;
    }
    let name = p.overlay.name().to_string();
    let g = p.overlay.graph().clone();
    drop(p.overlay);
    if g.find_node(&name).is_some() {
        log::error!("snapshot abort: overlay '{name}' is still open");
    }
}

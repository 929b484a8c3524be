//! Drained sections, after the contract of QEMU's block-layer drain.
//!
//! `drained_begin` has two phases. Quiesce: on the 0 -> 1 transition of a
//! node's `quiesce_counter`, every parent's `drained_begin` is called (a
//! parent node recurses into its own parents, a BlockBackend tells its
//! device to stop submitting), then the driver's hook; nothing here waits or
//! changes the graph. Poll: once, the caller sleeps until neither the node,
//! its parents nor its children have requests in flight. `drained_end` never
//! polls. Sections nest; `drain_all` quiesces every node and polls once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::in_flight::poll_while;
use super::node::Node;
use super::parent::Parent;
use super::registry::Graph;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("node {node}: no drained section to end")]
    NotDrained { node: String },
}

impl Node {
    /// The quiesce phase alone: stop every parent from sending requests.
    pub fn drained_begin_quiesce(&self) {
        if self.quiesce_counter.fetch_add(1, Ordering::SeqCst) == 0 {
            self.parents.drained_begin();
            self.driver().drained_begin();
        }
    }

    /// Begin a drained section: quiesce, then wait (on the calling, control
    /// thread) until nothing affected has requests in flight.
    pub fn drained_begin(&self) {
        self.drained_begin_quiesce();
        poll_while(|| self.drain_busy());
    }

    /// End a drained section. Never waits; on the last end the driver and
    /// then the parents resume.
    pub fn drained_end(&self) -> Result<(), DrainError> {
        let prev = self
            .quiesce_counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .map_err(|_| DrainError::NotDrained {
                node: self.name().to_string(),
            })?;
        if prev == 1 {
            self.driver().drained_end();
            self.parents.drained_end();
        }
        Ok(())
    }

    /// A drained section that begins and ends at once: on return, every
    /// request that was in flight when it was called has completed.
    pub fn drain(&self) {
        self.drained_begin();
        // Cannot fail: the section begun above is still open.
        let _ = self.drained_end();
    }

    /// Whether anything a drain of this node waits for is still running:
    /// the node, its parents (recursively) or the subtree below it.
    pub fn drain_busy(&self) -> bool {
        self.busy_up(0) || self.busy_down()
    }

    /// The node or its parents have requests in flight other than the
    /// `parked_below` (and this node's own parked ones) that wait in a
    /// throttle queue: those are counted at every level above the queue,
    /// but a drained section does not wait for them.
    fn busy_up(&self, parked_below: u64) -> bool {
        let parked = parked_below + self.driver().parked();
        self.in_flight.get() > parked || self.parents.live().iter().any(|p| p.drained_poll(parked))
    }

    fn busy_down(&self) -> bool {
        self.children()
            .iter()
            .any(|c| c.node.in_flight.get() > 0 || c.node.busy_down())
    }

    /// Tell the parents this node's size changed.
    pub fn notify_resized(&self) {
        for p in self.parents.live() {
            p.resized();
        }
    }
}

/// A drained section over a few nodes at once (the ones a graph change
/// touches, and with them their parents and what lies below): each is
/// quiesced, then one wait until none of them has requests in flight.
/// Other nodes of the graph go on. Ends when dropped.
pub(super) struct Drained(Vec<Arc<Node>>);

impl Drained {
    pub(super) fn begin(nodes: Vec<Arc<Node>>) -> Self {
        for n in &nodes {
            n.drained_begin_quiesce();
        }
        poll_while(|| nodes.iter().any(|n| n.drain_busy()));
        Drained(nodes)
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            if let Err(e) = n.drained_end() {
                log::error!("{e}");
            }
        }
    }
}

/// A node is the parent of its children: draining a child quiesces it.
impl Parent for Node {
    fn drained_begin(&self) {
        self.drained_begin_quiesce();
    }
    fn drained_end(&self) {
        if let Err(e) = Node::drained_end(self) {
            log::error!("{e} (parent edge)");
        }
    }
    fn drained_poll(&self, parked: u64) -> bool {
        self.busy_up(parked)
    }
    fn resized(&self) {
        self.notify_resized();
    }
}

impl Graph {
    /// Quiesce every node, then wait once until none has work in flight.
    /// Pair with `drain_all_end`.
    pub fn drain_all_begin(&self) {
        for n in self.all_nodes() {
            n.drained_begin_quiesce();
        }
        self.drain_all_depth().fetch_add(1, Ordering::SeqCst);
        // Re-walk the registries on each wake: a completion may close nodes.
        // Backends are polled too: one whose tree was ejected may still have
        // requests holding the old tree.
        poll_while(|| {
            self.all_nodes().iter().any(|n| n.drain_busy())
                || self.all_backends().iter().any(|b| b.drained_poll(0))
        });
    }

    pub fn drain_all_end(&self) {
        if self
            .drain_all_depth()
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            .is_err()
        {
            log::error!("drain_all_end without drain_all_begin");
            return;
        }
        for n in self.all_nodes() {
            if let Err(e) = n.drained_end() {
                log::error!("drain_all_end: {e}");
            }
        }
    }
}

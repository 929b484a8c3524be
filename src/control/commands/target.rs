//! Which node a command acts on: `"export": ID` (the export's root node) or
//! `"node-name": NAME`.

use std::sync::Arc;

use crate::control::args::Args;
use crate::control::qmp::QmpError;
use crate::control::server::Daemon;
use crate::graph::{find_node, Node};
use crate::vhost::blk::export::BlkExport;

pub struct Target {
    pub node: Arc<Node>,
    /// The export whose root this node is, if any.
    pub export: Option<Arc<BlkExport>>,
}

impl Target {
    /// How the target was named, for messages and events.
    pub fn label(&self) -> String {
        match &self.export {
            Some(e) => format!("export {} (node {})", e.id, self.node.name()),
            None => format!("node {}", self.node.name()),
        }
    }
}

pub fn resolve(daemon: &Daemon, args: &mut Args) -> Result<Target, QmpError> {
    let export = args.opt_str("export")?;
    let node_name = args.opt_str("node-name")?;
    match (export, node_name) {
        (Some(_), Some(_)) => Err(QmpError::generic(
            "Only one of 'export' and 'node-name' may be given",
        )),
        (None, None) => Err(QmpError::generic(
            "Parameter 'export' or 'node-name' is missing",
        )),
        (Some(id), None) => {
            let e = daemon
                .export(&id)
                .ok_or_else(|| QmpError::not_found(format!("Export '{id}' not found")))?;
            let node = e.state.backend.root().ok_or_else(|| {
                QmpError::generic(format!("Export '{id}' has no medium (ejected)"))
            })?;
            Ok(Target {
                node,
                export: Some(e),
            })
        }
        (None, Some(name)) => {
            let node = find_node(&name)
                .ok_or_else(|| QmpError::not_found(format!("Cannot find node '{name}'")))?;
            let export = daemon.exports.list().into_iter().find(|e| {
                e.state
                    .backend
                    .root()
                    .is_some_and(|r| Arc::ptr_eq(&r, &node))
            });
            Ok(Target { node, export })
        }
    }
}

//! Which node a command acts on: `"device": ID` (QEMU's name for a
//! BlockBackend; an export's is its id), `"export": ID` (the same, ringblk's
//! older spelling), or `"node-name": NAME`.

use std::sync::Arc;

use crate::control::args::Args;
use crate::control::qmp::QmpError;
use crate::control::server::Monitor;
use crate::graph::Node;
use crate::vhost::blk::export::BlkExport;

pub(super) struct Target {
    pub node: Arc<Node>,
    /// The export whose root this node is, if any.
    pub export: Option<Arc<BlkExport>>,
}

impl Target {
    /// How the target was named, for messages and events.
    pub(super) fn label(&self) -> String {
        match &self.export {
            Some(e) => format!("export {} (node {})", e.id, self.node.name()),
            None => format!("node {}", self.node.name()),
        }
    }
}

pub(super) fn resolve(mon: &Monitor, args: &mut Args) -> Result<Target, QmpError> {
    let device = args.opt_str("device")?;
    let export = args.opt_str("export")?;
    let node_name = args.opt_str("node-name")?;
    let backend = match (device, export) {
        (Some(_), Some(_)) => {
            return Err(QmpError::generic(
                "Only one of 'device' and 'export' may be given",
            ))
        }
        (Some(id), None) => Some((id, "Device")),
        (None, Some(id)) => Some((id, "Export")),
        (None, None) => None,
    };
    match (backend, node_name) {
        (Some((_, what)), Some(_)) => Err(QmpError::generic(format!(
            "Only one of '{}' and 'node-name' may be given",
            what.to_lowercase()
        ))),
        (None, None) => Err(QmpError::generic(
            "Parameter 'device' (or 'export') or 'node-name' is missing",
        )),
        (Some((id, what)), None) => {
            let e = mon
                .state
                .export(&id)
                .ok_or_else(|| QmpError::not_found(format!("{what} '{id}' not found")))?;
            let node = e.state.backend.root().ok_or_else(|| {
                QmpError::generic(format!("Export '{id}' has no medium (ejected)"))
            })?;
            Ok(Target {
                node,
                export: Some(e),
            })
        }
        (None, Some(name)) => {
            let node = mon
                .state
                .graph()
                .find_node(&name)
                .ok_or_else(|| QmpError::not_found(format!("Cannot find node '{name}'")))?;
            let export = mon.state.exports().list().into_iter().find(|e| {
                e.state
                    .backend
                    .root()
                    .is_some_and(|r| Arc::ptr_eq(&r, &node))
            });
            Ok(Target { node, export })
        }
    }
}

//! `blockdev-snapshot-sync`, `blockdev-snapshot` and `transaction`: the
//! arguments become graph actions; the graph applies them all or none.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::Monitor;
use crate::graph::{Action, Graph, Node, OverlayMode};

/// A node by QEMU's `device` (a BlockBackend's name: here an export id,
/// meaning its root node) or `node-name`.
fn lookup(
    mon: &Monitor,
    device: Option<String>,
    node_name: Option<String>,
) -> Result<Arc<Node>, QmpError> {
    mon.state
        .graph()
        .lookup_node(device.as_deref(), node_name.as_deref())
        .ok_or_else(|| {
            QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or_default(),
                node_name.as_deref().unwrap_or_default()
            ))
        })
}

fn snapshot_sync(mon: &Monitor, mut a: Args) -> Result<Action, QmpError> {
    let device = a.opt_str("device")?;
    let node_name = a.opt_str("node-name")?;
    let file = a.str("snapshot-file")?;
    let snap_name = a.opt_str("snapshot-node-name")?;
    let format = a.opt_str("format")?.unwrap_or_else(|| "qcow2".into());
    if format != "qcow2" {
        return Err(QmpError::generic(format!(
            "Snapshot format '{format}' is not supported (ringblk makes qcow2 overlays)"
        )));
    }
    let mode = match a.opt_str("mode")?.as_deref() {
        None | Some("absolute-paths") => OverlayMode::AbsolutePaths,
        Some("existing") => OverlayMode::Existing,
        Some(m) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{m}'"
            )))
        }
    };
    a.finish()?;
    let node = lookup(mon, device, node_name)?;
    Ok(Action::SnapshotSync {
        node,
        file: PathBuf::from(file),
        node_name: snap_name,
        mode,
    })
}

fn snapshot(graph: &Graph, mut a: Args) -> Result<Action, QmpError> {
    let node = a.str("node")?;
    let overlay = a.str("overlay")?;
    a.finish()?;
    let find = |n: &str| {
        graph.find_node(n).ok_or_else(|| {
            QmpError::generic(format!("Cannot find device='{n}' nor node-name='{n}'"))
        })
    };
    Ok(Action::Snapshot {
        node: find(&node)?,
        overlay: find(&overlay)?,
    })
}

fn run(graph: &Graph, actions: Vec<Action>) -> CmdResult {
    graph
        .transaction(actions)
        .map(|()| json!({}))
        .map_err(QmpError::from)
}

pub(super) fn blockdev_snapshot_sync(mon: &Monitor, args: Args) -> CmdResult {
    run(mon.state.graph(), vec![snapshot_sync(mon, args)?])
}

pub(super) fn blockdev_snapshot(graph: &Graph, args: Args) -> CmdResult {
    run(graph, vec![snapshot(graph, args)?])
}

/// `transaction`: QEMU's TransactionAction list (`{"type", "data"}`).
pub(super) fn transaction_cmd(mon: &Monitor, mut args: Args) -> CmdResult {
    let list = match args.take("actions") {
        Some(Value::Array(l)) => l,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'actions', expected: array",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'actions' is missing")),
    };
    if let Some(props) = args.take("properties") {
        let Value::Object(props) = props else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'properties', expected: object",
            ));
        };
        let mut p = Args::new(props);
        match p.opt_str("completion-mode")?.as_deref() {
            None | Some("individual") => {}
            Some("grouped") => {
                return Err(QmpError::generic(
                    "Action 'blockdev-snapshot-sync' does not support Transaction property completion-mode = grouped",
                ))
            }
            Some(m) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'completion-mode' does not accept value '{m}'"
                )))
            }
        }
        p.finish()?;
    }
    args.finish()?;
    let mut actions = Vec::with_capacity(list.len());
    for item in list {
        let Value::Object(mut item) = item else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'actions[]', expected: object",
            ));
        };
        let kind = match item.remove("type") {
            Some(Value::String(t)) => t,
            _ => return Err(QmpError::generic("Parameter 'type' is missing")),
        };
        let data = match item.remove("data") {
            Some(Value::Object(d)) => d,
            None => Map::new(),
            Some(_) => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'data', expected: object",
                ))
            }
        };
        if let Some(k) = item.keys().next() {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let data = Args::new(data);
        actions.push(match kind.as_str() {
            "blockdev-snapshot-sync" => snapshot_sync(mon, data)?,
            "blockdev-snapshot" => snapshot(mon.state.graph(), data)?,
            "abort" => {
                data.finish()?;
                Action::Abort
            }
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter 'type' does not accept value '{other}'"
                )))
            }
        });
    }
    run(mon.state.graph(), actions)
}

//! blockdev-add and blockdev-del: the graph builds and closes the nodes;
//! here the arguments are taken apart and errors become QMP's.

use serde_json::json;

use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::graph::Graph;

pub(super) fn add(graph: &Graph, args: Args) -> CmdResult {
    graph
        .blockdev_add(args.into_value())
        .map(|_| json!({}))
        .map_err(QmpError::from)
}

pub(super) fn del(graph: &Graph, mut args: Args) -> CmdResult {
    let name = args.str("node-name")?;
    args.finish()?;
    graph
        .blockdev_del(&name)
        .map(|()| json!({}))
        .map_err(QmpError::from)
}

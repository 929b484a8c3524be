//! block-export-add and block-export-del: the export table starts and
//! stops exports; here arguments are read and results reported.

use std::sync::Arc;

use serde_json::json;

use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::Daemon;
use crate::uring::find_iothreads;
use crate::vhost::exports::ExportOptions;

pub(super) fn add(daemon: &Arc<Daemon>, args: Args) -> CmdResult {
    let serde_json::Value::Object(map) = args.into_value() else {
        return Err(QmpError::generic("Invalid arguments"));
    };
    let ExportOptions { config, iothreads } =
        ExportOptions::parse(&daemon.graph, map).map_err(QmpError::generic)?;
    let handles = if iothreads.is_empty() {
        vec![daemon.default_iothread.clone()]
    } else {
        find_iothreads(&daemon.iothreads, &iothreads).map_err(QmpError::generic)?
    };
    daemon
        .exports
        .add(config, handles)
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

/// `mode`: `safe` (the default) refuses an export a frontend is connected
/// to; `hard` disconnects it once its in-flight requests completed.
pub(super) fn del(daemon: &Arc<Daemon>, mut args: Args) -> CmdResult {
    let id = args.str("id")?;
    let hard = match args.opt_str("mode")?.as_deref() {
        None | Some("safe") => false,
        Some("hard") => true,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "Parameter 'mode' does not accept value '{other}'"
            )))
        }
    };
    args.finish()?;
    daemon
        .exports
        .remove(&id, hard)
        .map_err(QmpError::generic)?;
    daemon.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    Ok(json!({}))
}

//! block-export-add and block-export-del: the export table starts and
//! stops exports; here arguments are read and results reported.

use std::sync::Arc;

use serde_json::json;

use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::Monitor;
use crate::vhost::exports::ExportOptions;

pub(super) fn add(mon: &Arc<Monitor>, args: Args) -> CmdResult {
    let serde_json::Value::Object(map) = args.into_value() else {
        return Err(QmpError::generic("Invalid arguments"));
    };
    let opts = ExportOptions::parse(mon.state.graph(), map)?;
    mon.state.add_export_from(opts)?;
    Ok(json!({}))
}

/// `mode`: `safe` (the default) refuses an export a frontend is connected
/// to; `hard` disconnects it once its in-flight requests completed.
pub(super) fn del(mon: &Arc<Monitor>, mut args: Args) -> CmdResult {
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
    mon.state.remove_export(&id, hard)?;
    mon.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
    Ok(json!({}))
}

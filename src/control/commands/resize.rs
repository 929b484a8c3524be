//! block_resize: check the size against the export's block size, grow
//! the node (`graph::resize`), and say so with BLOCK_RESIZED.

use std::sync::Arc;

use serde_json::json;

use super::target::resolve;
use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::Monitor;
use crate::graph::{resize, ResizeError};

pub(super) fn block_resize(mon: &Arc<Monitor>, mut args: Args) -> CmdResult {
    let t = resolve(mon, &mut args)?;
    let size = args.u64("size")?;
    args.finish()?;
    let node = &t.node;
    let block = t
        .export
        .as_ref()
        .map_or(512, |e| e.geometry.limits.block_size as u64);
    if size == 0 || size % block != 0 {
        return Err(QmpError::generic(format!(
            "The new size must be a positive multiple of the logical block size ({block} bytes); {size} is not"
        )));
    }
    let old = resize(node, size).map_err(|e| match e {
        ResizeError::Io(e) => {
            QmpError::generic(format!("Cannot resize {} to {size}: {e}", t.label()))
        }
        e => QmpError::generic(e.to_string()),
    })?;
    if size > old {
        log::info!("{}: resized from {old} to {size} bytes", t.label());
        mon.emit(
            "BLOCK_RESIZED",
            json!({
                "node-name": node.name(),
                "export": t.export.as_ref().map(|e| e.id.clone()),
                "size": size,
            }),
        );
    }
    Ok(json!({}))
}

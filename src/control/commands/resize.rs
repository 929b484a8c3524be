//! block_resize: grow an image inside a drained section and tell the guest.

use std::sync::Arc;

use serde_json::json;

use super::target::resolve;
use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::Daemon;
use crate::formats::BlockIo;
use crate::uring;

pub fn block_resize(daemon: &Arc<Daemon>, mut args: Args) -> CmdResult {
    let t = resolve(daemon, &mut args)?;
    let size = args.u64("size")?;
    args.finish()?;
    let node = &t.node;
    if node.is_read_only() {
        return Err(QmpError::generic(format!(
            "Node '{}' is read-only",
            node.name()
        )));
    }
    let block = t
        .export
        .as_ref()
        .map_or(512, |e| e.geometry.limits.block_size as u64);
    if size == 0 || size % block != 0 {
        return Err(QmpError::generic(format!(
            "The new size must be a positive multiple of the logical block size ({block} bytes); {size} is not"
        )));
    }
    let old = node.size();
    if size < old {
        return Err(QmpError::generic(format!(
            "Shrinking is not supported: node '{}' is {old} bytes, {size} requested",
            node.name()
        )));
    }
    if size > old {
        node.drained_begin();
        let n = node.clone();
        let grown = uring::block_on(move || async move {
            n.grow(size).await?;
            // The new size must survive a crash like any acknowledged write.
            n.flush().await
        })
        .and_then(|r| r);
        if grown.is_ok() {
            node.notify_resized();
        }
        // Cannot fail: the section begun above is still open.
        let _ = node.drained_end();
        grown.map_err(|e| {
            QmpError::generic(format!("Cannot resize {} to {size}: {e}", t.label()))
        })?;
        log::info!("{}: resized from {old} to {size} bytes", t.label());
        daemon.emit(
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

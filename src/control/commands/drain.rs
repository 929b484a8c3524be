//! block-drain, block-drained-begin, block-drained-end.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::target::{resolve, Target};
use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::{Monitor, Sections};

/// Requests the target has in flight: for an export's root, everything
/// the guest submitted and we have not completed.
fn in_flight(t: &Target) -> u64 {
    let node = t.node.in_flight();
    t.export
        .as_ref()
        .map_or(node, |e| node.max(e.state.in_flight()))
}

pub(super) fn block_drain(mon: &Arc<Monitor>, mut args: Args) -> CmdResult {
    let t = resolve(mon, &mut args)?;
    args.finish()?;
    let at_start = in_flight(&t);
    let started = Instant::now();
    match &t.export {
        // The export's own requests, throttled ones included, within the
        // limits (QEMU's blk_drain).
        Some(e) => e.state.backend.drain(),
        // A drained section that ends at once.
        None => t.node.drain(),
    }
    let took = started.elapsed();
    log::info!(
        "{}: drained {at_start} request(s) in {} µs",
        t.label(),
        took.as_micros()
    );
    Ok(json!({
        "node-name": t.node.name(),
        "in-flight-at-start": at_start,
        "drain-time-ns": took.as_nanos() as u64,
    }))
}

fn section_info(t: &Target) -> Value {
    json!({
        "node-name": t.node.name(),
        "quiesce-counter": t.node.quiesce_counter(),
        "in-flight": in_flight(t),
    })
}

pub(super) fn drained_begin(
    mon: &Arc<Monitor>,
    sections: &mut Sections,
    mut args: Args,
) -> CmdResult {
    let t = resolve(mon, &mut args)?;
    args.finish()?;
    t.node.drained_begin();
    // Recorded before replying: if the client vanishes now, its
    // disconnect still ends this section.
    sections.push(t.node.clone());
    let info = section_info(&t);
    log::info!("{}: drained section begun ({info})", t.label());
    mon.emit("BLOCK_DRAINED_BEGIN", info.clone());
    Ok(info)
}

pub(super) fn drained_end(
    mon: &Arc<Monitor>,
    sections: &mut Sections,
    mut args: Args,
) -> CmdResult {
    let t = resolve(mon, &mut args)?;
    args.finish()?;
    if !sections.remove(&t.node) {
        return Err(QmpError::generic(format!(
            "No drained section on node '{}' was begun by this client",
            t.node.name()
        )));
    }
    t.node
        .drained_end()
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let info = section_info(&t);
    log::info!("{}: drained section ended ({info})", t.label());
    mon.emit("BLOCK_DRAINED_END", info.clone());
    Ok(info)
}

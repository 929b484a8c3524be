//! query-block-exports, query-named-block-nodes and query-iothreads: QEMU's members with QEMU's names and types
//! (qapi/block-core.json, block-export.json, misc.json), so that QEMU's
//! clients read them; what ringblk adds is named `x-...`, QAPI's prefix for
//! members outside the stable schema.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::control::server::Monitor;
use crate::formats::BlockIo;
use crate::graph::{ChildRole, Graph, Node};

pub(super) fn block_exports(mon: &Monitor) -> Value {
    Value::Array(
        mon.state
            .exports()
            .list()
            .iter()
            .map(|e| {
                let b = &e.state.backend;
                json!({
                    "id": e.id,
                    "type": "vhost-user-blk",
                    "shutting-down": false,
                    "node-name": b.root().map(|n| n.name().to_string()).unwrap_or_default(),
                    "x-num-queues": e.geometry.num_queues,
                    "x-socket": e.socket.display().to_string(),
                    "x-connected": e.is_connected(),
                    "x-writable": !b.is_read_only(),
                    "x-size": b.size(),
                    "x-logical-block-size": e.geometry.limits.block_size,
                    "x-in-flight": e.state.in_flight(),
                    "x-quiesced": e.state.is_quiesced(),
                })
            })
            .collect(),
    )
}

/// The host file an image node reads: its own, or its file child's.
fn image_file(node: &Node) -> Option<String> {
    node.filename().or_else(|| {
        node.children()
            .iter()
            .find(|c| c.role == ChildRole::File)
            .and_then(|c| image_file(&c.node))
    })
}

fn backing_of(node: &Node) -> Option<Arc<Node>> {
    node.children()
        .iter()
        .find(|c| c.role == ChildRole::Backing)
        .map(|c| c.node.clone())
}

fn backing_chain(node: &Node) -> Vec<String> {
    let mut chain = Vec::new();
    let mut cur = backing_of(node);
    while let Some(n) = cur {
        chain.push(n.name().to_string());
        cur = backing_of(&n);
    }
    chain
}

/// QEMU's ImageInfo for `node`: its file, format and size, and (unless
/// `flat`) its backing image's, recursively.
fn image_info(node: &Node, flat: bool) -> Value {
    let mut info = json!({
        "filename": image_file(node).unwrap_or_default(),
        "format": node.driver_name(),
        "virtual-size": node.size(),
    });
    if let Some(b) = backing_of(node) {
        info["backing-filename"] = json!(image_file(&b).unwrap_or_default());
        info["backing-filename-format"] = json!(b.driver_name());
        if !flat {
            info["backing-image"] = image_info(&b, false);
        }
    }
    info
}

/// `query-named-block-nodes [flat]`: QEMU's BlockDeviceInfo per node.
pub(super) fn named_block_nodes(graph: &Graph, flat: bool) -> Value {
    Value::Array(
        graph
            .all_nodes()
            .iter()
            .map(|n| {
                let chain = backing_chain(n);
                let mut info = json!({
                    "file": image_file(n).unwrap_or_default(),
                    "node-name": n.name(),
                    "ro": n.is_read_only(),
                    "drv": n.driver_name(),
                    "backing_file_depth": chain.len(),
                    "encrypted": false,
                    "detect_zeroes": "off",
                    "bps": 0, "bps_rd": 0, "bps_wr": 0,
                    "iops": 0, "iops_rd": 0, "iops_wr": 0,
                    "image": image_info(n, flat),
                    "cache": {
                        "writeback": true,
                        "direct": n.cache_direct(),
                        "no-flush": false,
                    },
                    "write_threshold": 0,
                    "x-backing-chain": chain,
                    "x-children": n.children().iter().map(|c| json!({
                        "role": c.role.to_string(),
                        "node-name": c.node.name(),
                    })).collect::<Vec<_>>(),
                    "x-in-flight": n.in_flight(),
                    "x-quiesce-counter": n.quiesce_counter(),
                    "x-requests": n.requests(),
                });
                if let Some(b) = backing_of(n) {
                    info["backing_file"] = json!(image_file(&b).unwrap_or_default());
                }
                if let Value::Object(m) = &mut info {
                    m.extend(n.driver_info());
                }
                info
            })
            .collect(),
    )
}

/// `query-iothreads`: QEMU's IOThreadInfo for each iothread.
pub(super) fn iothreads(mon: &Monitor) -> Value {
    Value::Array(
        mon.state
            .iothreads()
            .iter()
            .map(|t| {
                json!({
                    "id": t.name(),
                    "thread-id": t.thread_id(),
                    "poll-max-ns": t.poll_max().as_nanos() as u64,
                    // QEMU's 0: the default growth and shrink factors.
                    "poll-grow": 0,
                    "poll-shrink": 0,
                    "aio-max-batch": 0,
                })
            })
            .collect(),
    )
}

//! query-block-exports, query-named-block-nodes, query-blockstats and
//! query-iothreads: QEMU's members with QEMU's names and types
//! (qapi/block-core.json, block-export.json, misc.json), so that QEMU's
//! clients read them; what ringblk adds is named `x-...`, QAPI's prefix for
//! members outside the stable schema.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::control::server::Monitor;
use crate::formats::BlockIo;
use crate::graph::{ChildRole, Graph, Node};
use crate::vhost::blk::stats::{OpSnapshot, StatsSnapshot};

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

fn op_json(s: &OpSnapshot) -> Value {
    json!({
        "operations": s.operations,
        "bytes": s.bytes,
        "failed": s.failed,
        "total-time-ns": s.total_time_ns,
        "latency": {
            "average-ns": s.average_ns(),
            "p50-us": s.percentile_us(50.0),
            "p99-us": s.percentile_us(99.0),
            "histogram-us": histogram(&s.histogram),
        },
    })
}

/// Non-empty buckets as `{"below": 2^i µs, "count": n}`.
fn histogram(h: &[u64]) -> Value {
    Value::Array(
        h.iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| json!({"below": 1u64 << i, "count": n}))
            .collect(),
    )
}

fn stats_json(s: &StatsSnapshot) -> Value {
    let mut m = Map::new();
    for (kind, op) in &s.by_kind {
        m.insert((*kind).to_string(), op_json(op));
    }
    m.insert("invalid".into(), json!(s.invalid));
    Value::Object(m)
}

/// QEMU's BlockDeviceStats from ours: reads, writes (write-zeroes
/// included, as QEMU accounts them), flushes and unmaps (discards).
fn device_stats(s: &StatsSnapshot) -> Value {
    let get = |kind: &str| s.by_kind.iter().find(|(k, _)| *k == kind).map(|(_, op)| op);
    let sum = |kinds: &[&str], f: fn(&OpSnapshot) -> u64| -> u64 {
        kinds.iter().filter_map(|k| get(k)).map(f).sum()
    };
    let (rd, wr, fl, un) = (
        &["read"][..],
        &["write", "write-zeroes"][..],
        &["flush"][..],
        &["discard"][..],
    );
    json!({
        "rd_bytes": sum(rd, |o| o.bytes),
        "wr_bytes": sum(wr, |o| o.bytes),
        "zone_append_bytes": 0,
        "unmap_bytes": sum(un, |o| o.bytes),
        "rd_operations": sum(rd, |o| o.operations),
        "wr_operations": sum(wr, |o| o.operations),
        "zone_append_operations": 0,
        "flush_operations": sum(fl, |o| o.operations),
        "unmap_operations": sum(un, |o| o.operations),
        "rd_total_time_ns": sum(rd, |o| o.total_time_ns),
        "wr_total_time_ns": sum(wr, |o| o.total_time_ns),
        "zone_append_total_time_ns": 0,
        "flush_total_time_ns": sum(fl, |o| o.total_time_ns),
        "unmap_total_time_ns": sum(un, |o| o.total_time_ns),
        "wr_highest_offset": 0,
        "rd_merged": 0, "wr_merged": 0, "zone_append_merged": 0, "unmap_merged": 0,
        "failed_rd_operations": sum(rd, |o| o.failed),
        "failed_wr_operations": sum(wr, |o| o.failed),
        "failed_zone_append_operations": 0,
        "failed_flush_operations": sum(fl, |o| o.failed),
        "failed_unmap_operations": sum(un, |o| o.failed),
        // Refused requests are counted once, not by kind (x-invalid).
        "invalid_rd_operations": 0,
        "invalid_wr_operations": 0,
        "invalid_zone_append_operations": 0,
        "invalid_flush_operations": 0,
        "invalid_unmap_operations": 0,
        "account_invalid": true,
        "account_failed": true,
        "timed_stats": [],
    })
}

/// `query-blockstats [query-nodes]`: QEMU's BlockStats per export (its
/// BlockBackend is the `device`), ours beside them as `x-stats` (every
/// request kind with latencies) and `x-queues`; with `query-nodes`, one
/// entry per node, which count requests only (`x-requests`).
pub(super) fn blockstats(mon: &Monitor, query_nodes: bool) -> Value {
    if query_nodes {
        return Value::Array(
            mon.state
                .graph()
                .all_nodes()
                .iter()
                .map(|n| node_stats(n))
                .collect(),
        );
    }
    Value::Array(
        mon.state
            .exports()
            .list()
            .iter()
            .map(|e| {
                let per_queue: Vec<StatsSnapshot> =
                    e.state.stats.iter().map(|q| q.snapshot()).collect();
                let total = StatsSnapshot::sum(&per_queue);
                let root = e.state.backend.root();
                let mut v = json!({
                    "device": e.id,
                    "node-name": root.as_ref().map(|n| n.name().to_string()).unwrap_or_default(),
                    "stats": device_stats(&total),
                    "x-stats": stats_json(&total),
                    "x-queues": per_queue.iter().enumerate().map(|(i, q)| json!({
                        "queue": i,
                        "stats": stats_json(q),
                    })).collect::<Vec<_>>(),
                });
                if let Some(file) = root.as_ref().and_then(|n| file_of(n)) {
                    v["parent"] = node_stats(&file);
                }
                v
            })
            .collect(),
    )
}

fn file_of(node: &Node) -> Option<Arc<Node>> {
    node.children()
        .iter()
        .find(|c| c.role == ChildRole::File)
        .map(|c| c.node.clone())
}

/// BlockStats of a node: nodes count requests only (`x-requests`); QEMU's
/// `parent` is the node's file child, and `file` nodes add their
/// driver-specific (discard) counters, which ringblk does not keep.
fn node_stats(n: &Node) -> Value {
    let mut v = json!({
        "node-name": n.name(),
        "stats": device_stats(&StatsSnapshot::sum(&[])),
        "x-requests": n.requests(),
    });
    if let Value::Object(m) = &mut v {
        m.extend(n.driver_info());
    }
    if n.driver_name() == "file" {
        v["driver-specific"] = json!({
            "driver": "file",
            "discard-nb-ok": 0,
            "discard-nb-failed": 0,
            "discard-bytes-ok": 0,
        });
    }
    if let Some(file) = file_of(n) {
        v["parent"] = node_stats(&file);
    }
    v
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

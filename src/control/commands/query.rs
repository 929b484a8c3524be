//! query-block-exports, query-named-block-nodes, query-blockstats.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::control::server::Daemon;
use crate::formats::BlockIo;
use crate::graph::{all_nodes, ChildRole, Node};
use crate::vhost::blk::stats::{OpSnapshot, StatsSnapshot};

pub fn block_exports(daemon: &Daemon) -> Value {
    Value::Array(
        daemon
            .exports
            .list()
            .iter()
            .map(|e| {
                let b = &e.state.backend;
                json!({
                    "id": e.id,
                    "type": "vhost-user-blk",
                    "shutting-down": false,
                    "node-name": b.root().map(|n| n.name().to_string()),
                    "num-queues": e.geometry.num_queues,
                    "socket": e.socket.display().to_string(),
                    "connected": e.is_connected(),
                    "writable": !b.is_read_only(),
                    "size": b.size(),
                    "logical-block-size": e.geometry.limits.block_size,
                    "in-flight": e.state.in_flight(),
                    "quiesced": e.state.is_quiesced(),
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

pub fn named_block_nodes() -> Value {
    Value::Array(
        all_nodes()
            .iter()
            .map(|n| {
                let chain = backing_chain(n);
                json!({
                    "node-name": n.name(),
                    "drv": n.driver_name(),
                    "file": image_file(n),
                    "virtual-size": n.size(),
                    "read-only": n.is_read_only(),
                    "backing": chain.first(),
                    "backing-chain": chain,
                    "children": n.children().iter().map(|c| json!({
                        "role": c.role.to_string(),
                        "node-name": c.node.name(),
                    })).collect::<Vec<_>>(),
                    "in-flight": n.in_flight(),
                    "quiesce-counter": n.quiesce_counter(),
                    "requests": n.requests(),
                })
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

pub fn blockstats(daemon: &Daemon) -> Value {
    Value::Array(
        daemon
            .exports
            .list()
            .iter()
            .map(|e| {
                let per_queue: Vec<StatsSnapshot> =
                    e.state.stats.iter().map(|q| q.snapshot()).collect();
                let total = StatsSnapshot::sum(&per_queue);
                json!({
                    "export": e.id,
                    "node-name": e.state.backend.root().map(|n| n.name().to_string()),
                    "stats": stats_json(&total),
                    "queues": per_queue.iter().enumerate().map(|(i, q)| json!({
                        "queue": i,
                        "stats": stats_json(q),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// `query-iothreads`: QEMU's IOThreadInfo for each iothread.
pub fn iothreads(daemon: &Daemon) -> Value {
    Value::Array(
        daemon
            .iothreads
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

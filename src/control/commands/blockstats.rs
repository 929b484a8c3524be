//! `query-blockstats [query-nodes]`: QEMU's BlockStats per export (its
//! BlockBackend is the `device`), ours beside them as `x-stats` (every
//! request kind with latencies) and `x-queues`; with `query-nodes`, one
//! entry per node, which count requests only (`x-requests`).
//!
//! The reply is written as JSON text straight from these types: at 500
//! exports it is over a megabyte, and building it as a `serde_json::Value`
//! first (a map per object, a String per key, then a copy and a drop) took
//! 50 ms of the control thread where writing it takes a few.

use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::control::server::Monitor;
use crate::graph::{ChildRole, Node};
use crate::vhost::blk::export::BlkExport;
use crate::vhost::blk::stats::{OpSnapshot, StatsSnapshot};

/// The reply's `return` value, as JSON text.
pub(super) fn blockstats(mon: &Monitor, query_nodes: bool) -> String {
    let text = if query_nodes {
        let nodes = mon.state.graph().all_nodes();
        serde_json::to_string(&nodes.iter().map(|n| NodeStats(n)).collect::<Vec<_>>())
    } else {
        let exports = mon.state.exports().list();
        serde_json::to_string(&exports.iter().map(ExportStats::of).collect::<Vec<_>>())
    };
    // Serialising these types cannot fail: their maps have string keys.
    text.unwrap_or_else(|e| {
        log::error!("query-blockstats: {e}");
        "[]".into()
    })
}

struct ExportStats<'a> {
    device: &'a str,
    root: Option<Arc<Node>>,
    total: StatsSnapshot,
    per_queue: Vec<StatsSnapshot>,
}

impl<'a> ExportStats<'a> {
    fn of(e: &'a Arc<BlkExport>) -> Self {
        let per_queue: Vec<StatsSnapshot> = e.state.stats.iter().map(|q| q.snapshot()).collect();
        ExportStats {
            device: &e.id,
            root: e.state.backend.root(),
            total: StatsSnapshot::sum(&per_queue),
            per_queue,
        }
    }
}

impl Serialize for ExportStats<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("device", self.device)?;
        m.serialize_entry("node-name", self.root.as_ref().map_or("", |n| n.name()))?;
        m.serialize_entry("stats", &DeviceStats::of(&self.total))?;
        m.serialize_entry("x-stats", &KindStats(&self.total))?;
        let queues: Vec<QueueStats> = self
            .per_queue
            .iter()
            .enumerate()
            .map(|(queue, q)| QueueStats {
                queue,
                stats: KindStats(q),
            })
            .collect();
        m.serialize_entry("x-queues", &queues)?;
        if let Some(file) = self.root.as_ref().and_then(|n| file_of(n)) {
            m.serialize_entry("parent", &NodeStats(&file))?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct QueueStats<'a> {
    queue: usize,
    stats: KindStats<'a>,
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
struct NodeStats<'a>(&'a Node);

impl Serialize for NodeStats<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("node-name", n.name())?;
        m.serialize_entry("stats", &DeviceStats::default())?;
        m.serialize_entry("x-requests", &n.requests())?;
        // Drivers name their own members `x-...`: no clash with the above.
        for (k, v) in n.driver_info() {
            m.serialize_entry(&k, &v)?;
        }
        if n.driver_name() == "file" {
            let none = FileSpecific {
                driver: "file",
                discard_nb_ok: 0,
                discard_nb_failed: 0,
                discard_bytes_ok: 0,
            };
            m.serialize_entry("driver-specific", &none)?;
        }
        if let Some(file) = file_of(n) {
            m.serialize_entry("parent", &NodeStats(&file))?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct FileSpecific {
    driver: &'static str,
    #[serde(rename = "discard-nb-ok")]
    discard_nb_ok: u64,
    #[serde(rename = "discard-nb-failed")]
    discard_nb_failed: u64,
    #[serde(rename = "discard-bytes-ok")]
    discard_bytes_ok: u64,
}

/// QEMU's BlockDeviceStats from ours: reads, writes (write-zeroes
/// included, as QEMU accounts them), flushes and unmaps (discards).
/// Members QEMU has and ringblk does not count are 0; refused requests are
/// counted once, not by kind (`x-invalid`), so the `invalid_` ones are 0.
#[derive(Default, Serialize)]
struct DeviceStats {
    rd_bytes: u64,
    wr_bytes: u64,
    zone_append_bytes: u64,
    unmap_bytes: u64,
    rd_operations: u64,
    wr_operations: u64,
    zone_append_operations: u64,
    flush_operations: u64,
    unmap_operations: u64,
    rd_total_time_ns: u64,
    wr_total_time_ns: u64,
    zone_append_total_time_ns: u64,
    flush_total_time_ns: u64,
    unmap_total_time_ns: u64,
    wr_highest_offset: u64,
    rd_merged: u64,
    wr_merged: u64,
    zone_append_merged: u64,
    unmap_merged: u64,
    failed_rd_operations: u64,
    failed_wr_operations: u64,
    failed_zone_append_operations: u64,
    failed_flush_operations: u64,
    failed_unmap_operations: u64,
    invalid_rd_operations: u64,
    invalid_wr_operations: u64,
    invalid_zone_append_operations: u64,
    invalid_flush_operations: u64,
    invalid_unmap_operations: u64,
    account_invalid: Always,
    account_failed: Always,
    timed_stats: [u64; 0],
}

/// A `true` that `Default` gives too.
struct Always;

impl Default for Always {
    fn default() -> Self {
        Always
    }
}

impl Serialize for Always {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(true)
    }
}

impl DeviceStats {
    fn of(s: &StatsSnapshot) -> Self {
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
        DeviceStats {
            rd_bytes: sum(rd, |o| o.bytes),
            wr_bytes: sum(wr, |o| o.bytes),
            unmap_bytes: sum(un, |o| o.bytes),
            rd_operations: sum(rd, |o| o.operations),
            wr_operations: sum(wr, |o| o.operations),
            flush_operations: sum(fl, |o| o.operations),
            unmap_operations: sum(un, |o| o.operations),
            rd_total_time_ns: sum(rd, |o| o.total_time_ns),
            wr_total_time_ns: sum(wr, |o| o.total_time_ns),
            flush_total_time_ns: sum(fl, |o| o.total_time_ns),
            unmap_total_time_ns: sum(un, |o| o.total_time_ns),
            failed_rd_operations: sum(rd, |o| o.failed),
            failed_wr_operations: sum(wr, |o| o.failed),
            failed_flush_operations: sum(fl, |o| o.failed),
            failed_unmap_operations: sum(un, |o| o.failed),
            ..DeviceStats::default()
        }
    }
}

/// Ours: every request kind by name, and the refused requests (`invalid`).
struct KindStats<'a>(&'a StatsSnapshot);

impl Serialize for KindStats<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.by_kind.len() + 1))?;
        for (kind, op) in &self.0.by_kind {
            m.serialize_entry(kind, &OpStats(op))?;
        }
        m.serialize_entry("invalid", &self.0.invalid)?;
        m.end()
    }
}

struct OpStats<'a>(&'a OpSnapshot);

impl Serialize for OpStats<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let o = self.0;
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("operations", &o.operations)?;
        m.serialize_entry("bytes", &o.bytes)?;
        m.serialize_entry("failed", &o.failed)?;
        m.serialize_entry("total-time-ns", &o.total_time_ns)?;
        m.serialize_entry("latency", &Latency(o))?;
        m.end()
    }
}

struct Latency<'a>(&'a OpSnapshot);

impl Serialize for Latency<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let o = self.0;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("average-ns", &o.average_ns())?;
        m.serialize_entry("p50-us", &o.percentile_us(50.0))?;
        m.serialize_entry("p99-us", &o.percentile_us(99.0))?;
        m.serialize_entry("histogram-us", &Histogram(&o.histogram))?;
        m.end()
    }
}

/// Non-empty buckets as `{"below": 2^i µs, "count": n}`.
struct Histogram<'a>(&'a [u64]);

#[derive(Serialize)]
struct Bucket {
    below: u64,
    count: u64,
}

impl Serialize for Histogram<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.0
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, &count)| Bucket {
                    below: 1u64 << i,
                    count,
                }),
        )
    }
}

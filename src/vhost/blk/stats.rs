//! Per-queue request statistics for `query-blockstats`: operations, bytes,
//! errors and latency (total and a power-of-two histogram) per request
//! type. Counters are atomics with a single writer, the queue's own
//! iothread (queue `i` always runs on the same iothread), so an update is
//! a plain load and store rather than a locked read-modify-write; readers
//! (the control thread) see each counter whole.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::request::Op;

/// Histogram bucket `i` counts latencies below 2^i µs; the last bucket
/// takes everything slower (2^23 µs is about 8 s).
pub(crate) const LATENCY_BUCKETS: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

const KINDS: [OpKind; 6] = [
    OpKind::Read,
    OpKind::Write,
    OpKind::Flush,
    OpKind::Discard,
    OpKind::WriteZeroes,
    OpKind::GetId,
];

impl OpKind {
    pub fn of(op: &Op) -> (OpKind, u64) {
        match op {
            Op::Read { data, .. } => (OpKind::Read, data.len() as u64),
            Op::Write { data, .. } => (OpKind::Write, data.len() as u64),
            Op::Flush => (OpKind::Flush, 0),
            Op::Discard { len, .. } => (OpKind::Discard, *len),
            Op::WriteZeroes { len, .. } => (OpKind::WriteZeroes, *len),
            Op::GetId { .. } => (OpKind::GetId, 0),
        }
    }

    fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write-zeroes",
            OpKind::GetId => "get-id",
        }
    }
}

#[derive(Default)]
struct OpStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
    histogram: [AtomicU64; LATENCY_BUCKETS],
}

/// Add to a counter only this thread writes.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn bucket(latency: Duration) -> usize {
    let us = latency.as_micros().min(u64::MAX as u128) as u64;
    // Smallest i with us < 2^i.
    ((u64::BITS - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

/// One queue's counters; they outlive frontend sessions. Aligned so that
/// queues' counters (side by side in a Vec, each written by its own
/// iothread) never share a cache line.
#[derive(Default)]
#[repr(align(128))]
pub struct QueueStats {
    ops: [OpStats; 6],
    /// Requests rejected before reaching the disk (bad chains, bad ranges,
    /// unknown types).
    invalid: AtomicU64,
}

impl QueueStats {
    pub fn record(&self, kind: OpKind, bytes: u64, ok: bool, latency: Duration) {
        let s = &self.ops[kind as usize];
        bump(&s.ops, 1);
        bump(&s.bytes, bytes);
        if !ok {
            bump(&s.errors, 1);
        }
        bump(&s.total_ns, latency.as_nanos().min(u64::MAX as u128) as u64);
        bump(&s.histogram[bucket(latency)], 1);
    }

    pub fn record_invalid(&self) {
        bump(&self.invalid, 1);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut out = StatsSnapshot {
            by_kind: Vec::with_capacity(KINDS.len()),
            invalid: self.invalid.load(Ordering::Relaxed),
        };
        for k in KINDS {
            out.by_kind
                .push((k.name(), OpSnapshot::of(&self.ops[k as usize])));
        }
        out
    }
}

/// A point-in-time copy, summable across queues.
#[derive(Clone, Debug)]
pub struct StatsSnapshot {
    pub by_kind: Vec<(&'static str, OpSnapshot)>,
    pub invalid: u64,
}

impl StatsSnapshot {
    /// The sum of `parts` (all zeros if there are none).
    pub fn sum(parts: &[StatsSnapshot]) -> StatsSnapshot {
        let mut total = QueueStats::default().snapshot();
        for p in parts {
            total.add(p);
        }
        total
    }

    pub fn add(&mut self, other: &StatsSnapshot) {
        for ((_, a), (_, b)) in self.by_kind.iter_mut().zip(&other.by_kind) {
            a.add(b);
        }
        self.invalid += other.invalid;
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct OpSnapshot {
    pub operations: u64,
    pub bytes: u64,
    pub failed: u64,
    pub total_time_ns: u64,
    /// `histogram[i]`: requests that took less than 2^i µs (and at least
    /// 2^(i-1) µs).
    pub histogram: Vec<u64>,
}

impl OpSnapshot {
    fn of(s: &OpStats) -> Self {
        OpSnapshot {
            operations: s.ops.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            failed: s.errors.load(Ordering::Relaxed),
            total_time_ns: s.total_ns.load(Ordering::Relaxed),
            histogram: s
                .histogram
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }

    fn add(&mut self, o: &OpSnapshot) {
        self.operations += o.operations;
        self.bytes += o.bytes;
        self.failed += o.failed;
        self.total_time_ns += o.total_time_ns;
        for (a, b) in self.histogram.iter_mut().zip(&o.histogram) {
            *a += b;
        }
    }

    pub fn average_ns(&self) -> u64 {
        self.total_time_ns.checked_div(self.operations).unwrap_or(0)
    }

    /// Upper bound (µs) of the bucket holding the `p`-th percentile.
    pub fn percentile_us(&self, p: f64) -> u64 {
        let total: u64 = self.histogram.iter().sum();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * p / 100.0).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.histogram.iter().enumerate() {
            seen += n;
            if seen >= target {
                return 1u64 << i;
            }
        }
        1u64 << (LATENCY_BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_microseconds() {
        assert_eq!(bucket(Duration::from_nanos(500)), 0);
        assert_eq!(bucket(Duration::from_micros(1)), 1);
        assert_eq!(bucket(Duration::from_micros(3)), 2);
        assert_eq!(bucket(Duration::from_micros(4)), 3);
        assert_eq!(bucket(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn counts_sum_across_queues_and_percentiles_follow_the_histogram() {
        let (a, b) = (QueueStats::default(), QueueStats::default());
        for _ in 0..98 {
            a.record(OpKind::Read, 4096, true, Duration::from_micros(10));
        }
        b.record(OpKind::Read, 4096, false, Duration::from_millis(5));
        b.record(OpKind::Read, 4096, true, Duration::from_millis(5));
        b.record_invalid();
        let mut sum = a.snapshot();
        sum.add(&b.snapshot());
        let read = &sum.by_kind[0].1;
        assert_eq!((read.operations, read.bytes, read.failed), (100, 409600, 1));
        assert_eq!(read.percentile_us(50.0), 16);
        assert_eq!(read.percentile_us(99.0), 8192);
        assert_eq!(sum.invalid, 1);
        assert!(read.average_ns() > 10_000);
    }
}

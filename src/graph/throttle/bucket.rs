//! The leaky buckets behind a throttle group's limits (the algorithm of
//! QEMU's util/throttle.c, written anew): each bucket fills with what
//! requests cost (bytes or operations) and leaks at its rate; a request may
//! start while the bucket is at most a tenth of a second's worth full (or,
//! with a burst rate, a burst's worth), and is then charged in full, so a
//! large request makes the next ones wait. A burst bucket, leaking at the
//! burst rate, keeps bursts within the burst rate.

use std::time::{Duration, Instant};

use super::limits::{BucketLimit, Kind, Limits};

/// Which way a request moves data: write-zeroes and discard count as
/// writes, as in QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Read = 0,
    Write = 1,
}

const NS_PER_S: f64 = 1e9;

#[derive(Clone, Copy, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

/// The six buckets' fill levels under one set of limits.
pub(super) struct Buckets {
    limits: [BucketLimit; 6],
    op_size: u64,
    levels: [Level; 6],
    last_leak: Instant,
}

impl Buckets {
    /// Empty buckets (as after any change of limits).
    pub(super) fn new(limits: &Limits, now: Instant) -> Self {
        Buckets {
            limits: limits.buckets,
            op_size: limits.op_size,
            levels: [Level::default(); 6],
            last_leak: now,
        }
    }

    /// Let every bucket leak for the time since the last leak.
    pub(super) fn leak(&mut self, now: Instant) {
        let Some(delta) = now.checked_duration_since(self.last_leak) else {
            return;
        };
        self.last_leak = now;
        let secs = delta.as_nanos() as f64 / NS_PER_S;
        for (l, b) in self.levels.iter_mut().zip(&self.limits) {
            l.level = (l.level - b.avg as f64 * secs).max(0.0);
            if b.burst_length > 1 {
                l.burst_level = (l.burst_level - b.max as f64 * secs).max(0.0);
            }
        }
    }

    fn kinds(dir: Direction) -> [Kind; 4] {
        match dir {
            Direction::Read => [Kind::BpsTotal, Kind::OpsTotal, Kind::BpsRead, Kind::OpsRead],
            Direction::Write => [
                Kind::BpsTotal,
                Kind::OpsTotal,
                Kind::BpsWrite,
                Kind::OpsWrite,
            ],
        }
    }

    /// How long a request in `dir` must wait before it may start: the
    /// longest wait of the buckets it is charged to (zero: it may go).
    pub(super) fn wait(&self, dir: Direction) -> Duration {
        Self::kinds(dir)
            .iter()
            .map(|k| wait_of(&self.limits[*k as usize], &self.levels[*k as usize]))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Charge a request of `bytes` in `dir`: its bytes to the byte
    /// buckets, one operation (or bytes / iops-size, if larger) to the
    /// operation buckets.
    pub(super) fn account(&mut self, dir: Direction, bytes: u64) {
        let units = if self.op_size != 0 && bytes > self.op_size {
            bytes as f64 / self.op_size as f64
        } else {
            1.0
        };
        let [bps_total, ops_total, bps_dir, ops_dir] = Self::kinds(dir);
        for (k, amount) in [
            (bps_total, bytes as f64),
            (bps_dir, bytes as f64),
            (ops_total, units),
            (ops_dir, units),
        ] {
            let l = &mut self.levels[k as usize];
            l.level += amount;
            if self.limits[k as usize].burst_length > 1 {
                l.burst_level += amount;
            }
        }
    }
}

/// One bucket's wait: how long until its level is back at its threshold
/// (a tenth of a second at the rate; with a burst rate, a whole burst),
/// or until the burst bucket is.
fn wait_of(b: &BucketLimit, l: &Level) -> Duration {
    if b.avg == 0 {
        return Duration::ZERO;
    }
    let (size, burst_size) = if b.max == 0 {
        (b.avg as f64 / 10.0, 0.0)
    } else {
        (
            (b.max.saturating_mul(b.burst_length)) as f64,
            b.max as f64 / 10.0,
        )
    };
    let extra = l.level - size;
    if extra > 0.0 {
        return ns(extra * NS_PER_S / b.avg as f64);
    }
    if b.burst_length > 1 {
        let extra = l.burst_level - burst_size;
        if extra > 0.0 {
            return ns(extra * NS_PER_S / b.max as f64);
        }
    }
    Duration::ZERO
}

fn ns(v: f64) -> Duration {
    Duration::from_nanos(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(v: serde_json::Value) -> Limits {
        let serde_json::Value::Object(m) = v else {
            unreachable!("test input is an object")
        };
        Limits::default().updated(m).unwrap()
    }

    #[test]
    fn a_tenth_of_a_second_passes_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Buckets::new(&limits(json!({"iops-total": 100})), t0);
        // 11 requests pass back to back: the 11th sees the level at 10.
        for _ in 0..11 {
            assert_eq!(b.wait(Direction::Read), Duration::ZERO);
            b.account(Direction::Read, 4096);
        }
        // The 12th waits one operation's worth: 10 ms.
        assert_eq!(b.wait(Direction::Write), Duration::from_millis(10));
        b.leak(t0 + Duration::from_millis(10));
        assert_eq!(b.wait(Direction::Write), Duration::ZERO);
    }

    #[test]
    fn byte_limits_charge_bytes_and_iops_size_splits() {
        let t0 = Instant::now();
        let mut b = Buckets::new(&limits(json!({"bps-read": 1_048_576})), t0);
        b.account(Direction::Read, 1_048_576);
        // 1 MiB over a 0.1 s threshold of 104857.6 bytes: 0.9 s.
        let w = b.wait(Direction::Read);
        assert!(w > Duration::from_millis(899) && w <= Duration::from_millis(900));
        // Writes are not charged to the read bucket.
        assert_eq!(b.wait(Direction::Write), Duration::ZERO);

        let mut b = Buckets::new(&limits(json!({"iops-total": 10, "iops-size": 4096})), t0);
        b.account(Direction::Write, 16384);
        // 4 operations over a threshold of 1: 0.3 s.
        assert_eq!(b.wait(Direction::Write), Duration::from_millis(300));
    }

    #[test]
    fn a_burst_is_allowed_once() {
        let t0 = Instant::now();
        let l = limits(json!({"iops-total": 100, "iops-total-max": 1000,
                              "iops-total-max-length": 2}));
        let mut b = Buckets::new(&l, t0);
        // A burst of 1000 ops/s for 2 s over a rate of 100 ops/s: requests
        // go at the burst rate (1 ms apart) until about 2000 operations
        // have passed, then at the rate (10 ms apart).
        let mut passed = 0;
        let mut now = t0;
        while passed < 5000 {
            let w = b.wait(Direction::Read);
            if w >= Duration::from_millis(5) {
                break;
            }
            now += w;
            b.leak(now);
            b.account(Direction::Read, 512);
            passed += 1;
        }
        // The main bucket allows 2000 + what leaked meanwhile (100/s over
        // about 2 s), then the long wait starts.
        assert!((2000..=2300).contains(&passed), "{passed}");
        let elapsed = now - t0;
        assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");
    }
}

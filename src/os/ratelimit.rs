//! Rate-limited logging for things a guest can trigger at will.

use std::cell::Cell;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);
const BURST: u32 = 10;

/// Allows `BURST` lines per second and reports how many were dropped.
pub(crate) struct LogLimiter {
    start: Cell<Instant>,
    count: Cell<u32>,
    suppressed: Cell<u64>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            start: Cell::new(Instant::now()),
            count: Cell::new(0),
            suppressed: Cell::new(0),
        }
    }
}

impl LogLimiter {
    /// True if the caller may log now.
    pub(crate) fn allow(&self, what: &str) -> bool {
        let now = Instant::now();
        if now.duration_since(self.start.get()) >= WINDOW {
            if self.suppressed.get() > 0 {
                log::warn!(
                    "{what}: {} similar messages suppressed",
                    self.suppressed.get()
                );
            }
            self.start.set(now);
            self.count.set(0);
            self.suppressed.set(0);
        }
        if self.count.get() < BURST {
            self.count.set(self.count.get() + 1);
            true
        } else {
            self.suppressed.set(self.suppressed.get() + 1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses() {
        let l = LogLimiter::default();
        let allowed = (0..100).filter(|_| l.allow("test")).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(l.suppressed.get(), 90);
    }
}

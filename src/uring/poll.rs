//! Adaptive busy-polling before the iothread sleeps, as QEMU's AioContext
//! does (poll-max-ns): a kick or completion that arrives within the polling
//! window costs no sleep/wake-up, and while we poll the guest need not kick.

use std::time::Duration;

/// Something an iothread can poll for work without blocking (a virtqueue).
pub trait Poller {
    /// Look for new work and start it; true if any was found.
    fn poll(self: std::rc::Rc<Self>) -> bool;
    /// Polling is over and the thread will sleep: re-enable notifications.
    /// True if work turned up while they were off (it has been started).
    fn poll_end(self: std::rc::Rc<Self>) -> bool;
}

/// QEMU's adaptive window: grow when sleeps are short, shrink when long.
pub(super) struct PollWindow {
    max: Duration,
    current: Duration,
}

const START: Duration = Duration::from_micros(4);

impl PollWindow {
    pub(super) fn new(max: Duration) -> Self {
        PollWindow {
            max,
            current: Duration::ZERO,
        }
    }

    pub(super) fn current(&self) -> Duration {
        self.current
    }

    /// Adjust after a wait (polling plus sleeping) that took `waited`.
    pub(super) fn adjust(&mut self, waited: Duration) {
        if waited <= self.current {
            // Polling found the work: the window is right.
        } else if waited > self.max {
            // Polling would have had to last too long: poll less.
            self.current /= 2;
            if self.current < START {
                self.current = Duration::ZERO;
            }
        } else if self.current < self.max {
            // The work came soon after we gave up polling: poll longer.
            self.current = if self.current.is_zero() {
                START
            } else {
                (self.current * 2).min(self.max)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_on_short_waits_and_shrinks_on_long_ones() {
        let mut w = PollWindow::new(Duration::from_micros(32));
        w.adjust(Duration::from_micros(10));
        assert_eq!(w.current(), START);
        w.adjust(Duration::from_micros(10));
        w.adjust(Duration::from_micros(10));
        assert_eq!(w.current(), Duration::from_micros(16));
        w.adjust(Duration::from_micros(12));
        assert_eq!(
            w.current(),
            Duration::from_micros(16),
            "success inside the window keeps it"
        );
        w.adjust(Duration::from_micros(20));
        w.adjust(Duration::from_micros(20));
        assert_eq!(
            w.current(),
            Duration::from_micros(32),
            "capped at the maximum"
        );
        w.adjust(Duration::from_millis(5));
        assert_eq!(w.current(), Duration::from_micros(16));
        for _ in 0..4 {
            w.adjust(Duration::from_millis(5));
        }
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn disabled_when_max_is_zero() {
        let mut w = PollWindow::new(Duration::ZERO);
        w.adjust(Duration::from_micros(1));
        assert_eq!(w.current(), Duration::ZERO);
    }
}

//! Iothreads: an OS thread running one [`Runtime`] until told to stop.

use std::io;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::executor::{LoopTimes, Message, Remote, Runtime};
use super::slot::SlotLease;
use crate::error::Error;

/// Ring size per iothread; enough for a 1024-entry virtqueue plus our own ops.
const RING_ENTRIES: u32 = 2048;

/// A handle other threads use to run work on an iothread.
#[derive(Clone)]
pub struct IoThreadHandle {
    remote: Arc<Remote>,
    name: Arc<str>,
    /// The OS thread id (QMP's `thread-id`).
    tid: i32,
    poll_max: std::time::Duration,
    times: Arc<LoopTimes>,
}

impl IoThreadHandle {
    /// Run `f` on the iothread (it may spawn tasks there). Does not wait.
    pub fn run(&self, f: impl FnOnce() + Send + 'static) {
        self.remote.post(Message::Run(Box::new(f)));
    }

    /// Create a future on the iothread with `make`, run it there to
    /// completion, and return its output. For the control thread's own I/O.
    pub fn block_on<R, F>(&self, make: impl FnOnce() -> F + Send + 'static) -> R
    where
        R: Send + 'static,
        F: std::future::Future<Output = R> + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.run(move || {
            let fut = make();
            super::spawn(async move {
                let _ = tx.send(fut.await);
            });
        });
        rx.recv().expect("iothread exited while running a future")
    }

    /// Whether the iothread's loop runs a posted closure within `limit`:
    /// a thread stuck in a system call or a busy task does not.
    pub fn responds_within(&self, limit: std::time::Duration) -> bool {
        let (tx, rx) = mpsc::sync_channel(1);
        self.run(move || {
            let _ = tx.send(());
        });
        rx.recv_timeout(limit).is_ok()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn thread_id(&self) -> i32 {
        self.tid
    }

    /// The longest adaptive busy-poll before the thread sleeps.
    pub fn poll_max(&self) -> std::time::Duration {
        self.poll_max
    }

    /// How the thread spent its time so far (busy polling, asleep).
    pub fn times(&self) -> &LoopTimes {
        &self.times
    }
}

/// The iothreads of `all` called `ids`, in that order.
pub(crate) fn find_iothreads(
    all: &[IoThreadHandle],
    ids: &[String],
) -> Result<Vec<IoThreadHandle>, Error> {
    ids.iter()
        .map(|id| {
            all.iter()
                .find(|t| t.name() == id.as_str())
                .cloned()
                .ok_or_else(|| Error::not_found(format!("Cannot find iothread {id}")))
        })
        .collect()
}

/// An owned iothread; stopping waits for its tasks to finish.
pub(crate) struct IoThread {
    handle: IoThreadHandle,
    join: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Start an iothread that busy-polls for up to `poll_max` (adaptively)
    /// before sleeping; zero disables polling.
    pub(crate) fn start(name: &str, poll_max: std::time::Duration) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(1);
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                super::fence::init();
                // Held until the runtime and every task on it are gone.
                let lease = SlotLease::acquire();
                if lease.is_none() {
                    log::info!(
                        "iothread {}: all thread slots are taken; it counts requests in the shared one",
                        std::thread::current().name().unwrap_or("?")
                    );
                }
                match Runtime::new(RING_ENTRIES, poll_max) {
                    Ok(rt) => {
                        // SAFETY: gettid has no preconditions.
                        let tid = unsafe { libc::gettid() };
                        let _ = tx.send(Ok((rt.remote.clone(), tid, rt.times.clone())));
                        rt.run();
                        drop(rt);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
                drop(lease);
            })?;
        let (remote, tid, times) = rx
            .recv()
            .map_err(|_| io::Error::other("iothread died during start-up"))??;
        Ok(IoThread {
            handle: IoThreadHandle {
                remote,
                name: name.into(),
                tid,
                poll_max,
                times,
            },
            join: Some(join),
        })
    }

    pub(crate) fn handle(&self) -> IoThreadHandle {
        self.handle.clone()
    }

    /// Ask the loop to exit once all its tasks are done, and wait for it.
    pub(crate) fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(join) = self.join.take() {
            self.handle.run(|| {
                super::executor::request_stop_current();
            });
            if join.join().is_err() {
                log::error!("iothread {} panicked", self.handle.name);
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_blocked_iothread_does_not_respond_and_a_free_one_does() {
        let t = IoThread::start("io-alive", Duration::ZERO).unwrap();
        assert!(t.handle().responds_within(Duration::from_secs(10)));
        // Block the loop in a closure until the test lets go.
        let (release, wait) = mpsc::channel::<()>();
        t.handle().run(move || {
            let _ = wait.recv();
        });
        assert!(!t.handle().responds_within(Duration::from_millis(50)));
        drop(release);
        assert!(t.handle().responds_within(Duration::from_secs(10)));
    }
}

//! One QMP client: its connection, the bounded queue of what we owe it, and
//! the thread that serves it.
//!
//! Nothing ever writes to a client's socket but its own thread, and that
//! thread never blocks on it: replies and events are queued (a short lock,
//! no I/O), so an event emitted inside a drained section, under the big
//! lock, costs a memcpy whatever the clients do. A client that lets its
//! queue grow past `MAX_OUTBOX_BYTES` (plus its longest message) is disconnected.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

/// What one client may have queued and unread before it is disconnected:
/// thousands of events, or a usual reply many times over; plus the largest
/// message queued, so that one reply bigger than this (a query over
/// hundreds of disks) reaches a client that reads.
pub(super) const MAX_OUTBOX_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Outbox {
    queue: VecDeque<Vec<u8>>,
    /// Bytes of the front message already written.
    written: usize,
    bytes: usize,
    /// The longest message queued since the queue was last empty.
    longest: usize,
    /// The client fell too far behind; it is being disconnected.
    overflowed: bool,
    /// The daemon is closing this connection.
    closing: bool,
}

pub(super) struct Client {
    pub id: u64,
    pub negotiated: AtomicBool,
    outbox: Mutex<Outbox>,
    /// Tells the client's thread that the outbox changed.
    wake: EventFd,
}

/// Why a client's thread stopped serving it.
enum Stop {
    Closed,
    Overflowed,
}

impl Client {
    pub(super) fn new(id: u64) -> io::Result<Client> {
        Ok(Client {
            id,
            negotiated: AtomicBool::new(false),
            outbox: Mutex::new(Outbox::default()),
            wake: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
        })
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        // A full eventfd counter already means "look at the outbox".
        let _ = self.wake.write(1);
    }

    /// Queue one message; never blocks.
    pub(super) fn send(&self, v: &Value) {
        self.send_text(v.to_string());
    }

    /// Queue one JSON text (a newline is added).
    pub(super) fn send_text(&self, text: String) {
        let mut text = text.into_bytes();
        text.push(b'\n');
        {
            let mut o = self.outbox();
            if o.overflowed || o.closing {
                return;
            }
            let longest = o.longest.max(text.len());
            if o.bytes + text.len() > MAX_OUTBOX_BYTES + longest {
                o.overflowed = true;
                o.queue.clear();
                o.bytes = 0;
            } else {
                o.bytes += text.len();
                o.longest = longest;
                o.queue.push_back(text);
            }
        }
        self.kick();
    }

    /// Ask the client's thread to send what is queued (if the socket takes
    /// it now) and close the connection.
    pub(super) fn close(&self) {
        self.outbox().closing = true;
        self.kick();
    }

    /// Write what the socket takes without blocking; Err on a dead socket.
    fn flush(&self, mut stream: &UnixStream) -> io::Result<()> {
        let mut guard = self.outbox();
        let o = &mut *guard;
        while let Some(front) = o.queue.front() {
            match stream.write(&front[o.written..]) {
                Ok(n) => {
                    o.written += n;
                    if o.written == front.len() {
                        o.bytes -= front.len();
                        o.queue.pop_front();
                        o.written = 0;
                        if o.queue.is_empty() {
                            o.longest = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Serve the connection until it closes, the client falls too far
    /// behind, or `close` is called. `input` gets what the client sends.
    pub(super) fn serve(&self, stream: &UnixStream, mut input: impl FnMut(&[u8]) -> bool) {
        let stop = match stream.set_nonblocking(true) {
            Ok(()) => self.serve_loop(stream, &mut input),
            Err(e) => {
                log::warn!("QMP client {}: {e}", self.id);
                Stop::Closed
            }
        };
        if let Stop::Overflowed = stop {
            log::warn!(
                "QMP client {}: more than {MAX_OUTBOX_BYTES} bytes of replies and events unread; disconnecting it",
                self.id
            );
        }
    }

    fn serve_loop(&self, stream: &UnixStream, input: &mut impl FnMut(&[u8]) -> bool) -> Stop {
        let mut buf = [0u8; 4096];
        loop {
            let (pending, overflowed, closing) = {
                let o = self.outbox();
                (!o.queue.is_empty(), o.overflowed, o.closing)
            };
            if overflowed {
                return Stop::Overflowed;
            }
            if pending && self.flush(stream).is_err() {
                return Stop::Closed;
            }
            if closing {
                return Stop::Closed;
            }
            let still_pending = !self.outbox().queue.is_empty();
            let mut fds = [
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN | if still_pending { libc::POLLOUT } else { 0 },
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two valid pollfd entries.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::warn!("QMP client {}: poll failed: {e}", self.id);
                return Stop::Closed;
            }
            if fds[1].revents != 0 {
                let _ = self.wake.read();
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                match (&*stream).read(&mut buf) {
                    Ok(0) => return Stop::Closed,
                    Ok(n) => {
                        if !input(&buf[..n]) {
                            // Send the last words (an error reply) if we can.
                            let _ = self.flush(stream);
                            return Stop::Closed;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        log::debug!("QMP client {}: read failed: {e}", self.id);
                        return Stop::Closed;
                    }
                }
            }
        }
    }

    pub(super) fn is_negotiated(&self) -> bool {
        self.negotiated.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_client_that_does_not_read_is_cut_off_without_blocking_senders() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let c = std::sync::Arc::new(Client::new(1).unwrap());
        let served = {
            let c = c.clone();
            std::thread::spawn(move || c.serve(&ours, |_| true))
        };
        // `theirs` never reads: the socket buffer fills, then the outbox.
        let ev = json!({"event": "X", "data": {"pad": "x".repeat(1000)}});
        let started = std::time::Instant::now();
        for _ in 0..(4 * MAX_OUTBOX_BYTES / 1000) {
            c.send(&ev);
        }
        served.join().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(c.outbox().overflowed);
        drop(theirs);
    }

    /// A reply bigger than the bound (query-blockstats over hundreds of
    /// exports) reaches a client that reads, events queued around it too;
    /// the bound still holds behind it.
    #[test]
    fn one_reply_larger_than_the_bound_reaches_a_client_that_reads() {
        let c = Client::new(3).unwrap();
        c.send(&json!({"event": "X"}));
        let big = json!({"return": "x".repeat(3 * MAX_OUTBOX_BYTES / 2)});
        c.send(&big);
        c.send(&json!({"event": "Y"}));
        assert!(!c.outbox().overflowed);
        assert_eq!(c.outbox().queue.len(), 3);
        // Unread, a second reply of that size is too much.
        c.send(&big);
        assert!(c.outbox().overflowed);
    }

    #[test]
    fn queued_messages_arrive_in_order_and_close_ends_the_thread() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let c = std::sync::Arc::new(Client::new(2).unwrap());
        let served = {
            let c = c.clone();
            std::thread::spawn(move || c.serve(&ours, |_| true))
        };
        for i in 0..100 {
            c.send(&json!({ "n": i }));
        }
        c.close();
        served.join().unwrap();
        let mut got = String::new();
        theirs.read_to_string(&mut got).unwrap();
        let ns: Vec<u64> = got
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, (0..100).collect::<Vec<_>>());
    }
}

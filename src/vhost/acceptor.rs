//! One thread takes new frontends for every export.
//!
//! An export with no frontend connected needs no thread of its own: its
//! listening socket sits in this thread's epoll set, armed one-shot. When a
//! frontend connects, the connection gets a thread for as long as it lasts
//! (one frontend at a time per export: the socket is armed again only when
//! that thread is done). So a daemon with hundreds of exports runs one
//! thread for all idle ones, instead of a thread and its memory each.
//!
//! An export leaves the set when it stops (`remove`), and its connection
//! thread, told to stop by the export's own stop eventfd, is handed back to
//! be joined.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// A listening socket and what serves a connection on it.
pub(crate) trait Listening: Send + Sync + 'static {
    fn listener_fd(&self) -> RawFd;
    fn path(&self) -> &Path;
    /// Take one pending connection (the socket is non-blocking).
    fn accept(&self) -> io::Result<UnixStream>;
    /// Serve `stream` until the frontend leaves or the export stops.
    fn serve_stream(&self, stream: UnixStream);
}

/// The acceptor's handle for one export.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Token(u64);

/// Waits after a failed accept (out of fds or memory: the connection stays
/// queued, so retrying at once would spin): 10 ms doubling to 1 s.
const FIRST_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_secs(1);

struct Entry {
    server: Arc<dyn Listening>,
    /// The connection's thread, if one was started (it may have ended).
    session: Option<JoinHandle<()>>,
    delay: Duration,
    retry_at: Option<Instant>,
}

impl Entry {
    /// Leave the socket disarmed for a while (the next wait doubles), and
    /// say why.
    fn back_off(&mut self, what: &str, e: &io::Error) {
        self.delay = (self.delay * 2).clamp(FIRST_RETRY, MAX_RETRY);
        self.retry_at = Some(Instant::now() + self.delay);
        log::warn!(
            "{}: {what}: {e}; retrying in {:?}",
            self.server.path().display(),
            self.delay
        );
    }
}

struct Inner {
    epoll: OwnedFd,
    /// Ends the acceptor's thread.
    quit: EventFd,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// The token of `quit` in the epoll set (export tokens count from 1).
const QUIT: u64 = 0;

pub(crate) struct Acceptor {
    inner: Arc<Inner>,
    next: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    pub(crate) fn start() -> io::Result<Acceptor> {
        // SAFETY: epoll_create1 takes a flag and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let quit = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: QUIT,
        };
        // SAFETY: epoll_ctl on the fresh epoll fd with a valid event struct.
        if unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                quit.as_raw_fd(),
                &mut ev,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let inner = Arc::new(Inner {
            epoll,
            quit,
            entries: Mutex::new(HashMap::new()),
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-accept".into())
            .spawn(move || worker.run())?;
        Ok(Acceptor {
            inner,
            next: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    /// Take frontends for `server` from now on; or first serve `first` (a
    /// session handed over by the previous daemon) on a thread of its own,
    /// and take new frontends once it has ended.
    pub(crate) fn add(
        &self,
        server: Arc<dyn Listening>,
        first: Option<Box<dyn FnOnce() + Send>>,
    ) -> io::Result<Token> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let fd = server.listener_fd();
        set_nonblocking(fd)?;
        let mut entries = self.inner.entries();
        ctl(
            &self.inner.epoll,
            libc::EPOLL_CTL_ADD,
            fd,
            token,
            first.is_none(),
        )?;
        let session = match first {
            Some(run) => {
                let inner = self.inner.clone();
                let started = std::thread::Builder::new()
                    .name("vhost".into())
                    .spawn(move || {
                        run();
                        inner.rearm(token);
                    });
                match started {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let _ = ctl(&self.inner.epoll, libc::EPOLL_CTL_DEL, fd, token, false);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        entries.insert(
            token,
            Entry {
                server,
                session,
                delay: Duration::ZERO,
                retry_at: None,
            },
        );
        Ok(Token(token))
    }

    /// Take no more frontends for `token`'s export; its connection's
    /// thread, if any, for the caller to join (after telling it to stop).
    pub(crate) fn remove(&self, token: Token) -> Option<JoinHandle<()>> {
        let mut entries = self.inner.entries();
        let entry = entries.remove(&token.0)?;
        let fd = entry.server.listener_fd();
        let _ = ctl(&self.inner.epoll, libc::EPOLL_CTL_DEL, fd, token.0, false);
        entry.session
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let _ = self.inner.quit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn entries(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watch `token`'s socket again (its connection ended, or a retry is
    /// due); nothing if the export is gone.
    fn rearm(&self, token: u64) {
        let entries = self.entries();
        if let Some(e) = entries.get(&token) {
            let fd = e.server.listener_fd();
            if let Err(err) = ctl(&self.epoll, libc::EPOLL_CTL_MOD, fd, token, true) {
                log::error!(
                    "{}: cannot watch for frontends: {err}",
                    e.server.path().display()
                );
            }
        }
    }

    fn run(self: Arc<Self>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        loop {
            let timeout = self.next_retry();
            // SAFETY: epoll_wait writes at most `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("vhost acceptor: epoll_wait failed: {e}; no new frontends");
                return;
            }
            for ev in &events[..n as usize] {
                let token = ev.u64;
                if token == QUIT {
                    return;
                }
                self.take_frontend(token);
            }
            self.retry_due();
        }
    }

    /// Milliseconds until the next retry of a failed accept (-1: none).
    fn next_retry(&self) -> libc::c_int {
        let now = Instant::now();
        self.entries()
            .values()
            .filter_map(|e| e.retry_at)
            .min()
            .map_or(-1, |at| {
                at.saturating_duration_since(now).as_millis().min(1000) as libc::c_int + 1
            })
    }

    fn retry_due(self: &Arc<Self>) {
        let now = Instant::now();
        let due: Vec<u64> = {
            let mut entries = self.entries();
            entries
                .iter_mut()
                .filter(|(_, e)| e.retry_at.is_some_and(|at| at <= now))
                .map(|(t, e)| {
                    e.retry_at = None;
                    *t
                })
                .collect()
        };
        due.into_iter().for_each(|t| self.rearm(t));
    }

    /// `token`'s socket is readable: take the frontend and start its
    /// thread, which arms the socket again when it is done.
    fn take_frontend(self: &Arc<Self>, token: u64) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(&token) else {
            return; // removed meanwhile
        };
        let stream = match entry.server.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                drop(entries);
                self.rearm(token);
                return;
            }
            Err(e) => return entry.back_off("cannot take a new connection", &e),
        };
        entry.delay = Duration::ZERO;
        // The previous connection's thread has ended (it armed the socket).
        if let Some(old) = entry.session.take() {
            let _ = old.join();
        }
        let server = entry.server.clone();
        let inner = self.clone();
        let started = std::thread::Builder::new()
            .name("vhost".into())
            .spawn(move || {
                server.serve_stream(stream);
                inner.rearm(token);
            });
        match started {
            Ok(t) => entry.session = Some(t),
            // The connection closes; the frontend may try again.
            Err(e) => entry.back_off("no thread for a new frontend", &e),
        }
    }
}

fn ctl(epoll: &OwnedFd, op: libc::c_int, fd: RawFd, token: u64, armed: bool) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        // Disarmed: registered with no events, so the fd stays known.
        events: if armed {
            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32
        } else {
            libc::EPOLLONESHOT as u32
        },
        u64: token,
    };
    // SAFETY: epoll_ctl on our epoll fd with a valid event struct.
    if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

//! The QMP socket: accepts clients up to a limit, one thread each.
//! Commands that change the graph run under the graph lock (QEMU's BQL
//! counterpart), so graph changes from different clients never interleave;
//! queries, drained sections, and commands that take it themselves around
//! the graph change only do not (`commands::holds_graph_lock`).

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::args::Args;
use super::client::Client;
use super::commands;
use super::json_stream::{Piece, Splitter};
use super::qmp::{self, QmpError};
use crate::graph::Node;
use crate::os::listen::{bind_listener, AcceptBackoff, SocketFile};
use crate::os::ratelimit::LogLimiter;
use crate::os::wait::{wait_for, Wake};
use crate::state::DaemonState;

/// The QMP monitor: the daemon's state its commands act on, the clients
/// connected, and how `quit` starts the shutdown.
pub(crate) struct Monitor {
    pub state: Arc<DaemonState>,
    clients: Mutex<Vec<Arc<Client>>>,
    shutdown: Box<dyn Fn() + Send + Sync>,
}

impl Monitor {
    /// `shutdown` is called by `quit`; it must only start the shutdown
    /// (the daemon's main thread carries it out).
    pub(crate) fn new(
        state: Arc<DaemonState>,
        shutdown: impl Fn() + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Monitor {
            state,
            clients: Mutex::new(Vec::new()),
            shutdown: Box::new(shutdown),
        })
    }

    pub(crate) fn request_shutdown(&self) {
        (self.shutdown)();
    }

    fn clients(&self) -> MutexGuard<'_, Vec<Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send an event to every client past capabilities negotiation.
    pub(crate) fn emit(&self, name: &str, data: Value) {
        let ev = qmp::event(name, data);
        let clients: Vec<_> = self.clients().clone();
        for c in clients.iter().filter(|c| c.is_negotiated()) {
            c.send(&ev);
        }
    }
}

/// The drained sections one client holds; ended when it disconnects.
#[derive(Default)]
pub(crate) struct Sections(Vec<Arc<Node>>);

impl Sections {
    pub(crate) fn push(&mut self, node: Arc<Node>) {
        self.0.push(node);
    }

    /// Forget one section on `node`; false if this client holds none.
    pub(crate) fn remove(&mut self, node: &Arc<Node>) -> bool {
        match self.0.iter().rposition(|n| Arc::ptr_eq(n, node)) {
            Some(i) => {
                self.0.remove(i);
                true
            }
            None => false,
        }
    }

    pub(crate) fn end_all(&mut self) {
        for n in self.0.drain(..).rev() {
            log::info!(
                "node {}: ending a drained section its client left open",
                n.name()
            );
            if let Err(e) = n.drained_end() {
                log::error!("{e}");
            }
        }
    }
}

/// The control socket is for the daemon's owner only: QMP can stop the
/// daemon and freeze its guests.
const CONTROL_SOCKET_MODE: u32 = 0o600;

pub(crate) struct ControlServer {
    /// Removes the socket file when the server goes.
    _file: SocketFile,
    stop: EventFd,
    mon: Arc<Monitor>,
    accept_thread: Option<JoinHandle<()>>,
    client_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ControlServer {
    /// Bind `path` and start accepting clients, at most `max_clients` at
    /// once.
    pub(crate) fn start(path: &Path, mon: Arc<Monitor>, max_clients: usize) -> io::Result<Self> {
        let (listener, file) = bind_listener(path, CONTROL_SOCKET_MODE)?;
        let stop = EventFd::new(libc::EFD_CLOEXEC)?;
        let client_threads = Arc::new(Mutex::new(Vec::new()));
        let (d, s, t) = (mon.clone(), stop.try_clone()?, client_threads.clone());
        let accept_thread = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(listener, d, s, t, max_clients))?;
        log::info!("QMP control socket on {}", path.display());
        // Jobs announce their progress to every client.
        let events = Arc::downgrade(&mon);
        mon.state.graph().jobs().set_event_sink(move |name, data| {
            if let Some(d) = events.upgrade() {
                d.emit(name, data);
            }
        });
        Ok(ControlServer {
            _file: file,
            stop,
            mon,
            accept_thread: Some(accept_thread),
            client_threads,
        })
    }

    /// Announce the shutdown, stop accepting, disconnect every client (their
    /// drained sections end) and wait for their threads.
    pub(crate) fn shutdown(mut self, reason: &str) {
        self.mon
            .emit("SHUTDOWN", json!({"guest": false, "reason": reason}));
        let _ = self.stop.write(1);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for c in self.mon.clients().iter() {
            c.close();
        }
        let threads = std::mem::take(
            &mut *self
                .client_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    mon: Arc<Monitor>,
    stop: EventFd,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    max_clients: usize,
) {
    static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);
    let mut backoff = AcceptBackoff::default();
    let refusals = LogLimiter::default();
    loop {
        match wait_for(listener.as_raw_fd(), stop.as_raw_fd()) {
            Ok(Wake::Ready) => {}
            Ok(Wake::Stop) => return,
            Err(e) => {
                log::error!("QMP socket: poll failed: {e}");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if !backoff.failed(Path::new("QMP socket"), &e, stop.as_raw_fd()) {
                    return;
                }
                continue;
            }
        };
        if mon.clients().len() >= max_clients {
            if refusals.allow("QMP client refused") {
                log::warn!("QMP socket: refusing a client: {max_clients} are connected");
            }
            refuse(stream, max_clients);
            continue;
        }
        let client = match Client::new(NEXT_CLIENT.fetch_add(1, Ordering::Relaxed)) {
            Ok(c) => Arc::new(c),
            // Out of fds after the accept: the same pacing as a failed
            // accept, or every queued connection would cost a log line.
            Err(e) => {
                drop(stream);
                if !backoff.failed(Path::new("QMP socket"), &e, stop.as_raw_fd()) {
                    return;
                }
                continue;
            }
        };
        backoff.succeeded();
        mon.clients().push(client.clone());
        let d = mon.clone();
        let c = client.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("qmp-client{}", client.id))
            .spawn(move || serve_client(d, c, stream));
        match spawned {
            Ok(h) => {
                let mut t = threads.lock().unwrap_or_else(|e| e.into_inner());
                t.retain(|h| !h.is_finished());
                t.push(h);
            }
            Err(e) => {
                log::error!("QMP socket: cannot start a client thread: {e}");
                mon.clients().retain(|c| c.id != client.id);
            }
        }
    }
}

/// Tell a client over the limit why, if its socket takes it at once.
fn refuse(stream: UnixStream, max_clients: usize) {
    let err = QmpError::generic(format!(
        "too many control clients (at most {max_clients}); try again later"
    ));
    let mut text = qmp::response(Err(err), None).to_string();
    text.push('\n');
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(text.as_bytes());
    }
}

fn serve_client(mon: Arc<Monitor>, client: Arc<Client>, stream: UnixStream) {
    log::info!("QMP client {} connected", client.id);
    client.send(&qmp::greeting());
    let mut splitter = Splitter::default();
    let mut sections = Sections::default();
    let mut pieces = Vec::new();
    client.serve(&stream, |bytes| {
        splitter.feed(bytes, &mut pieces);
        for piece in pieces.drain(..) {
            match piece {
                Piece::Text(t) => handle_text(&mon, &client, &mut sections, &t),
                Piece::Garbage(g) => client.send(&qmp::response(
                    Err(QmpError::generic(format!(
                        "JSON parse error, invalid keyword '{g}'"
                    ))),
                    None,
                )),
                Piece::TooLong => {
                    client.send(&qmp::response(
                        Err(QmpError::generic("JSON parse error, message too long")),
                        None,
                    ));
                    return false;
                }
            }
        }
        true
    });
    // No graph lock: ending a section never waits, and must not wait
    // behind another client's graph change.
    sections.end_all();
    mon.clients().retain(|c| c.id != client.id);
    log::info!("QMP client {} disconnected", client.id);
}

fn handle_text(mon: &Arc<Monitor>, client: &Client, sections: &mut Sections, text: &[u8]) {
    let (reply, quit) = respond(mon, &client.negotiated, sections, text, client.id);
    client.send_text(reply);
    if quit {
        mon.request_shutdown();
    }
}

/// The reply to one JSON text from a client, and whether it was a
/// successful `quit` (the caller starts the shutdown once the reply is
/// out). No socket involved, so the fuzzer drives this directly.
pub(crate) fn respond(
    mon: &Arc<Monitor>,
    negotiated: &AtomicBool,
    sections: &mut Sections,
    text: &[u8],
    client_id: u64,
) -> (String, bool) {
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            let err = QmpError::generic(format!("JSON parse error, {e}"));
            return (qmp::reply_text(Err(err), None), false);
        }
    };
    let req = match qmp::parse_request(value) {
        Ok(r) => r,
        Err((err, id)) => return (qmp::reply_text(Err(err), id), false),
    };
    let result = if !negotiated.load(Ordering::SeqCst) {
        if req.execute == "qmp_capabilities" {
            negotiate(Args::new(req.arguments))
                .inspect(|_| negotiated.store(true, Ordering::SeqCst))
                .map(qmp::Return::Value)
        } else {
            Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        }
    } else {
        let _g = commands::holds_graph_lock(&req.execute).then(|| mon.state.graph().lock());
        log::debug!("QMP client {client_id}: {}", req.execute);
        commands::execute(mon, sections, &req.execute, Args::new(req.arguments))
    };
    let quit = result.is_ok() && req.execute == "quit";
    (qmp::reply_text(result, req.id), quit)
}

/// `qmp_capabilities`: we offer no optional capabilities.
fn negotiate(mut args: Args) -> qmp::CmdResult {
    if let Some(caps) = args.take("enable") {
        match caps {
            Value::Array(a) if a.is_empty() => {}
            Value::Array(a) => {
                return Err(QmpError::generic(format!(
                    "Capability '{}' not available",
                    a[0].as_str().unwrap_or("?")
                )))
            }
            _ => {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'enable', expected: array",
                ))
            }
        }
    }
    args.finish()?;
    Ok(json!({}))
}

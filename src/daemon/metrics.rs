//! `--metrics ADDR`: Prometheus text at `/metrics` over HTTP, on TCP
//! (`127.0.0.1:9100`) or a Unix socket (`unix:PATH`).
//!
//! The figures are the ones the daemon keeps anyway (per-queue request
//! statistics, in-flight counters, the iothreads' loop times, throttle and
//! job state), read when a scrape comes: nothing is added to the request
//! path. The HTTP side is a few lines of our own rather than a server
//! crate: one GET of one path, answered by one thread, one connection at a
//! time; a client gets 8 KiB and 2 s to send its request, and 2 s to take
//! the answer, so a hostile local process can delay scrapes by seconds,
//! not hold the thread or our memory.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use crate::error::Error;
use crate::formats::BlockIo;
use crate::graph::Node;
use crate::os::listen::{bind_listener, SocketFile};
use crate::os::ratelimit::LogLimiter;
use crate::os::wait::{wait_for, Wake};
use crate::state::DaemonState;
use crate::vhost::blk::export::BlkExport;
use crate::vhost::blk::stats::{OpSnapshot, StatsSnapshot};

/// The largest request we read, headers included.
const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// A Unix metrics socket may be read by the daemon's group (a local
/// Prometheus agent), not by everyone.
const SOCKET_MODE: u32 = 0o660;

/// Where metrics are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = Error;

    /// `HOST:PORT` (an IP address) or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, Error> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::invalid("--metrics unix: needs a path"));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        s.parse().map(MetricsAddr::Tcp).map_err(|_| {
            Error::invalid(format!(
                "--metrics takes IP:PORT (127.0.0.1:9100) or unix:PATH, not '{s}'"
            ))
        })
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept()?.0),
            Listener::Unix(l) => Box::new(l.accept()?.0),
        })
    }
}

trait Conn: Read + Write {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// The metrics endpoint; stops when dropped.
pub struct MetricsServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: &MetricsAddr, state: Arc<DaemonState>) -> Result<Self, Error> {
        let ctx = |e: io::Error| Error::from(e).context(format!("--metrics {addr:?}"));
        let (listener, file) = match addr {
            MetricsAddr::Tcp(a) => (Listener::Tcp(TcpListener::bind(a).map_err(ctx)?), None),
            MetricsAddr::Unix(p) => {
                let (l, file) = bind_listener(p, SOCKET_MODE).map_err(ctx)?;
                (Listener::Unix(l), Some(file))
            }
        };
        let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(ctx)?;
        let stop_fd = stop.try_clone().map_err(ctx)?;
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                // The socket file is removed when the server thread ends.
                let _file: Option<SocketFile> = file;
                serve(listener, stop_fd, state)
            })
            .map_err(ctx)?;
        log::info!("metrics on {addr:?} (/metrics)");
        Ok(MetricsServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: Listener, stop: EventFd, state: Arc<DaemonState>) {
    let log = LogLimiter::default();
    loop {
        match wait_for(listener.fd(), stop.as_raw_fd()) {
            Ok(Wake::Ready) => {}
            Ok(Wake::Stop) => return,
            Err(e) => {
                log::error!("metrics: poll failed: {e}");
                return;
            }
        }
        let result = listener.accept().and_then(|mut c| {
            c.set_timeouts(CLIENT_TIMEOUT)?;
            answer(&mut *c, &state)
        });
        if let Err(e) = result {
            if log.allow("metrics client") {
                log::warn!("metrics: a client failed: {e}");
            }
        }
    }
}

/// Read one request (up to the blank line) and answer it.
fn answer(c: &mut dyn Conn, state: &DaemonState) -> io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST {
            return respond(c, "431 Request Header Fields Too Large", "text/plain", "");
        }
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\r').next().unwrap_or(&[]);
    let mut words = line.split(|b| *b == b' ');
    let (method, path) = (words.next(), words.next());
    match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => respond(
            c,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(state),
        ),
        (Some(b"GET"), _) => respond(c, "404 Not Found", "text/plain", "try /metrics\n"),
        _ => respond(c, "405 Method Not Allowed", "text/plain", ""),
    }
}

fn respond(c: &mut dyn Conn, status: &str, kind: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    c.flush()
}

/// Prometheus text: one family at a time, HELP and TYPE first.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// An iothread's CPU time (user + system) from /proc, read at scrape time.
fn thread_cpu_seconds(tid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

pub(crate) fn render(state: &DaemonState) -> String {
    let mut t = Text(String::new());
    exports(&mut t, state);
    iothreads(&mut t, state);
    nodes(&mut t, state);
    jobs(&mut t, state);
    t.0
}

/// A metric family read from a `T`: name, help, and the reading.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

fn exports(t: &mut Text, state: &DaemonState) {
    let exports = state.exports().list();
    let per_queue: Vec<_> = exports
        .iter()
        .map(|e| {
            let snaps: Vec<_> = e.state.stats.iter().map(|s| s.snapshot()).collect();
            (e, snaps)
        })
        .collect();
    let counters: [Family<OpSnapshot>; 3] = [
        (
            "ringblk_export_requests_total",
            "Requests completed, by export, queue and kind.",
            |o| o.operations,
        ),
        (
            "ringblk_export_bytes_total",
            "Bytes of completed requests, by export, queue and kind.",
            |o| o.bytes,
        ),
        (
            "ringblk_export_failed_requests_total",
            "Requests that completed with an error, by export, queue and kind.",
            |o| o.failed,
        ),
    ];
    for (name, help, get) in counters {
        t.family(name, "counter", help);
        for (e, snaps) in &per_queue {
            for (q, s) in snaps.iter().enumerate() {
                let q = q.to_string();
                for (op, o) in &s.by_kind {
                    t.sample(
                        name,
                        &[("export", &e.id), ("queue", &q), ("op", op)],
                        get(o),
                    );
                }
            }
        }
    }
    t.family(
        "ringblk_export_invalid_requests_total",
        "counter",
        "Requests refused before reaching the disk (malformed, out of range).",
    );
    for (e, snaps) in &per_queue {
        for (q, s) in snaps.iter().enumerate() {
            let q = q.to_string();
            t.sample(
                "ringblk_export_invalid_requests_total",
                &[("export", &e.id), ("queue", &q)],
                s.invalid,
            );
        }
    }
    let name = "ringblk_export_request_duration_seconds";
    t.family(
        name,
        "histogram",
        "Time from a request's arrival to its completion, by export and kind.",
    );
    for (e, snaps) in &per_queue {
        let total = StatsSnapshot::sum(snaps);
        for (op, o) in &total.by_kind {
            let mut cumulative = 0;
            let last = o.histogram.len().saturating_sub(1);
            for (i, n) in o.histogram.iter().enumerate() {
                cumulative += n;
                // Bucket i holds requests under 2^i µs; the last is open.
                if i < last {
                    let le = format!("{}", (1u64 << i) as f64 / 1e6);
                    t.sample(
                        &format!("{name}_bucket"),
                        &[("export", &e.id), ("op", op), ("le", &le)],
                        cumulative,
                    );
                }
            }
            t.sample(
                &format!("{name}_bucket"),
                &[("export", &e.id), ("op", op), ("le", "+Inf")],
                cumulative,
            );
            t.sample(
                &format!("{name}_sum"),
                &[("export", &e.id), ("op", op)],
                secs(o.total_time_ns),
            );
            t.sample(
                &format!("{name}_count"),
                &[("export", &e.id), ("op", op)],
                cumulative,
            );
        }
    }
    let gauges: [Family<BlkExport>; 3] = [
        (
            "ringblk_export_in_flight",
            "Requests the guest submitted that have not completed.",
            |e| e.state.in_flight(),
        ),
        (
            "ringblk_export_drained",
            "1 while a drained section holds the export's queues.",
            |e| e.state.is_quiesced() as u64,
        ),
        (
            "ringblk_export_connected",
            "1 while a frontend is connected.",
            |e| e.is_connected() as u64,
        ),
    ];
    for (name, help, get) in gauges {
        t.family(name, "gauge", help);
        for e in &exports {
            t.sample(name, &[("export", &e.id)], get(e));
        }
    }
}

fn iothreads(t: &mut Text, state: &DaemonState) {
    let threads = state.iothreads();
    t.family(
        "ringblk_iothread_cpu_seconds_total",
        "counter",
        "CPU time (user and system) of each iothread.",
    );
    for th in &threads {
        if let Some(s) = thread_cpu_seconds(th.thread_id()) {
            t.sample(
                "ringblk_iothread_cpu_seconds_total",
                &[("iothread", th.name())],
                s,
            );
        }
    }
    t.family(
        "ringblk_iothread_polling_seconds_total",
        "counter",
        "Time each iothread spent busy-polling for work.",
    );
    for th in &threads {
        t.sample(
            "ringblk_iothread_polling_seconds_total",
            &[("iothread", th.name())],
            th.times().polled().as_secs_f64(),
        );
    }
    t.family(
        "ringblk_iothread_sleeping_seconds_total",
        "counter",
        "Time each iothread spent asleep, waiting for work.",
    );
    for th in &threads {
        t.sample(
            "ringblk_iothread_sleeping_seconds_total",
            &[("iothread", th.name())],
            th.times().slept().as_secs_f64(),
        );
    }
}

fn nodes(t: &mut Text, state: &DaemonState) {
    let nodes = state.graph().all_nodes();
    let mut sorted: Vec<_> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name().cmp(b.name()));
    t.family(
        "ringblk_node_requests_total",
        "counter",
        "Requests started on each node since it was opened.",
    );
    for n in &sorted {
        t.sample(
            "ringblk_node_requests_total",
            &[("node", n.name()), ("driver", n.driver_name())],
            n.requests(),
        );
    }
    let gauges: [Family<Node>; 3] = [
        (
            "ringblk_node_in_flight",
            "Requests inside each node right now.",
            |n| n.in_flight(),
        ),
        (
            "ringblk_node_size_bytes",
            "Each node's virtual size.",
            |n| n.size(),
        ),
        (
            "ringblk_node_drained",
            "Drained sections covering each node.",
            |n| n.quiesce_counter() as u64,
        ),
    ];
    for (name, help, get) in gauges {
        t.family(name, "gauge", help);
        for n in &sorted {
            t.sample(name, &[("node", n.name())], get(n));
        }
    }
    // The throttle filters' own figures, from their query members.
    let throttled: Vec<_> = sorted
        .iter()
        .filter_map(|n| {
            let info = n.driver_info();
            let group = info.get("x-throttle-group")?.as_str()?.to_string();
            Some((n.name(), group, info))
        })
        .collect();
    for (name, kind, help, member, scale) in [
        (
            "ringblk_throttle_queued_requests",
            "gauge",
            "Requests waiting in each throttle filter's queue.",
            "x-throttle-queued",
            1.0,
        ),
        (
            "ringblk_throttle_delayed_requests_total",
            "counter",
            "Requests each throttle filter made wait.",
            "x-throttled-requests",
            1.0,
        ),
        (
            "ringblk_throttle_wait_seconds_total",
            "counter",
            "Time requests waited in each throttle filter, summed.",
            "x-throttled-ns",
            1e-9,
        ),
    ] {
        t.family(name, kind, help);
        for (node, group, info) in &throttled {
            let v = info.get(member).and_then(Value::as_u64).unwrap_or(0);
            t.sample(name, &[("node", node), ("group", group)], v as f64 * scale);
        }
    }
}

fn jobs(t: &mut Text, state: &DaemonState) {
    let jobs = state.graph().jobs().query_jobs();
    let list = jobs.as_array().cloned().unwrap_or_default();
    for (name, key, help) in [
        (
            "ringblk_job_progress_current",
            "current-progress",
            "Work a job has done, in its own units (bytes for commit).",
        ),
        (
            "ringblk_job_progress_total",
            "total-progress",
            "Work a job has to do in all, as far as it knows.",
        ),
    ] {
        t.family(name, "gauge", help);
        for j in &list {
            let id = j["id"].as_str().unwrap_or("");
            let kind = j["type"].as_str().unwrap_or("");
            let status = j["status"].as_str().unwrap_or("");
            t.sample(
                name,
                &[("job", id), ("type", kind), ("status", status)],
                j[key].as_u64().unwrap_or(0),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "127.0.0.1:9100".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/m.sock".into())
        );
        assert!("localhost".parse::<MetricsAddr>().is_err());
        assert!("unix:".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn label_values_are_escaped() {
        let mut t = Text(String::new());
        t.sample("m", &[("export", "a\"b\\c\nd")], 1);
        assert_eq!(t.0, "m{export=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn an_empty_daemon_renders_every_family_once() {
        let state = DaemonState::new();
        let text = render(&state);
        for family in [
            "ringblk_export_requests_total",
            "ringblk_iothread_cpu_seconds_total",
            "ringblk_node_requests_total",
            "ringblk_throttle_queued_requests",
            "ringblk_job_progress_current",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family}"
            );
        }
    }
}

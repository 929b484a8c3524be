//! Control clients cannot stall guests or the daemon: clients that never
//! read their socket, and floods of connections past the fd limit.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// user + system CPU time of process `pid`.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / hz)
}

/// A client that negotiates and then never reads again.
fn deaf_client(path: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    s
}

/// Writes on a guest queue run while three clients that never read sit on
/// the control socket and a fourth runs thousands of drained sections (two
/// events each, to every client). No drain and no guest write waits on
/// the deaf clients; once their unread backlog passes the bound, the
/// daemon disconnects them.
#[test]
fn clients_that_never_read_stall_nobody() {
    let dir = TestDir::new("deaf-clients");
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let d = Daemon::with_control(&dir, &img, &["--format", "raw"]);
    let qmp_path = dir.path("qmp");
    let mut active = Qmp::connect(&qmp_path);
    let mut c = connect(&d.sock, 1).unwrap();
    // Every thread the daemon runs for these two clients is up now.
    let base = fds_and_threads(d.pid());
    let deaf: Vec<UnixStream> = (0..3).map(|_| deaf_client(&qmp_path)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                assert_eq!(c.run(0, Req::Write((n % 1024) * 4096, 0, 4096)), 0);
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        })
    };
    let mut worst_drain = Duration::ZERO;
    let started = Instant::now();
    for _ in 0..8000 {
        let t = Instant::now();
        active.ok("block-drained-begin", json!({"export": "vda"}));
        active.ok("block-drained-end", json!({"export": "vda"}));
        worst_drain = worst_drain.max(t.elapsed());
        active.events.clear();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (worst_write, writes) = writer.join().unwrap();
    eprintln!(
        "8000 drain cycles in {elapsed:?}; worst cycle {worst_drain:?}; {writes} guest writes, worst {worst_write:?}"
    );
    assert!(writes > 0);
    assert!(
        worst_drain < Duration::from_secs(2),
        "a drain cycle took {worst_drain:?}"
    );
    assert!(
        worst_write < Duration::from_secs(2),
        "the guest stalled for {worst_write:?}"
    );
    // 16,000 events of ~130 bytes are past the 1 MiB bound: every deaf
    // client was cut off (its socket reaches end of file once drained).
    for (i, mut s) in deaf.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut sink = Vec::new();
        s.read_to_end(&mut sink)
            .unwrap_or_else(|e| panic!("deaf client {i} was not disconnected: {e}"));
    }
    assert!(d.log_shows("unread; disconnecting it"), "{}", d.stderr());
    // The active client carries on.
    active.ok("query-block-exports", json!({}));
    drop(active);
    assert_nothing_leaked(d.pid(), base);
    assert!(d.stop().success());
}

/// 1,100 connections to the control socket of a daemon limited to 128
/// fds: the daemon neither spins nor floods its log, the guest's I/O goes
/// on, and once the flood ends new clients are served.
#[test]
fn connection_flood_is_survived() {
    let dir = TestDir::new("flood");
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let qmp_path = dir.path("qmp");
    let d = Daemon::start_with_nofile(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--format",
            "raw",
            "--control",
            qmp_path.to_str().unwrap(),
            "--control-max-clients",
            "1024",
        ],
        128,
    );
    let mut c = connect(&d.sock, 1).unwrap();
    let base = fds_and_threads(d.pid());
    // Our own fd limit must hold the flood.
    let lim = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: 4096,
    };
    // SAFETY: setrlimit with a valid struct; raising the soft limit only.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let flood: Vec<UnixStream> = (0..1100)
        .filter_map(|_| UnixStream::connect(&qmp_path).ok())
        .collect();
    assert!(flood.len() > 200, "only {} connections made", flood.len());
    // The daemon's fds are gone; it must wait, not spin: over 2 s with
    // nothing else to do, it uses next to no CPU (a spinning accept loop
    // would use all 2 s) and logs a few lines, not megabytes.
    let cpu_before = cpu_time(d.pid());
    let log_before = d.stderr().len();
    let idle = Instant::now();
    let mut quiet = Duration::ZERO;
    while quiet < Duration::from_secs(2) {
        // Time, not synchronisation: this is the interval being measured.
        std::thread::sleep(Duration::from_secs(2) - quiet);
        quiet = idle.elapsed();
    }
    let cpu = cpu_time(d.pid()) - cpu_before;
    let logged = d.stderr().len() - log_before;
    eprintln!("flood: daemon CPU {cpu:?} over {quiet:?}; {logged} bytes of log");
    assert!(
        cpu < Duration::from_millis(300),
        "daemon CPU {cpu:?} in {quiet:?}"
    );
    assert!(logged < 16 * 1024, "{logged} bytes of log in {quiet:?}");
    // The guest's queue is served meanwhile.
    for i in 0..1000 {
        assert_eq!(c.run(0, Req::Write(i * 4096, 0, 4096)), 0);
    }
    drop(flood);
    // Served again once fds are free (the accept loop's backoff is 1 s at most).
    let mut q = poll_for(
        Duration::from_secs(30),
        "no greeting after the flood",
        || {
            let s = UnixStream::connect(&qmp_path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut first = [0u8; 16];
            match (&s).read(&mut first) {
                Ok(n) if n > 0 && first[..n].starts_with(b"{\"QMP\"") => {
                    drop(s);
                    Some(Qmp::connect(&qmp_path))
                }
                _ => None,
            }
        },
    );
    q.ok("query-block-exports", json!({}));
    drop(q);
    drop(c);
    assert_nothing_leaked(d.pid(), base);
    assert!(d.stop().success());
}

/// Past --control-max-clients, new clients get an error and are closed;
/// the connected ones are unaffected.
#[test]
fn clients_past_the_limit_are_refused_with_an_error() {
    let dir = TestDir::new("max-clients");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let d = Daemon::with_control(&dir, &img, &["--control-max-clients", "2"]);
    let qmp_path = dir.path("qmp");
    let mut a = Qmp::connect(&qmp_path);
    let _b = Qmp::connect(&qmp_path);
    let mut extra = UnixStream::connect(&qmp_path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = String::new();
    extra.read_to_string(&mut reply).unwrap();
    assert!(
        reply.contains("too many control clients (at most 2)"),
        "{reply}"
    );
    a.ok("query-block-exports", json!({}));
    assert!(d.stop().success());
}

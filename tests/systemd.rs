//! Under systemd (`Type=notify`): the test owns the datagram socket
//! `NOTIFY_SOCKET` names, as systemd would, and reads what the daemon
//! tells it.

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::qsd::QsdArgs;
use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The next notification, within `limit`.
fn next(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Notifications until one contains `want`, which is returned.
fn until(sock: &UnixDatagram, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next(sock, left.max(Duration::from_millis(1))) {
            Some(m) if m.lines().any(|l| l == want) => return m,
            Some(_) => continue,
            None => panic!("no {want} from the daemon within 30 s"),
        }
    }
}

fn assert_accepts(path: &Path) {
    if let Err(e) = UnixStream::connect(path) {
        panic!(
            "READY=1 came before {} accepted a connection: {e}",
            path.display()
        );
    }
}

#[test]
fn serve_says_ready_once_its_sockets_accept_pings_the_watchdog_and_says_stopping() {
    let dir = TestDir::new("systemd-serve");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let notify_path = dir.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let sock = dir.path("sock");
    let qmp = dir.path("qmp");
    let d = Daemon::start_qsd(
        &sock,
        &[
            "serve",
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--format",
            "raw",
            "--control",
            qmp.to_str().unwrap(),
        ],
        |c| {
            c.env("NOTIFY_SOCKET", &notify_path)
                .env("WATCHDOG_USEC", "200000");
        },
    );
    let ready = until(&notify, "READY=1");
    assert_accepts(&sock);
    assert_accepts(&qmp);
    assert!(
        ready.contains("STATUS=serving 1 export(s): vda"),
        "{ready:?}"
    );
    // Pings every 100 ms (half of WATCHDOG_USEC): two in a row.
    until(&notify, "WATCHDOG=1");
    until(&notify, "WATCHDOG=1");
    // An export added or deleted over QMP: STATUS= says so.
    let mut q = Qmp::connect(&qmp);
    let sock2 = dir.path("sock2");
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n1", "size": MIB}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "vdb", "node-name": "n1",
               "addr": {"type": "unix", "path": sock2.to_str().unwrap()}}),
    );
    until(&notify, "STATUS=serving 2 export(s): vda, vdb");
    q.ok("block-export-del", json!({"id": "vdb"}));
    until(&notify, "STATUS=serving 1 export(s): vda");
    drop(q);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    until(&notify, "STOPPING=1");
    assert!(d.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn the_qsd_form_says_ready_once_every_export_and_the_monitor_accept() {
    let dir = TestDir::new("systemd-qsd");
    let (a, b) = (dir.path("a.raw"), dir.path("b.raw"));
    make_raw(&a, 16 * MIB);
    make_raw(&b, 16 * MIB);
    let notify_path = dir.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let (sa, sb, qmp) = (dir.path("a.sock"), dir.path("b.sock"), dir.path("qmp"));
    let args = QsdArgs::new()
        .iothread("io0")
        .file_node("fa", &a)
        .file_node("fb", &b)
        .vhost_export("ea", "fa", &sa, "iothread=io0")
        .vhost_export("eb", "fb", &sb, "")
        .monitor("m", &qmp);
    let d = Daemon::start_qsd(&sa, &args.build(), |c| {
        c.env("NOTIFY_SOCKET", &notify_path);
    });
    let ready = until(&notify, "READY=1");
    for p in [&sa, &sb, &qmp] {
        assert_accepts(p);
    }
    assert!(
        ready.contains("STATUS=serving 2 export(s): ea, eb"),
        "{ready:?}"
    );
    // No watchdog asked for: none sent.
    assert_eq!(next(&notify, Duration::from_millis(300)), None);
    assert!(d.stop().success());
    assert_eq!(
        next(&notify, Duration::from_secs(10)).as_deref(),
        Some("STOPPING=1")
    );
}

/// One thread of another process, stopped with ptrace until dropped: the
/// rest of that process runs on, as when one thread hangs in the kernel.
struct StoppedThread(libc::pid_t);

impl StoppedThread {
    fn stop(tid: libc::pid_t) -> StoppedThread {
        // SAFETY: ptrace(2) and waitpid(2) on a thread of our child; no
        // memory of ours is handed over.
        unsafe {
            let seized = libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0);
            assert_eq!(
                seized,
                0,
                "PTRACE_SEIZE {tid}: {}",
                std::io::Error::last_os_error()
            );
            let interrupted = libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
            assert_eq!(
                interrupted,
                0,
                "PTRACE_INTERRUPT: {}",
                std::io::Error::last_os_error()
            );
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: as in `stop`; the thread is in a ptrace stop.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// The thread of process `pid` called `name`.
fn thread_named(pid: i32, name: &str) -> libc::pid_t {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for t in tasks {
        let t = t.unwrap();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            return t.file_name().to_str().unwrap().parse().unwrap();
        }
    }
    panic!("process {pid} has no thread {name}");
}

/// Notifications already queued are dropped.
fn drain(sock: &UnixDatagram) {
    while next(sock, Duration::from_millis(1)).is_some() {}
}

/// An iothread that stops turning its loop (here: stopped by ptrace, the
/// rest of the daemon running on) stops the watchdog pings, also one that
/// `object-add` started after READY=1; once it runs again, so do the pings.
#[test]
fn a_stuck_iothread_even_one_added_later_withholds_the_watchdog_ping() {
    let dir = TestDir::new("systemd-watchdog");
    let notify_path = dir.path("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let (sock, qmp) = (dir.path("sock"), dir.path("qmp"));
    let args = QsdArgs::new()
        .iothread("io0")
        .blockdev("driver=null-co,node-name=n0,size=1048576")
        .vhost_export("e0", "n0", &sock, "iothread=io0")
        .monitor("m", &qmp);
    let d = Daemon::start_qsd(&sock, &args.build(), |c| {
        c.env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000");
    });
    until(&notify, "READY=1");
    until(&notify, "WATCHDOG=1");
    let mut q = Qmp::connect(&qmp);
    q.ok("object-add", json!({"qom-type": "iothread", "id": "io1"}));
    let io1 = thread_named(d.pid(), "io1");
    until(&notify, "WATCHDOG=1");

    let stopped = StoppedThread::stop(io1);
    assert!(
        d.log_shows_within("iothread(s) io1 did not respond", Duration::from_secs(10)),
        "{}",
        d.stderr()
    );
    drain(&notify);
    // Five periods without a ping: systemd's timer would run out.
    assert_eq!(next(&notify, Duration::from_millis(500)), None);
    // The rest of the daemon still answers.
    q.ok("query-iothreads", json!({}));

    drop(stopped);
    until(&notify, "WATCHDOG=1");
    until(&notify, "WATCHDOG=1");
    drop(q);
    assert!(d.stop().success());
}

/// With `JOURNAL_STREAM` naming its stderr, as systemd sets it, the daemon
/// logs priority prefixes and no timestamps; with it naming another
/// stream (a child that inherited the variable), as before.
#[test]
fn logs_carry_syslog_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    use std::process::{Command, Stdio};
    let dir = TestDir::new("systemd-journal");
    for journal in [true, false] {
        let log = dir.path("stderr.log");
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let sock = dir.path("sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringblk"))
            .args(["serve", "--socket", sock.to_str().unwrap(), "--null", "1M"])
            .env("JOURNAL_STREAM", &stream)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        poll_until(Duration::from_secs(30), "the export's socket", || {
            sock.exists()
        });
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
        let text = std::fs::read_to_string(&log).unwrap();
        let shutdown = text
            .lines()
            .find(|l| l.contains("shut down cleanly"))
            .unwrap_or_else(|| panic!("no shutdown line in {text:?}"));
        if journal {
            assert!(
                shutdown.starts_with("<6>"),
                "an info line, priority 6, no timestamp: {shutdown:?}"
            );
            assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
        } else {
            assert!(
                shutdown.starts_with('['),
                "env_logger's own format: {shutdown:?}"
            );
        }
        std::fs::remove_file(&sock).ok();
    }
}

/// Started by `systemd-socket-activate`, which binds the socket, waits for
/// the first client and only then starts ringblk with the socket as fd 3:
/// that client is served on the passed socket, in both command-line forms
/// (the QSD form finds it by its name).
#[test]
fn socket_activation_serves_the_client_that_started_the_daemon() {
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_ringblk");
    let dir = TestDir::new("systemd-activate");
    for qsd in [false, true] {
        let sock = dir.path(if qsd { "qsd.sock" } else { "serve.sock" });
        let s = sock.to_str().unwrap();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["-l", s]);
        if qsd {
            cmd.args([
                "--fdname=vda",
                bin,
                "--blockdev",
                "driver=null-co,node-name=n0,size=16M,read-zeroes=on",
                "--export",
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=fd,addr.str=vda,writable=on",
            ]);
        } else {
            cmd.args([bin, "serve", "--socket", s, "--null", "16M"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("systemd-socket-activate (Debian's systemd package)");
        // The socket file appears at bind(), a moment before
        // systemd-socket-activate listens: until then a connect is refused.
        let mut c = poll_for(
            Duration::from_secs(30),
            "a client on the passed socket",
            || connect(&sock, 1).ok(),
        );
        c.buf()[..4096].fill(0x5a);
        assert_eq!(c.run(0, Req::Write(8192, 0, 4096)), 0);
        c.buf()[..4096].fill(0);
        assert_eq!(c.run(0, Req::Read(8192, 0, 4096)), 0);
        drop(c);
        // SAFETY: kill(2) on our child (systemd-socket-activate exec'd
        // ringblk in its place).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "qsd form {qsd}: {log}");
        assert!(log.contains("shut down cleanly"), "{log}");
    }
}

//! One qemu-storage-daemon command line, run by ringblk or by
//! qemu-storage-daemon itself: tests of QEMU's QMP semantics are written
//! once and run against both (QSD is the reference the test is validated
//! against).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::qsd::QsdArgs;
use super::{connect, exit_within, wait_ready, Client, Daemon};

/// Which daemon runs the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    Ringblk,
    Qsd,
}

/// A running daemon of either kind.
pub struct Storage {
    pub which: Impl,
    ringblk: Option<Daemon>,
    qsd: Option<Child>,
    log: PathBuf,
}

impl Storage {
    /// Start `which` with `args` plus `--pidfile DIR/daemon.pid`; returns
    /// once the daemon has set everything up (ringblk: its "listening"
    /// line; QSD: its pid file, written after the exports are up).
    /// `sock` is one export's socket.
    pub fn start(which: Impl, dir: &Path, args: &QsdArgs, sock: &Path) -> Storage {
        let pidfile = dir.join("daemon.pid");
        let _ = std::fs::remove_file(&pidfile);
        let argv = args.clone().pidfile(&pidfile).build();
        let log = dir.join(format!("daemon-{}.log", std::process::id()));
        match which {
            Impl::Ringblk => Storage {
                which,
                ringblk: Some(Daemon::start_qsd(sock, &argv, |_| {})),
                qsd: None,
                log,
            },
            Impl::Qsd => {
                let f = std::fs::File::create(&log).unwrap();
                let mut child = Command::new("qemu-storage-daemon")
                    .args(&argv)
                    .stdin(Stdio::null())
                    .stdout(f.try_clone().unwrap())
                    .stderr(f)
                    .spawn()
                    .expect("qemu-storage-daemon is required (scripts/test installs it)");
                // The pid file is written once every option has been processed.
                if let Err(e) = wait_ready(&mut child, Duration::from_secs(30), || {
                    pidfile.exists().then_some(())
                }) {
                    let _ = child.kill();
                    panic!(
                        "qemu-storage-daemon {e}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                Storage {
                    which,
                    ringblk: None,
                    qsd: Some(child),
                    log,
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        match (&self.ringblk, &self.qsd) {
            (Some(d), _) => d.pid(),
            (_, Some(c)) => c.id() as i32,
            _ => unreachable!(),
        }
    }

    /// What the daemon wrote (ringblk: stderr; QSD: stdout and stderr).
    pub fn log(&self) -> String {
        match &self.ringblk {
            Some(d) => d.stderr(),
            None => std::fs::read_to_string(&self.log).unwrap_or_default(),
        }
    }

    /// SIGTERM, and the exit status (bounded: a daemon that does not exit
    /// within 60 s is killed and the test fails).
    pub fn stop(mut self) -> ExitStatus {
        if let Some(d) = self.ringblk.take() {
            return d.stop();
        }
        let mut c = self.qsd.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        exit_within(&mut c, Duration::from_secs(60)).unwrap_or_else(|| {
            let _ = c.kill();
            panic!("qemu-storage-daemon did not exit within 60 s of SIGTERM");
        })
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill9(mut self) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if let Some(d) = self.ringblk.take() {
            let st = d.wait_exit(Duration::from_secs(30));
            assert!(!st.success(), "killed daemon reported success");
        }
        if let Some(mut c) = self.qsd.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(mut c) = self.qsd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// qemu-storage-daemon closed a connection it had just accepted: the
/// client sees ECONNRESET, or EPIPE if its next message was being written.
fn dropped_connection(e: &blkio::Error) -> bool {
    matches!(e.errno().raw_os_error(), libc::ECONNRESET | libc::EPIPE)
}

/// Run `connect` until it succeeds; with `reference` (the daemon is
/// qemu-storage-daemon, which now and then drops a new connection, see
/// [`dropped_connection`]) a dropped connection is retried a few times.
/// ringblk's connections are never retried.
pub fn connect_retrying(
    reference: bool,
    mut connect: impl FnMut() -> Result<Client, blkio::Error>,
) -> Result<Client, blkio::Error> {
    let mut tries = 0;
    loop {
        match connect() {
            Err(e) if reference && dropped_connection(&e) && tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Connect a libblkio client to an export of `which` (a dropped
/// qemu-storage-daemon connection retried, see [`connect_retrying`]).
pub fn connect_to(which: Impl, sock: &Path, queues: i32) -> Client {
    connect_retrying(which == Impl::Qsd, || connect(sock, queues))
        .unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()))
}

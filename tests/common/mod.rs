//! Test harness: a real ringblk process and a real vhost-user client
//! (libblkio), plus scratch directories.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod frontend;
pub mod guest;
pub mod qemu_img;
pub mod qmp;
pub mod qsd;
pub mod recorder;
pub mod storage;
pub mod systemd;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory on the work tree's filesystem (O_DIRECT works there),
/// removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        Self::under(env!("CARGO_TARGET_TMPDIR"), name)
    }

    /// A scratch directory on tmpfs (/dev/shm), where files live in memory.
    pub fn in_memory(name: &str) -> Self {
        Self::under("/dev/shm", name)
    }

    fn under(base: &str, name: &str) -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let p = PathBuf::from(base).join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Why a process being started never became ready (see [`wait_ready`]).
pub enum NotReady {
    Exited(ExitStatus),
    TimedOut(Duration),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Exited(st) => write!(f, "exited ({st}) before it was ready"),
            NotReady::TimedOut(t) => write!(f, "was not ready within {t:?}"),
        }
    }
}

/// Call `ready` until it gives a value, for at most `limit`, pausing
/// `pause` between calls (zero: only yield the CPU, for a moment a test
/// must not miss); None if it never gave one. The bounded waits below are
/// this; a test uses it directly where a wait runs at its own pace or
/// fails with what it last saw.
pub fn poll_every<T>(
    pause: Duration,
    limit: Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = ready() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        if pause.is_zero() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
        }
    }
}

/// Poll `ready` every 20 ms until it gives a value, for as long as `child`
/// runs and at most `timeout`: a process that is starting (a pid file it
/// writes once up, a socket it listens on).
pub fn wait_ready<T>(
    child: &mut Child,
    timeout: Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> Result<T, NotReady> {
    poll_every(Duration::from_millis(20), timeout, || match ready() {
        Some(v) => Some(Ok(v)),
        None => child
            .try_wait()
            .unwrap()
            .map(|st| Err(NotReady::Exited(st))),
    })
    .unwrap_or(Err(NotReady::TimedOut(timeout)))
}

/// Poll `ready` every millisecond until it gives a value, for at most
/// `limit`; panic saying `what` did not happen if it never does.
pub fn poll_for<T>(limit: Duration, what: &str, ready: impl FnMut() -> Option<T>) -> T {
    poll_every(Duration::from_millis(1), limit, ready)
        .unwrap_or_else(|| panic!("{what} (waited {limit:?})"))
}

/// Poll `done` every millisecond until it holds, for at most `limit`;
/// panic saying `what` did not happen if it never does. For conditions
/// nothing notifies us of (a log line, a ring index, a socket's queue).
pub fn poll_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    poll_for(limit, what, || done().then_some(()))
}

/// [`poll_until`] without the pauses (the CPU is only yielded): for a
/// moment the test acts on as soon as it comes (a kill while requests
/// are in flight).
pub fn spin_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    poll_every(Duration::ZERO, limit, || done().then_some(()))
        .unwrap_or_else(|| panic!("{what} (waited {limit:?})"))
}

/// The exit status of `child` once it exits by itself, polled every 20 ms
/// for at most `limit`; None if it still runs (for the caller to kill).
pub fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    poll_every(Duration::from_millis(20), limit, || {
        child.try_wait().unwrap()
    })
}

/// A sparse raw image of `size` bytes.
pub fn make_raw(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

pub struct Daemon {
    child: Option<Child>,
    pub sock: PathBuf,
    pub stdout: String,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// Start `ringblk serve --socket SOCK ARGS...` and wait until it says it
    /// is listening.
    pub fn start(sock: &Path, args: &[&str]) -> Daemon {
        Self::start_in(sock, args, None)
    }

    /// Serve `img` on two queues, each on its own iothread, plus `extra`:
    /// for tests whose point is work on two iothreads at once (on a 2-CPU
    /// machine `serve` would put both queues on one by default).
    pub fn start_two_iothreads(sock: &Path, img: &Path, extra: &[&str]) -> Daemon {
        let img = img.to_str().expect("image path is UTF-8");
        let mut args = vec!["--image", img, "--num-queues", "2", "--iothreads", "2"];
        args.extend_from_slice(extra);
        Self::start(sock, &args)
    }

    pub fn start_in(sock: &Path, args: &[&str], cwd: Option<&Path>) -> Daemon {
        Self::start_with(sock, args, |cmd| {
            if let Some(d) = cwd {
                cmd.current_dir(d);
            }
        })
    }

    /// Start with at most `nofile` open file descriptors (`ulimit -n`).
    pub fn start_with_nofile(sock: &Path, args: &[&str], nofile: u64) -> Daemon {
        use std::os::unix::process::CommandExt;
        Self::start_with(sock, args, |cmd| {
            // SAFETY: setrlimit is async-signal-safe; it runs in the child
            // between fork and exec and touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    fn start_with(sock: &Path, args: &[&str], configure: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringblk"));
        cmd.arg("serve").arg("--socket").arg(sock).args(args);
        configure(&mut cmd);
        Self::spawn(cmd, sock)
    }

    /// Start ringblk with qemu-storage-daemon's options (`--blockdev`,
    /// `--export`, ...); `sock` is one export's socket.
    pub fn start_qsd<S: AsRef<OsStr>>(
        sock: &Path,
        args: &[S],
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringblk"));
        cmd.args(args);
        configure(&mut cmd);
        Self::spawn(cmd, sock)
    }

    /// Start `cmd`, a command line that runs ringblk (through a wrapper,
    /// say), and wait until it listens on `sock`.
    pub fn start_command(cmd: Command, sock: &Path) -> Daemon {
        Self::spawn(cmd, sock)
    }

    fn spawn(cmd: Command, sock: &Path) -> Daemon {
        Self::try_spawn(cmd, sock).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::start`], or why the daemon exited before listening.
    pub fn try_start(sock: &Path, args: &[&str]) -> Result<Daemon, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringblk"));
        cmd.arg("serve").arg("--socket").arg(sock).args(args);
        Self::try_spawn(cmd, sock)
    }

    fn try_spawn(mut cmd: Command, sock: &Path) -> Result<Daemon, String> {
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringblk");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let s = String::from_utf8_lossy(&buf[..n]).to_string();
                eprint!("{s}");
                sink.lock().unwrap().push_str(&s);
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut stdout = String::new();
        loop {
            let mut line = String::new();
            let n = out.read_line(&mut line).unwrap();
            if n == 0 {
                let status = child.wait().unwrap();
                // The stderr pipe's reader may lag the exit: take it all.
                let _ = reader.join();
                return Err(format!(
                    "ringblk exited ({status}) before listening; stdout:\n{stdout}\nstderr:\n{}",
                    stderr.lock().unwrap()
                ));
            }
            stdout.push_str(&line);
            if line.starts_with("ringblk: listening on") {
                break;
            }
        }
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Ok(Daemon {
            child: Some(child),
            sock: sock.to_path_buf(),
            stdout,
            stderr,
        })
    }

    /// Serve `img` on `DIR/sock` with the control socket on `DIR/qmp`.
    pub fn with_control(dir: &TestDir, img: &Path, extra: &[&str]) -> Daemon {
        let ctl = dir.path("qmp");
        let mut args = vec![
            "--image",
            img.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::start(&dir.path("sock"), &args)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// True once the daemon's log contains `needle`; false if it does not
    /// within 10 s (the log is read from its pipe by another thread, so a
    /// line written just now may not have arrived yet).
    pub fn log_shows(&self, needle: &str) -> bool {
        self.log_shows_within(needle, Duration::from_secs(10))
    }

    /// [`Self::log_shows`], waiting at most `limit`.
    pub fn log_shows_within(&self, needle: &str, limit: Duration) -> bool {
        poll_every(Duration::from_millis(10), limit, || {
            self.stderr.lock().unwrap().contains(needle).then_some(())
        })
        .is_some()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Wait up to `limit` for the process to exit by itself.
    pub fn wait_exit(mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        exit_within(&mut child, limit).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("ringblk did not exit within {limit:?}");
        })
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn stop(self) -> ExitStatus {
        // SAFETY-free: kill(2) through libc on our child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(60))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A libblkio virtio-blk-vhost-user client with a shared buffer region.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

pub fn connect(sock: &Path, num_queues: i32) -> Result<Client, blkio::Error> {
    connect_with(sock, num_queues, 4 << 20)
}

pub fn connect_read_only(sock: &Path) -> Result<Client, blkio::Error> {
    open_client(sock, 1, 1 << 20, true)
}

pub fn connect_with(sock: &Path, num_queues: i32, buf_len: usize) -> Result<Client, blkio::Error> {
    open_client(sock, num_queues, buf_len, false)
}

fn open_client(
    sock: &Path,
    num_queues: i32,
    buf_len: usize,
    read_only: bool,
) -> Result<Client, blkio::Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", sock.to_str().unwrap())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    b.set_i32("num-queues", num_queues)?;
    let out = b.start()?;
    let region = b.alloc_mem_region(buf_len)?;
    b.map_mem_region(&region)?;
    Ok(Client {
        blkio: b,
        queues: out.queues,
        region,
    })
}

pub enum Req {
    Read(u64, usize, usize),  // offset, buffer offset, len
    Write(u64, usize, usize), // offset, buffer offset, len
    WriteFua(u64, usize, usize),
    Flush,
    Discard(u64, u64),
    WriteZeroes(u64, u64, ReqFlags),
}

impl Client {
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for the client's lifetime; tests use
        // it from one thread at a time.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// Submit one request on queue `q` and wait for it; returns `ret`.
    pub fn run(&mut self, q: usize, req: Req) -> i32 {
        submit(&mut self.queues[q], self.region.addr, req, 0);
        wait(&mut self.queues[q], 1)[0].ret
    }
}

pub fn submit(q: &mut Blkioq, base: usize, req: Req, ud: usize) {
    match req {
        Req::Read(off, b, len) => q.read(off, (base + b) as *mut u8, len, ud, ReqFlags::empty()),
        Req::Write(off, b, len) => {
            q.write(off, (base + b) as *const u8, len, ud, ReqFlags::empty())
        }
        Req::WriteFua(off, b, len) => q.write(off, (base + b) as *const u8, len, ud, ReqFlags::FUA),
        Req::Flush => q.flush(ud, ReqFlags::empty()),
        Req::Discard(off, len) => q.discard(off, len, ud, ReqFlags::empty()),
        Req::WriteZeroes(off, len, f) => q.write_zeroes(off, len, ud, f),
    }
}

/// Wait for exactly `n` completions.
pub fn wait(q: &mut Blkioq, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut c: Vec<_> = (0..n - out.len())
            .map(|_| std::mem::MaybeUninit::<Completion>::uninit())
            .collect();
        let got = q.do_io(&mut c, 1, None, None).unwrap();
        for x in &c[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            out.push(unsafe { x.assume_init_read() });
        }
    }
    out
}

/// Wait up to `limit` for one completion; None if none came (for clients
/// whose daemon may have died: libblkio would wait forever).
pub fn wait_one_for(q: &mut Blkioq, limit: std::time::Duration) -> Option<Completion> {
    let mut c = [std::mem::MaybeUninit::<Completion>::uninit()];
    let mut t = limit;
    match q.do_io(&mut c, 1, Some(&mut t), None) {
        // SAFETY: do_io initialised the entry it reported.
        Ok(1) => Some(unsafe { c[0].assume_init_read() }),
        _ => None,
    }
}

/// Deterministic pattern for block `blk` written in round `round`.
pub fn pattern(buf: &mut [u8], blk: u64, round: u64) {
    let mut x =
        blk.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Names of the threads of process `pid`.
pub fn thread_names(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Open fds and threads of process `pid`; io_uring's own workers
/// (iou-wrk-*), which the kernel starts and retires, are not ours.
pub fn fds_and_threads(pid: i32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let threads = thread_names(pid)
        .iter()
        .filter(|n| !n.starts_with("iou-wrk"))
        .count();
    (fds, threads)
}

/// Wait (bounded: client threads and queue fds go a moment after their
/// connection) until `pid` is back to at most `base` fds and threads.
pub fn assert_nothing_leaked(pid: i32, base: (usize, usize)) {
    let mut now = (0, 0);
    let settled = poll_every(Duration::from_millis(20), Duration::from_secs(10), || {
        now = fds_and_threads(pid);
        (now.0 <= base.0 && now.1 <= base.1).then_some(())
    });
    assert!(
        settled.is_some(),
        "fds and threads {now:?}, at the start {base:?}; threads {:?}",
        thread_names(pid)
    );
}

/// Run `ringblk ARGS` expecting it to refuse to start (bounded: one that
/// starts anyway is killed and the test fails); its stderr.
pub fn ringblk_refuses(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = exit_within(&mut child, Duration::from_secs(20)) else {
        let _ = child.kill();
        panic!("ringblk {args:?} started although it should have been refused");
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success(), "ringblk {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

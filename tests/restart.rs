//! The daemon dies (SIGKILL) or leaves for an upgrade (SIGUSR1) with
//! requests in flight; a new daemon on the same socket, given the inflight
//! region back (SET_INFLIGHT_FD) and the same rings, runs exactly the
//! requests that had no used entry. The raw frontend behaves as QEMU does
//! on reconnect: same memory, same region, vring base = the used index.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frontend::*;
use common::qemu_img::{check, flatten, qemu_img};
use common::systemd::FakeSystemd;
use common::*;
use vhost::vhost_user::message::{FrontendReq as R, VhostUserProtocolFeatures};

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 256;
/// Chains per round: three descriptors each, so 85 fit in the table.
const CHAINS: u16 = 64;
/// Daemon restarts in one guest run (tests/guest/fio-restart.sh runs long
/// enough for them).
const RESTARTS: u64 = 5;
const REQ_LEN: u32 = 128 * 1024;
/// Guest memory: rings below DATA_BASE, then headers, status bytes, data.
const HDRS: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 16 * CHAINS as u64;
const DATA: u64 = 2 * MIB;
const MEM: usize = (DATA + CHAINS as u64 * REQ_LEN as u64) as usize;
/// Each round writes its own 8 MiB of the disk.
const ROUND_BYTES: u64 = CHAINS as u64 * REQ_LEN as u64;
const DISK: u64 = 64 * MIB;

/// The test's view of the inflight region (queue 0).
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    fn map(fd: &OwnedFd, len: u64) -> Region {
        // SAFETY: a new shared read-only mapping of the region's memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Region {
            ptr: ptr as *mut u8,
            len: len as usize,
        }
    }

    /// Heads marked in flight.
    fn in_flight(&self) -> usize {
        (0..QSIZE as usize)
            .filter(|h| {
                let off = 16 + 16 * h;
                assert!(off < self.len);
                // SAFETY: inside the mapping; the daemon writes it concurrently.
                unsafe { std::ptr::read_volatile(self.ptr.add(off)) == 1 }
            })
            .count()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Connect as a (re)starting QEMU does: features with INFLIGHT_SHMFD, the
/// region, memory, then the queue at the used index.
fn connect(
    sock: &Path,
    mem: &GuestMem,
    q: &mut Option<Virtqueue>,
    region: &mut Option<(OwnedFd, u64, Region)>,
) -> Frontend {
    let fe = Frontend::connect(sock);
    fe.handshake_with(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    if region.is_none() {
        let (reply, fd) = fe.get_inflight_fd(1, QSIZE);
        let size = u64::from_le_bytes(reply[0..8].try_into().unwrap());
        assert!(size >= 16 + 16 * QSIZE as u64, "region of {size} bytes");
        let view = Region::map(&fd, size);
        *region = Some((fd, size, view));
    }
    let (fd, size, _) = region.as_ref().unwrap();
    let p = inflight_payload(*size, 1, QSIZE);
    assert_eq!(fe.ack(R::SET_INFLIGHT_FD, &p, &[fd.as_raw_fd()]), 0);
    assert_eq!(fe.set_mem_table(&[mem.region()], &[mem.fd.as_raw_fd()]), 0);
    match q {
        None => *q = Some(Virtqueue::start(&fe, mem, QSIZE)),
        Some(q) => q.attach(&fe, mem, q.used_idx(mem)),
    }
    fe
}

/// Write chain k of `round`: header, data (device-readable), status.
fn push_writes(mem: &GuestMem, q: &mut Virtqueue, round: u64) {
    for k in 0..CHAINS as u64 {
        let (hdr, status, data) = (HDRS + 16 * k, STATUS + k, DATA + k * REQ_LEN as u64);
        let sector = (round * ROUND_BYTES + k * REQ_LEN as u64) / 512;
        blk_header(mem, hdr, 1, sector);
        mem.bytes(status, 1)[0] = 0xff;
        pattern(mem.bytes(data, REQ_LEN as usize), k, round);
        let chain = [
            desc(hdr, 16, 0),
            desc(data, REQ_LEN, 0),
            desc(status, 1, DESC_F_WRITE),
        ];
        q.push_chain(mem, 3 * k as u16, &chain);
    }
    q.kick();
}

enum Exit {
    Kill,
    KeepGuest,
    /// SIGUSR1 under systemd: the session goes to its fd store, and the
    /// next daemon goes on with it (the frontend stays connected).
    HandOver,
}

/// End the daemon as `exit` says and wait until it is gone; a SIGUSR1
/// exit must be a clean one.
fn end(d: Daemon, exit: Exit, what: &str) {
    match exit {
        Exit::Kill => {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(d.pid(), libc::SIGKILL) };
            d.wait_exit(Duration::from_secs(10));
        }
        Exit::KeepGuest | Exit::HandOver => {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(d.pid(), libc::SIGUSR1) };
            let st = d.wait_exit(Duration::from_secs(30));
            assert!(st.success(), "{what}: exit after SIGUSR1: {st:?}");
        }
    }
}

/// One round: push a batch, let the daemon mark some in flight, end it,
/// restart it, reconnect and wait for every request. Returns the restarted
/// daemon and how many requests had no used entry when the old one died.
/// What outlives the daemons: the socket path and command line, guest
/// memory, the queue and the inflight region.
struct Rig<'a> {
    sock: &'a Path,
    args: &'a [&'a str],
    /// `args` are qemu-storage-daemon's form, not `serve`'s.
    qsd: bool,
    mem: GuestMem,
    q: Option<Virtqueue>,
    region: Option<(OwnedFd, u64, Region)>,
    /// systemd, for hand-overs.
    sd: Option<FakeSystemd>,
}

fn round(rig: &mut Rig, d: Daemon, fe: Frontend, n: u64, exit: Exit) -> (Daemon, Frontend, u16) {
    let (sock, args, qsd, mem) = (rig.sock, rig.args, rig.qsd, &rig.mem);
    let (q, region) = (&mut rig.q, &mut rig.region);
    let vq = q.as_mut().unwrap();
    let used_before = vq.used_idx(mem);
    push_writes(mem, vq, n);
    // Wait for the daemon to have popped (and marked) the batch.
    let view = &region.as_ref().unwrap().2;
    spin_until(
        Duration::from_secs(10),
        &format!("round {n}: nothing was popped"),
        || view.in_flight() != 0 || vq.used_idx(mem) != used_before,
    );
    let hand_over = matches!(exit, Exit::HandOver);
    end(d, exit, &format!("round {n}"));
    let fe = if hand_over {
        rig.sd.as_mut().unwrap().drain();
        Some(fe)
    } else {
        drop(fe);
        None
    };
    let done = vq.used_idx(mem).wrapping_sub(used_before);
    let left = CHAINS - done;
    let marked = view.in_flight() as u16;
    // Requests without a used entry are marked, or were never popped (the
    // new daemon pops those); after SIGKILL one more may be marked whose
    // used entry is out (the window recovery repairs).
    assert!(
        marked <= left + 1,
        "round {n}: {left} requests without a used entry, {marked} marked in flight"
    );

    let d = start_after(sock, args, qsd, rig.sd.as_mut());
    // Handed over: the same connection goes on; otherwise, as QEMU does.
    let fe = fe.unwrap_or_else(|| connect(sock, mem, q, region));
    let vq = q.as_mut().unwrap();
    let used = vq.wait_used(mem, CHAINS as usize, Duration::from_secs(60));
    let mut heads: Vec<u16> = used.iter().map(|(h, _)| *h).collect();
    heads.sort_unstable();
    let want: Vec<u16> = (0..CHAINS).map(|k| 3 * k).collect();
    assert_eq!(
        heads, want,
        "round {n}: every request exactly one used entry"
    );
    assert_eq!(
        vq.used_idx(mem),
        used_before.wrapping_add(CHAINS),
        "round {n}: no extra used entries"
    );
    for k in 0..CHAINS as u64 {
        assert_eq!(mem.bytes(STATUS + k, 1)[0], 0, "round {n}: status of {k}");
    }
    assert_eq!(
        region.as_ref().unwrap().2.in_flight(),
        0,
        "round {n}: region clear"
    );
    if left > 0 && marked >= 2 {
        assert!(
            d.log_shows("requests to resubmit"),
            "round {n}: the new daemon did not say it resubmitted"
        );
    }
    (d, fe, marked.min(left))
}

/// Start the next daemon, once. After SIGKILL the kernel keeps the dead
/// daemon's image open until the I/O it had submitted finishes (io_uring
/// teardown is asynchronous), so its image lock outlives it briefly; the
/// new daemon waits for that lock itself (`--lock-wait`, 5 s by default)
/// instead of refusing to start, so no retry is needed here, as none is
/// from a service manager. That lock is also what keeps a write of the dead
/// daemon from landing after the new daemon's.
/// Under `sd`, systemd starts it (with what the last one stored) and the
/// test waits until it is ready.
fn start_after(sock: &Path, args: &[&str], qsd: bool, sd: Option<&mut FakeSystemd>) -> Daemon {
    if let Some(sd) = sd {
        let mut all: Vec<String> = Vec::new();
        if !qsd {
            all.extend([
                "serve".into(),
                "--socket".into(),
                sock.display().to_string(),
            ]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let d = sd.start(sock, &all);
        sd.until("READY=1");
        return d;
    }
    if qsd {
        Daemon::start_qsd(sock, args, |_| {})
    } else {
        Daemon::start(sock, args)
    }
}

fn check_disk(img: &Path, rounds: u64) {
    let disk = std::fs::read(img).unwrap();
    let mut want = vec![0u8; REQ_LEN as usize];
    for r in 0..rounds {
        for k in 0..CHAINS as u64 {
            pattern(&mut want, k, r);
            let at = (r * ROUND_BYTES + k * REQ_LEN as u64) as usize;
            assert!(
                disk[at..at + REQ_LEN as usize] == want[..],
                "round {r}, request {k}: data on disk differs"
            );
        }
    }
}

fn restart_test(name: &str, exits: fn(u64) -> Exit) {
    restart_test_with(name, exits, None);
}

/// As `restart_test`, the disk behind a throttle filter limited to
/// `iops` (qemu-storage-daemon's command line) if given.
fn restart_test_with(name: &str, exits: fn(u64) -> Exit, iops: Option<u32>) {
    let dir = TestDir::new(name);
    let img = dir.path("disk.raw");
    make_raw(&img, DISK);
    let sock = dir.path("sock");
    let img_s = img.to_str().unwrap().to_string();
    let serve_args = [
        "--image",
        img_s.as_str(),
        "--format",
        "raw",
        "--cache",
        "none",
        "--queue-size",
        "256",
    ];
    let qsd_args: Vec<String> = match iops {
        None => Vec::new(),
        Some(n) => vec![
            "--object".into(),
            format!("throttle-group,id=tg0,limits.iops-total={n}"),
            "--blockdev".into(),
            format!("driver=file,node-name=f0,filename={img_s},cache.direct=on"),
            "--blockdev".into(),
            "driver=throttle,node-name=t0,throttle-group=tg0,file=f0".into(),
            "--export".into(),
            format!(
                "type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
        ],
    };
    let qsd_refs: Vec<&str> = qsd_args.iter().map(String::as_str).collect();
    let args: &[&str] = if iops.is_some() {
        &qsd_refs
    } else {
        &serve_args
    };
    let mut rig = Rig {
        sock: &sock,
        args,
        qsd: iops.is_some(),
        mem: GuestMem::new(MEM),
        q: None,
        region: None,
        sd: matches!(exits(0), Exit::HandOver).then(|| FakeSystemd::bind(dir.path("notify"))),
    };
    let mut d = start_after(&sock, args, iops.is_some(), rig.sd.as_mut());
    let mut fe = connect(&sock, &rig.mem, &mut rig.q, &mut rig.region);
    let mut exercised = 0;
    const ROUNDS: u64 = 5;
    for n in 0..ROUNDS {
        let (next, next_fe, left) = round(&mut rig, d, fe, n, exits(n));
        (d, fe) = (next, next_fe);
        eprintln!("round {n}: {left} of {CHAINS} requests were left in flight");
        exercised += (left > 0) as u32;
    }
    drop(fe);
    assert!(d.stop().success());
    check_disk(&img, ROUNDS);
    assert!(
        exercised > 0,
        "no round left a request in flight: recovery was never exercised"
    );
}

#[test]
fn sigkill_with_requests_in_flight_loses_none_and_repeats_none() {
    restart_test("restart-kill", |_| Exit::Kill);
}

#[test]
fn sigusr1_keeps_the_guest_across_a_restart() {
    restart_test("restart-keep", |_| Exit::KeepGuest);
}

/// SIGUSR1 while most of a batch waits in a throttle queue (64 writes at
/// 100 IOPS): the daemon exits promptly, the waiting requests stay marked
/// in the inflight region, and the next daemon runs every one exactly
/// once, within its own limit.
#[test]
fn sigusr1_with_a_full_throttle_queue_keeps_every_request() {
    restart_test_with("restart-throttle", |_| Exit::KeepGuest, Some(100));
}

/// SIGUSR1 under systemd with most of a batch waiting in a throttle queue,
/// five times: each daemon hands the session (connection, memory, rings,
/// inflight region) to systemd's fd store, and the next goes on with the
/// same connection, running every request left in flight exactly once.
/// The frontend never reconnects.
#[test]
fn sigusr1_under_systemd_hands_the_session_over_with_requests_in_flight() {
    restart_test_with("restart-handover", |_| Exit::HandOver, Some(100));
}

/// SIGKILL while a libblkio client has many O_DIRECT writes in flight
/// (`--cache none`), and a new daemon started at once on the same image,
/// CYCLES times. The dead daemon's I/O may still hold the image lock when
/// the new one starts; it must start the first time anyway (no retry
/// here: it waits for the lock itself) and serve. Whether it had to wait
/// is only reported: the dead daemon's I/O is sometimes done by then.
#[test]
fn a_daemon_started_right_after_sigkill_with_direct_io_in_flight_starts_first_time() {
    const CYCLES: u64 = 4;
    const WRITES: usize = 64;
    const WRITE_LEN: usize = MIB as usize;
    let dir = TestDir::new("restart-lock");
    let img = dir.path("disk.raw");
    make_raw(&img, 2 * WRITES as u64 * WRITE_LEN as u64);
    let sock = dir.path("sock");
    let img_s = img.to_str().unwrap();
    let args = ["--image", img_s, "--format", "raw", "--cache", "none"];
    let mut d = Daemon::start(&sock, &args);
    let mut still_locked = 0;
    for cycle in 0..CYCLES {
        let mut c = connect_with(&sock, 1, WRITES * WRITE_LEN).expect("libblkio connects");
        for k in 0..WRITES {
            pattern(
                &mut c.buf()[k * WRITE_LEN..(k + 1) * WRITE_LEN],
                k as u64,
                cycle,
            );
        }
        let base = c.region.addr;
        let half = (cycle % 2) * WRITES as u64 * WRITE_LEN as u64;
        for k in 0..WRITES {
            let at = half + (k * WRITE_LEN) as u64;
            submit(
                &mut c.queues[0],
                base,
                Req::Write(at, k * WRITE_LEN, WRITE_LEN),
                k,
            );
        }
        // Submits the batch and returns with its first completion: the
        // daemon is working through it; the rest is in flight.
        let first = wait(&mut c.queues[0], 1);
        assert_eq!(first[0].ret, 0, "cycle {cycle}: a write failed");
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(d.pid(), libc::SIGKILL) };
        d.wait_exit(Duration::from_secs(10));
        let locked = image_locked(&img);
        let t = Instant::now();
        d = Daemon::try_start(&sock, &args).unwrap_or_else(|e| {
            panic!("cycle {cycle}: the daemon started right after SIGKILL did not start: {e}")
        });
        let took = t.elapsed();
        still_locked += locked as u32;
        let said: Vec<String> = d
            .stderr()
            .lines()
            .filter(|l| l.to_lowercase().contains("lock"))
            .map(str::to_string)
            .collect();
        eprintln!(
            "cycle {cycle}: lock {} right after the kill; new daemon listening after {took:?}; \
             its log on the lock: {said:?}",
            if locked {
                "still held"
            } else {
                "already released"
            },
        );
        drop(c);
        // The new daemon serves: a write read back through a new client.
        let mut c = common::connect(&sock, 1).expect("libblkio connects to the new daemon");
        let len = 64 * 1024;
        pattern(&mut c.buf()[..len], 99, cycle);
        assert_eq!(c.run(0, Req::Write(0, 0, len)), 0, "cycle {cycle}: write");
        assert_eq!(c.run(0, Req::Read(0, len, len)), 0, "cycle {cycle}: read");
        let (a, b) = c.buf().split_at(len);
        assert!(a == &b[..len], "cycle {cycle}: data read back differs");
    }
    eprintln!("{still_locked} of {CYCLES} restarts found the dead daemon's lock still held");
    assert!(d.stop().success());
}

/// QEMU's image lock bytes for the "write" permission (bit 1): held
/// (100 + bit) and not shared (200 + bit). A writer, ringblk included,
/// holds a shared lock on both.
const WRITE_LOCK_BYTES: [i64; 2] = [101, 201];

fn ofd_lock(f: &std::fs::File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value to fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl on our open file with a valid flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    assert_eq!(r, 0, "fcntl: {}", std::io::Error::last_os_error());
    fl
}

/// True if another open file description (a daemon, dead or alive, whose
/// file the kernel still has open) holds `img`'s write lock.
fn image_locked(img: &Path) -> bool {
    let f = std::fs::File::open(img).unwrap();
    WRITE_LOCK_BYTES.iter().any(|&b| {
        ofd_lock(&f, libc::F_OFD_GETLK, libc::F_WRLCK, b).l_type != libc::F_UNLCK as libc::c_short
    })
}

/// Hold `img`'s write lock as a writer (or a dead daemon's lingering I/O)
/// does, until the file is dropped.
fn hold_write_lock(img: &Path) -> std::fs::File {
    let f = std::fs::File::open(img).unwrap();
    for b in WRITE_LOCK_BYTES {
        ofd_lock(&f, libc::F_OFD_SETLK, libc::F_RDLCK, b);
    }
    assert!(image_locked(img));
    f
}

/// The lock wait itself, made deterministic: the test holds the image's
/// write lock, starts the daemon (default `--lock-wait`), lets the lock go
/// once the daemon has said something about it (it logs the wait), and the
/// daemon must then start and serve.
#[test]
fn a_daemon_waits_for_an_image_lock_released_within_lock_wait() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    let dir = TestDir::new("restart-lock-held");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let sock = dir.path("sock");
    let held = hold_write_lock(&img);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .arg("serve")
        .arg("--socket")
        .arg(&sock)
        .args(["--image", img.to_str().unwrap(), "--format", "raw"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringblk");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (ltx, lrx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = ltx.send(line);
        }
    });
    let mut log = Vec::new();
    let said = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.to_lowercase().contains("lock") => break l,
            Ok(l) => log.push(l),
            Err(e) => {
                let _ = child.kill();
                panic!("ringblk said nothing about the held lock ({e:?}); its log: {log:?}")
            }
        }
    };
    let released = Instant::now();
    drop(held);
    let listening = loop {
        match lrx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with("ringblk: listening on") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    let exited = child.try_wait().unwrap();
    if !listening || exited.is_some() {
        let _ = child.kill();
        let _ = child.wait();
        let rest: Vec<String> = rx.try_iter().collect();
        panic!(
            "ringblk did not start once the lock was released (exit {exited:?}); \
             it said {said:?}, then {rest:?}"
        );
    }
    eprintln!(
        "listening {:?} after the lock was released; it said: {said}",
        released.elapsed()
    );
    let mut c = common::connect(&sock, 1).expect("libblkio connects");
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    drop(c);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// `--lock-wait` bounds the wait: with the lock held throughout, the
/// daemon gives up after about that long, saying the image is locked.
#[test]
fn lock_wait_is_bounded() {
    let dir = TestDir::new("restart-lock-bounded");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let sock = dir.path("sock");
    let _held = hold_write_lock(&img);
    let t = Instant::now();
    let err = ringblk_refuses(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--format",
        "raw",
        "--lock-wait",
        "1",
    ]);
    let took = t.elapsed();
    assert!(err.contains("image is locked"), "{err}");
    assert!(
        took >= Duration::from_secs(1),
        "gave up after {took:?}, before its --lock-wait of 1 s: {err}"
    );
    eprintln!("gave up after {took:?}");
}

/// A guest's disk for the restart tests: an image and its format, in a
/// scratch directory that outlives the daemons.
struct GuestDisk {
    dir: TestDir,
    img: PathBuf,
    format: &'static str,
    /// The backing file (of an overlay) and its contents.
    backing: Option<(PathBuf, Vec<u8>)>,
}

const GUEST_DISK: u64 = 128 * MIB;
/// fio in tests/guest/fio-restart*.sh writes only the first 96 MiB.
const GUEST_WRITTEN: u64 = 96 * MIB;

impl GuestDisk {
    fn raw(name: &str) -> GuestDisk {
        let dir = TestDir::new(name);
        let img = dir.path("disk.raw");
        make_raw(&img, GUEST_DISK);
        GuestDisk {
            dir,
            img,
            format: "raw",
            backing: None,
        }
    }

    /// A new qcow2 image with 16 KiB clusters: a 4 KiB write allocates a
    /// cluster, a 64 KiB one four, so guest writes keep allocating.
    fn qcow2(name: &str) -> GuestDisk {
        let dir = TestDir::new(name);
        let img = dir.path("disk.qcow2");
        let size = GUEST_DISK.to_string();
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            img.to_str().unwrap(),
            &size,
        ]);
        GuestDisk {
            dir,
            img,
            format: "qcow2",
            backing: None,
        }
    }

    /// A qcow2 overlay (16 KiB clusters) over a raw backing file full of
    /// data: writes smaller than a cluster copy the rest of it up from the
    /// backing file.
    fn qcow2_overlay(name: &str) -> GuestDisk {
        let dir = TestDir::new(name);
        let base = dir.path("base.raw");
        let mut data = vec![0u8; GUEST_DISK as usize];
        for (k, chunk) in data.chunks_mut(MIB as usize).enumerate() {
            pattern(chunk, k as u64, 0xba5e);
        }
        std::fs::write(&base, &data).unwrap();
        let img = dir.path("overlay.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            img.to_str().unwrap(),
        ]);
        GuestDisk {
            dir,
            img,
            format: "qcow2",
            backing: Some((base, data)),
        }
    }

    /// After the daemons: a qcow2 image has no corruption (clusters leaked
    /// by a killed daemon are allowed, as after a QEMU crash), and what the
    /// guest never wrote still reads as the backing file (or zeros).
    fn check(&self) {
        if self.format != "qcow2" {
            return;
        }
        let (code, out) = check(&self.img);
        eprintln!("qemu-img check:\n{out}");
        assert!(
            code == 0 || code == 3,
            "qemu-img check found corruption (exit {code}):\n{out}"
        );
        let flat = self.dir.path("flat.raw");
        flatten(&self.img, &flat);
        let seen = std::fs::read(&flat).unwrap();
        let tail = GUEST_WRITTEN as usize..GUEST_DISK as usize;
        let want = match &self.backing {
            Some((_, data)) => data[tail.clone()].to_vec(),
            None => vec![0u8; tail.len()],
        };
        assert!(
            seen[tail] == want[..],
            "the part of the disk the guest never wrote changed"
        );
    }
}

/// QEMU as the frontend (`reconnect=1`), a TCG guest running fio randwrite
/// with crc32c verify on two queues; ringblk is killed with SIGKILL and
/// started again RESTARTS times while fio writes. fio must finish without
/// an error and verify must pass.
#[test]
fn guest_fio_verify_survives_sigkill_and_restart() {
    let disk = GuestDisk::raw("restart-guest-kill");
    guest_restarts(&disk, "fio-restart", || Exit::Kill);
}

/// The same with SIGUSR1, the upgrade path: ringblk exits keeping the
/// guest's requests for the next one.
#[test]
fn guest_fio_verify_survives_keep_guest_restarts() {
    let disk = GuestDisk::raw("restart-guest-keep");
    guest_restarts(&disk, "fio-restart", || Exit::KeepGuest);
}

/// The same under systemd with an fd store: each SIGUSR1 hands the session
/// to the store and the next daemon goes on with QEMU's connection, which
/// QEMU never sees close (the new daemon logs no new connection). The
/// longest request fio saw is printed next to the reconnecting variant's.
#[test]
fn guest_fio_verify_survives_hand_over_upgrades() {
    let disk = GuestDisk::raw("restart-guest-handover");
    guest_restarts(&disk, "fio-restart", || Exit::HandOver);
}

/// SIGKILL on a new qcow2 image (16 KiB clusters): every write the daemon
/// completed, with the cluster allocations it made, survives the kill.
#[test]
fn guest_fio_verify_survives_sigkill_and_restart_on_qcow2() {
    let disk = GuestDisk::qcow2("restart-guest-qcow2");
    guest_restarts(&disk, "fio-restart", || Exit::Kill);
}

/// SIGKILL on a qcow2 overlay (16 KiB clusters) over a backing file full
/// of data: partial-cluster writes copy from the backing file, and what a
/// completed write made of the cluster survives the kill.
#[test]
fn guest_fio_verify_survives_sigkill_and_restart_on_qcow2_overlay() {
    let disk = GuestDisk::qcow2_overlay("restart-guest-overlay");
    guest_restarts(&disk, "fio-restart", || Exit::Kill);
}

/// The workload of the qcow2 crash-consistency report: a 4 KiB writer and
/// a 1 MiB writer, each on its own half of the written area (libaio,
/// O_DIRECT, crc32c verify), on a new qcow2 image killed with SIGKILL.
#[test]
fn guest_mixed_writers_survive_sigkill_and_restart_on_qcow2() {
    let disk = GuestDisk::qcow2("restart-guest-mixed");
    guest_restarts(&disk, "fio-restart-mixed", || Exit::Kill);
}

/// Run tests/guest/`script`.sh in a guest on `disk` (two queues, QEMU
/// reconnecting), ending ringblk as `exit` says and starting it again
/// with the same command line RESTARTS times once the script prints
/// RESTART-FIO-START. The script must pass and print RESTART-FIO-DONE
/// without a verify error.
fn guest_restarts(disk: &GuestDisk, script: &str, exit: fn() -> Exit) {
    use common::guest::run_guest_reconnecting_unless;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    /// Set when the kill cycle's thread panics: the guest would otherwise
    /// wait for a daemon that never comes back, until the guest timeout.
    struct FailedOnPanic(Arc<AtomicBool>);
    impl Drop for FailedOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.store(true, Ordering::SeqCst);
            }
        }
    }

    let sock = disk.dir.path("sock");
    let img_s = disk.img.to_str().unwrap().to_string();
    let args: Vec<String> = [
        "--image",
        img_s.as_str(),
        "--format",
        disk.format,
        "--num-queues",
        "2",
        "--iothreads",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sd =
        matches!(exit(), Exit::HandOver).then(|| FakeSystemd::bind(disk.dir.path("notify")));
    let d = start_after(
        &sock,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        false,
        sd.as_mut(),
    );
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let killer_sock = sock.clone();
    let failed = Arc::new(AtomicBool::new(false));
    let guard = FailedOnPanic(failed.clone());
    let killer = std::thread::spawn(move || {
        let _guard = guard;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut d = d;
        let mut restarts = Vec::new();
        let mut resubmitting = 0;
        if go_rx.recv().is_err() {
            return (d, restarts, resubmitting);
        }
        for i in 0..RESTARTS {
            // Let fio run a while: the kill lands at an arbitrary point of
            // its I/O (this is pacing, not synchronisation).
            std::thread::sleep(Duration::from_millis(1500 + 400 * i));
            if !d.stderr().contains("queue 1 started") {
                // QEMU has not come back to this daemon yet.
                assert!(
                    d.log_shows("queue 1 started"),
                    "restart {i}: QEMU did not reconnect"
                );
            }
            resubmitting += d.stderr().contains("requests to resubmit") as usize;
            end(d, exit(), &format!("restart {i}"));
            let killed_at = Instant::now();
            if let Some(sd) = sd.as_mut() {
                sd.drain();
            }
            d = start_after(&killer_sock, &args, false, sd.as_mut());
            restarts.push(killed_at.elapsed());
            assert!(
                d.log_shows("queue 1 started"),
                "restart {i}: QEMU did not reconnect within 10 s"
            );
            if sd.is_some() {
                assert!(
                    d.log_shows("took over the previous daemon's session"),
                    "restart {i}: the session was not handed over"
                );
                assert!(
                    !d.stderr().contains("frontend connected"),
                    "restart {i}: QEMU reconnected"
                );
            }
        }
        resubmitting += d.stderr().contains("requests to resubmit") as usize;
        (d, restarts, resubmitting)
    });
    let mut go = Some(go_tx);
    let give_up = || {
        failed
            .load(Ordering::SeqCst)
            .then(|| "the kill cycle failed (its panic is above)".to_string())
    };
    let on_line = |line: &str| {
        if line.contains("RESTART-FIO-START") {
            if let Some(tx) = go.take() {
                let _ = tx.send(());
            }
        }
    };
    let run = run_guest_reconnecting_unless(&sock, script, 2, on_line, give_up);
    drop(go);
    let killed = killer.join();
    // The guest's verdict first: a guest whose fio failed ends early, and
    // the kill cycle then fails too, waiting for a QEMU that is gone.
    let bad = run.console.matches("verify: bad").count();
    assert!(
        run.passed() && bad == 0,
        "guest test failed ({bad} fio verify errors); console above"
    );
    assert!(
        run.console.contains("RESTART-FIO-DONE"),
        "fio did not finish cleanly"
    );
    let (d, restarts, resubmitting) = killed.expect("the kill cycle failed");
    // Not asserted: a kill may land between two fio runs, with nothing in
    // flight. What is asserted is that fio never saw an error.
    eprintln!("{resubmitting} of {RESTARTS} restarted daemons resubmitted requests");
    assert_eq!(
        restarts.len(),
        RESTARTS as usize,
        "the guest finished before {RESTARTS} restarts"
    );
    eprintln!(
        "longest request fio saw: {}",
        longest_fio_latency(&run.console).map_or("not reported".into(), |d| format!("{d:?}"))
    );
    for (i, r) in restarts.iter().enumerate() {
        eprintln!("restart {i}: new daemon listening {r:?} after the old one exited");
        assert!(*r < Duration::from_secs(1), "restart {i} took {r:?}");
    }
    assert!(d.stop().success());
    disk.check();
}

/// The largest `clat` maximum fio printed (its units: nsec, usec, msec).
fn longest_fio_latency(console: &str) -> Option<Duration> {
    console
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().strip_prefix("clat (")?;
            let (unit, rest) = l.split_once(')')?;
            let max = rest.split("max=").nth(1)?.split(',').next()?.trim();
            let (num, scale) = match max.strip_suffix('k') {
                Some(n) => (n, 1e3),
                None => (max, 1.0),
            };
            let v: f64 = num.parse().ok()?;
            let ns = match unit {
                "nsec" => 1.0,
                "usec" => 1e3,
                "msec" => 1e6,
                _ => return None,
            };
            Some(Duration::from_nanos((v * scale * ns) as u64))
        })
        .max()
}

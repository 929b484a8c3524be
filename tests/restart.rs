//! The daemon dies (SIGKILL) or leaves for an upgrade (SIGUSR1) with
//! requests in flight; a new daemon on the same socket, given the inflight
//! region back (SET_INFLIGHT_FD) and the same rings, runs exactly the
//! requests that had no used entry. The raw frontend behaves as QEMU does
//! on reconnect: same memory, same region, vring base = the used index.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::*;
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

fn inflight_payload(size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p
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
        Exit::KeepGuest => {
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
    mem: GuestMem,
    q: Option<Virtqueue>,
    region: Option<(OwnedFd, u64, Region)>,
}

fn round(rig: &mut Rig, d: Daemon, fe: Frontend, n: u64, exit: Exit) -> (Daemon, Frontend, u16) {
    let (sock, args, mem) = (rig.sock, rig.args, &rig.mem);
    let (q, region) = (&mut rig.q, &mut rig.region);
    let vq = q.as_mut().unwrap();
    let used_before = vq.used_idx(mem);
    push_writes(mem, vq, n);
    // Wait for the daemon to have popped (and marked) the batch.
    let view = &region.as_ref().unwrap().2;
    let deadline = Instant::now() + Duration::from_secs(10);
    while view.in_flight() == 0 && vq.used_idx(mem) == used_before {
        assert!(Instant::now() < deadline, "round {n}: nothing was popped");
        std::thread::yield_now();
    }
    end(d, exit, &format!("round {n}"));
    drop(fe);
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

    let d = start_after(sock, args);
    let fe = connect(sock, mem, q, region);
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

/// Start the next daemon. After SIGKILL the kernel keeps the dead
/// daemon's image open until the I/O it had submitted finishes (io_uring
/// teardown is asynchronous), so its image lock outlives it briefly: the
/// new daemon refuses to start until then, and is retried, as a service
/// manager would. That lock is also what keeps a write of the dead daemon
/// from landing after the new daemon's.
fn start_after(sock: &Path, args: &[&str]) -> Daemon {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Daemon::try_start(sock, args) {
            Ok(d) => return d,
            Err(e) if e.contains("image is locked") && Instant::now() < deadline => {
                eprintln!("image still locked by the dead daemon's I/O; starting again");
            }
            Err(e) => panic!("{e}"),
        }
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
    let dir = TestDir::new(name);
    let img = dir.path("disk.raw");
    make_raw(&img, DISK);
    let sock = dir.path("sock");
    let img_s = img.to_str().unwrap().to_string();
    let args = [
        "--image",
        img_s.as_str(),
        "--format",
        "raw",
        "--cache",
        "none",
        "--queue-size",
        "256",
    ];
    let mut rig = Rig {
        sock: &sock,
        args: &args,
        mem: GuestMem::new(MEM),
        q: None,
        region: None,
    };
    let mut d = Daemon::start(&sock, &args);
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

/// QEMU as the frontend (`reconnect=1`), a TCG guest running fio randwrite
/// with crc32c verify on two queues; ringblk is killed with SIGKILL and
/// started again 4 times while fio writes. fio must finish without an
/// error and verify must pass.
#[test]
fn guest_fio_verify_survives_sigkill_and_restart() {
    guest_restarts("restart-guest-kill", || Exit::Kill);
}

/// The same with SIGUSR1, the upgrade path: ringblk exits keeping the
/// guest's requests for the next one.
#[test]
fn guest_fio_verify_survives_keep_guest_restarts() {
    guest_restarts("restart-guest-keep", || Exit::KeepGuest);
}

fn guest_restarts(name: &str, exit: fn() -> Exit) {
    use common::guest::run_guest_reconnecting;
    use std::sync::mpsc;

    let dir = TestDir::new(name);
    let img = dir.path("disk.raw");
    make_raw(&img, 128 * MIB);
    let sock = dir.path("sock");
    let img_s = img.to_str().unwrap().to_string();
    let args: Vec<String> = [
        "--image",
        img_s.as_str(),
        "--format",
        "raw",
        "--num-queues",
        "2",
        "--iothreads",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let d = Daemon::start(&sock, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let killer_sock = sock.clone();
    let killer = std::thread::spawn(move || {
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
            d = start_after(&killer_sock, &args);
            restarts.push(killed_at.elapsed());
            assert!(
                d.log_shows("queue 1 started"),
                "restart {i}: QEMU did not reconnect within 10 s"
            );
        }
        resubmitting += d.stderr().contains("requests to resubmit") as usize;
        (d, restarts, resubmitting)
    });
    let mut go = Some(go_tx);
    let run = run_guest_reconnecting(&sock, "fio-restart", 2, |line| {
        if line.contains("RESTART-FIO-START") {
            if let Some(tx) = go.take() {
                let _ = tx.send(());
            }
        }
    });
    drop(go);
    let (d, restarts, resubmitting) = killer.join().expect("the kill cycle failed");
    // Not asserted: a kill may land between two fio runs, with nothing in
    // flight. What is asserted is that fio never saw an error.
    eprintln!("{resubmitting} of {RESTARTS} restarted daemons resubmitted requests");
    assert_eq!(
        restarts.len(),
        RESTARTS as usize,
        "the guest finished before {RESTARTS} restarts"
    );
    for (i, r) in restarts.iter().enumerate() {
        eprintln!("restart {i}: new daemon listening {r:?} after the old one exited");
        assert!(*r < Duration::from_secs(1), "restart {i} took {r:?}");
    }
    assert!(run.passed(), "guest test failed; console above");
    assert!(
        run.console.contains("RESTART-FIO-DONE") && !run.console.contains("verify: bad"),
        "fio did not finish cleanly"
    );
    assert!(d.stop().success());
}

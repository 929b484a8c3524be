//! Upgrade without a reconnect: SIGUSR1 under systemd hands every session
//! to systemd's fd store, and the next daemon goes on serving the same
//! connection. The test plays systemd's part (`common::systemd`). With
//! requests in flight in an inflight region: tests/restart.rs.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::frontend::{Answer, Frontend, GuestMem};
use common::systemd::FakeSystemd;
use common::*;

const MIB: u64 = 1 << 20;

fn serve_args(sock: &Path, img: &Path) -> Vec<String> {
    [
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--format",
        "raw",
    ]
    .map(String::from)
    .to_vec()
}

/// A libblkio client writes and reads back its blocks without pause while
/// the daemon is upgraded five times: no request fails (libblkio does not
/// reconnect: a closed connection would fail it), every block reads back
/// as written, and the longest request is reported.
#[test]
fn five_upgrades_under_io_keep_the_connection_and_every_write() {
    let dir = TestDir::new("upgrade-io");
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let sock = dir.path("sock");
    let mut sd = FakeSystemd::bind(dir.path("notify"));
    let args = serve_args(&sock, &img);
    let mut d = sd.start(&sock, &args);
    sd.until("READY=1");

    let mut c = connect(&sock, 1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let io = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut done, mut longest) = (0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let block = done % 4096;
                let stamp = format!("block {block} round {done}");
                c.buf()[..4096].fill(0);
                c.buf()[..stamp.len()].copy_from_slice(stamp.as_bytes());
                let started = Instant::now();
                assert_eq!(
                    c.run(0, Req::Write(block * 4096, 0, 4096)),
                    0,
                    "write {done}"
                );
                c.buf()[..4096].fill(0xff);
                assert_eq!(c.run(0, Req::Read(block * 4096, 0, 4096)), 0, "read {done}");
                longest = longest.max(started.elapsed());
                assert_eq!(
                    &c.buf()[..stamp.len()],
                    stamp.as_bytes(),
                    "read back {done}"
                );
                done += 1;
            }
            (done, longest)
        })
    };
    for round in 0..5 {
        // Some requests between upgrades, served by this daemon.
        std::thread::sleep(Duration::from_millis(200));
        sd.upgrade_away(d);
        let names = sd.names();
        assert!(
            names.iter().any(|n| n == "ringblk-session.vda.0"),
            "round {round}: no session state stored: {names:?}"
        );
        d = sd.start(&sock, &args);
        sd.until("READY=1");
        assert!(
            d.log_shows("took over the previous daemon's session"),
            "{}",
            d.stderr()
        );
        // The new daemon read the store and told systemd to drop it.
        sd.drain();
        assert!(sd.names().is_empty(), "left in the store: {:?}", sd.names());
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (done, longest) = io.join().expect("the client saw an error");
    eprintln!("{done} write+read pairs across 5 upgrades; longest pair {longest:?}");
    assert!(done > 10, "only {done} requests ran");
    assert!(d.stop().success());
}

/// A session state the new daemon cannot read (here: a newer version)
/// closes that connection, as a restart without the store would, and the
/// export serves the frontend when it connects again.
#[test]
fn a_state_it_cannot_read_closes_the_connection_and_serves_the_next() {
    let dir = TestDir::new("upgrade-fallback");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let sock = dir.path("sock");
    let mut sd = FakeSystemd::bind(dir.path("notify"));
    let args = serve_args(&sock, &img);
    let d = sd.start(&sock, &args);
    sd.until("READY=1");
    let mem = GuestMem::new(1 << 20);
    let fe = Frontend::connect(&sock);
    fe.handshake();
    assert_eq!(fe.set_mem_table(&[mem.region()], &[mem.fd.as_raw_fd()]), 0);
    sd.upgrade_away(d);
    // Replace the state with one from a future daemon.
    let i = sd
        .store
        .iter()
        .position(|(n, _)| n == "ringblk-session.vda.0")
        .expect("a stored state");
    sd.store[i].1 = sealed(br#"{"version": 99}"#);
    let d = sd.start(&sock, &args);
    sd.until("READY=1");
    assert!(d.log_shows("version 99"), "{}", d.stderr());
    // Closed: the frontend reads end-of-file.
    assert!(matches!(fe.recv(Duration::from_secs(10)), Answer::Closed));
    let again = Frontend::connect(&sock);
    again.handshake();
    assert!(again.alive());
    assert!(d.stop().success());
}

fn sealed(data: &[u8]) -> OwnedFd {
    // SAFETY: NUL-terminated name; checked.
    let raw = unsafe { libc::memfd_create(c"state".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all_at(data, 0)
        .unwrap();
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our memfd.
    assert_eq!(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) },
        0
    );
    fd
}

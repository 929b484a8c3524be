//! A daemon signals every call eventfd it is given (SET_VRING_CALL with a
//! new fd), once, as libvhost-user does, so that an interrupt lost with a
//! dead daemon does not leave a driver waiting forever.
//!
//! The window: a daemon writes a used entry, and dies (SIGKILL, a crash)
//! before it signals the call eventfd. The used entry is there, the driver
//! was never told, and the next daemon, given the rings back, finds nothing
//! to do: no request in flight (the entry is written, so the inflight
//! region has it as done), nothing new on the avail ring. A driver that
//! waits for its interrupt, as an idle Linux guest does, waits forever.
//!
//! The tests wait only on the call eventfd, with a timeout, and never kick.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use vhost::vhost_user::message::{FrontendReq as R, VhostUserProtocolFeatures};

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 256;
const MEM: usize = 4 << 20;
/// Guest memory: rings below DATA_BASE, then a header, a status byte, data.
const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 16;
const DATA: u64 = 2 * MIB;
const LEN: u32 = 64 * 1024;
/// How long a daemon has to signal a call eventfd it was given: it does so
/// on the message, in microseconds; this only bounds a failing test.
const SIGNAL_LIMIT: Duration = Duration::from_secs(5);

fn args(img: &Path) -> Vec<String> {
    ["--image", img.to_str().unwrap(), "--format", "raw"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn start(sock: &Path, args: &[String]) -> Daemon {
    Daemon::start(sock, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Connect as QEMU does (vhost-user-blk with INFLIGHT_SHMFD): features,
/// the inflight region (asked for on the first connection, handed back on
/// the next ones), the memory table; the queue is the caller's.
fn connect(sock: &Path, mem: &GuestMem, region: &mut Option<(OwnedFd, u64)>) -> Frontend {
    let fe = Frontend::connect(sock);
    fe.handshake_with(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    if region.is_none() {
        let (reply, fd) = fe.get_inflight_fd(1, QSIZE);
        let size = u64::from_le_bytes(reply[0..8].try_into().unwrap());
        *region = Some((fd, size));
    }
    let (fd, size) = region.as_ref().unwrap();
    let p = inflight_payload(*size, 1, QSIZE);
    assert_eq!(fe.ack(R::SET_INFLIGHT_FD, &p, &[fd.as_raw_fd()]), 0);
    assert_eq!(fe.set_mem_table(&[mem.region()], &[mem.fd.as_raw_fd()]), 0);
    fe
}

/// Make one request available at head 0 and kick: a write of `LEN` bytes
/// of pattern `round` at sector 0 (`write`), or a read of them into DATA.
fn push_request(mem: &GuestMem, q: &mut Virtqueue, write: bool, round: u64) {
    blk_header(mem, HDR, write as u32, 0);
    mem.bytes(STATUS, 1)[0] = 0xff;
    let data = mem.bytes(DATA, LEN as usize);
    if write {
        pattern(data, 0, round);
    } else {
        data.fill(0);
    }
    let flags = if write { 0 } else { DESC_F_WRITE };
    let chain = [
        desc(HDR, 16, 0),
        desc(DATA, LEN, flags),
        desc(STATUS, 1, DESC_F_WRITE),
    ];
    q.push_chain(mem, 0, &chain);
    q.kick();
}

/// Wait (bounded) until the daemon has written `n` used entries, looking
/// at the used ring only: the driver neither consumes them nor reads its
/// call eventfd.
fn wait_used_idx(mem: &GuestMem, q: &Virtqueue, n: u16) {
    let mut idx = 0;
    let done = poll_every(Duration::ZERO, Duration::from_secs(10), || {
        idx = q.used_idx(mem);
        (idx == n).then_some(())
    });
    assert!(
        done.is_some(),
        "the daemon did not complete the request (used index {idx})"
    );
}

/// Take the pending used entry (it must be head 0 with a good status);
/// with a read, check that it returned pattern `round`.
fn consume(mem: &GuestMem, q: &mut Virtqueue, write: bool, round: u64) {
    let used = q.wait_used(mem, 1, Duration::from_secs(10));
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, 0, "the used entry is the request's head");
    assert_eq!(mem.bytes(STATUS, 1)[0], 0, "request status");
    if !write {
        let mut want = vec![0u8; LEN as usize];
        pattern(&mut want, 0, round);
        assert!(
            mem.bytes(DATA, LEN as usize) == &want[..],
            "read back what was written"
        );
    }
}

/// The crash window, reproduced with a real daemon: it runs a write, and
/// the driver does not take the used entry. The daemon is then killed.
/// Its own signal went to the call eventfd of that connection; the
/// frontend starts the device again with a new one (QEMU makes new guest
/// notifiers when it restarts a vhost-user device after a disconnect) and
/// the old one is dropped unread. So what the driver has when the next
/// daemon starts is exactly what a daemon that died between writing the
/// used entry and signalling leaves: an entry it has not consumed (its
/// inflight slot cleared by the dead daemon itself), and on the eventfd it
/// now waits on, nothing. (Writing the entry into the ring from the test
/// instead would leave the inflight region and the disk in a state no
/// daemon made.)
///
/// The next daemon gets what QEMU gives on reconnect: the inflight region
/// back, the memory, SET_VRING_BASE at the used index, SET_VRING_CALL with
/// the new eventfd, SET_VRING_KICK, SET_VRING_ENABLE. Nothing is kicked.
/// The new eventfd must be signalled, and the driver then finds its entry.
#[test]
fn a_restarted_daemon_signals_the_new_call_eventfd_for_an_unsignalled_used_entry() {
    let dir = TestDir::new("lost-irq-restart");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let sock = dir.path("sock");
    let args = args(&img);
    let mem = GuestMem::new(MEM);
    let mut region = None;

    let d = start(&sock, &args);
    let fe = connect(&sock, &mem, &mut region);
    let mut q = Virtqueue::start(&fe, &mem, QSIZE);
    push_request(&mem, &mut q, true, 1);
    wait_used_idx(&mem, &q, 1);
    assert_eq!(q.consumed(), 0, "the driver has not taken the entry");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
    d.wait_exit(Duration::from_secs(10));
    drop(fe);
    drop(q.new_call());

    let d = start(&sock, &args);
    let fe = connect(&sock, &mem, &mut region);
    let base = q.used_idx(&mem);
    assert_eq!(base, 1);
    q.attach(&fe, &mem, base);
    let t = Instant::now();
    let got = signalled_within(&q.call, SIGNAL_LIMIT);
    assert!(
        got.is_some(),
        "the restarted daemon never signalled the new call eventfd within {SIGNAL_LIMIT:?}: \
         a driver waiting for its interrupt would not see the used entry the dead daemon wrote"
    );
    eprintln!(
        "new call eventfd signalled {:?} after the queue was set up (count {})",
        t.elapsed(),
        got.unwrap()
    );
    consume(&mem, &mut q, true, 1);

    // The restarted daemon serves: it reads back the dead daemon's write.
    push_request(&mem, &mut q, false, 1);
    consume(&mem, &mut q, false, 1);
    drop(fe);
    assert!(d.stop().success());
}

/// A call eventfd replaced on a running queue (QEMU does so when the guest
/// masks and unmasks the queue's vector, or switches between irqfd and its
/// own handler): a used entry was written and its signal went to the old
/// eventfd, which the frontend then drops. The daemon signals the new one
/// on the message, with nothing kicked.
#[test]
fn a_call_eventfd_replaced_on_a_running_queue_is_signalled() {
    let dir = TestDir::new("lost-irq-replace");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let sock = dir.path("sock");
    let args = args(&img);
    let mem = GuestMem::new(MEM);
    let mut region = None;
    let d = start(&sock, &args);
    let fe = connect(&sock, &mem, &mut region);
    let mut q = Virtqueue::start(&fe, &mem, QSIZE);

    // A first request runs as usual (the queue is running, the driver
    // consumed everything), then a second one whose entry is not taken.
    push_request(&mem, &mut q, true, 2);
    consume(&mem, &mut q, true, 2);
    push_request(&mem, &mut q, false, 2);
    wait_used_idx(&mem, &q, 2);
    assert_eq!(q.consumed(), 1);

    for n in 0..3 {
        drop(q.replace_call(&fe));
        let got = signalled_within(&q.call, SIGNAL_LIMIT);
        assert!(
            got.is_some(),
            "replacement {n}: the daemon did not signal the new call eventfd within {SIGNAL_LIMIT:?}"
        );
    }
    consume(&mem, &mut q, false, 2);

    // The queue still runs, and signals the last eventfd it was given
    // (drained first, so an extra signal from the replacement cannot
    // stand in for the completion's).
    let _ = signalled_within(&q.call, Duration::ZERO);
    push_request(&mem, &mut q, false, 2);
    wait_used_idx(&mem, &q, 3);
    assert!(
        signalled_within(&q.call, SIGNAL_LIMIT).is_some(),
        "a completion after the replacements was not signalled"
    );
    consume(&mem, &mut q, false, 2);
    drop(fe);
    assert!(d.stop().success());
}

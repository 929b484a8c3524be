//! The graph changes at run time while a guest writes: disks are added,
//! exported, unexported and deleted over QMP, beside an export under load
//! on a shared iothread.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::qemu_img::{assert_clean, qemu_img};
use common::qmp::Qmp;
use common::qsd::QsdArgs;
use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;
const BLK: usize = 64 * 1024;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn exports_come_and_go_while_another_is_written() {
    let dir = TestDir::new("runtime-graph");
    let (d, qmp_sock) = qsd_with_export(&dir, 1, true);
    let a_sock = d.sock.clone();
    let pid = d.pid();
    let mut q = Qmp::connect(&qmp_sock);
    let base = fds_and_threads(pid);

    // Export A: write a block, read it back, forever, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut a = connect(&a_sock, 1).unwrap();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let blk = round % 512;
                pattern(&mut a.buf()[..BLK], blk, round);
                assert_eq!(
                    a.run(0, Req::Write(blk * BLK as u64, 0, BLK)),
                    0,
                    "A: write"
                );
                assert_eq!(
                    a.run(0, Req::Read(blk * BLK as u64, BLK, BLK)),
                    0,
                    "A: read"
                );
                let (w, r) = a.buf().split_at(BLK);
                assert!(w == &r[..BLK], "A: block {blk} read back other data");
                round += 1;
            }
            round
        })
    };

    for i in 0..20u64 {
        let img = dir.path(&format!("b{i}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", &s(&img), "32M"]);
        let b_sock = dir.path(&format!("b{i}.sock"));
        q.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "b",
                   "file": {"driver": "file", "filename": s(&img)}}),
        );
        q.ok(
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "eb", "node-name": "b", "writable": true,
                   "iothread": "io0", "addr": {"type": "unix", "path": s(&b_sock)}}),
        );
        let mut b = connect(&b_sock, 1).unwrap();
        pattern(&mut b.buf()[..BLK], i, 1);
        assert_eq!(b.run(0, Req::Write(0, 0, BLK)), 0);
        assert_eq!(b.run(0, Req::Read(0, BLK, BLK)), 0);
        let (w, r) = b.buf().split_at(BLK);
        assert!(w == &r[..BLK], "B{i}: read back other data");
        // In use: safe mode refuses, blockdev-del too.
        let (_, desc) = q.err("block-export-del", json!({"id": "eb"}));
        assert!(desc.contains("in use"), "{desc}");
        let (_, desc) = q.err("blockdev-del", json!({"node-name": "b"}));
        assert!(desc.contains("busy"), "{desc}");
        // Mid-I/O: requests in flight when the export goes complete
        // successfully or never; none fails.
        for k in 0..8 {
            submit(
                &mut b.queues[0],
                b.region.addr,
                Req::Write(k * BLK as u64, 0, BLK),
                k as usize,
            );
        }
        // Kick them off without waiting for any.
        b.queues[0].do_io(&mut [], 0, None, None).unwrap();
        q.ok("block-export-del", json!({"id": "eb", "mode": "hard"}));
        let ev = q.event();
        assert_eq!(ev["event"], "BLOCK_EXPORT_DELETED");
        assert_eq!(ev["data"]["id"], "eb");
        while let Some(c) = wait_one_for(&mut b.queues[0], Duration::from_millis(200)) {
            assert_eq!(c.ret, 0, "B{i}: a request failed as its export went");
        }
        drop(b);
        q.ok("blockdev-del", json!({"node-name": "b"}));
        assert!(!b_sock.exists(), "B{i}'s socket stayed");
        assert_clean(&img);
    }
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(exports.as_array().unwrap().len(), 1, "{exports}");

    stop.store(true, Ordering::SeqCst);
    let rounds = writer.join().unwrap();
    assert!(rounds > 0);
    // Nothing left behind by twenty exports and their nodes.
    assert_nothing_leaked(pid, base);
    drop(q);
    assert!(d.stop().success());
}

#[test]
fn export_add_errors_change_nothing() {
    let dir = TestDir::new("export-errors");
    let sock = dir.path("a.sock");
    let qmp_sock = dir.path("qmp.sock");
    let args = QsdArgs::new()
        .blockdev("driver=null-co,node-name=n")
        .vhost_export("ea", "n", &sock, "")
        .monitor("m", &qmp_sock);
    let d = Daemon::start_qsd(&sock, &args.build(), |_| {});
    let mut q = Qmp::connect(&qmp_sock);
    let other = s(&dir.path("b.sock"));
    let cases = [
        (
            json!({"type": "vhost-user-blk", "id": "eb", "node-name": "missing",
                "addr": {"type": "unix", "path": other}}),
            "node-name='missing'",
        ),
        (
            json!({"type": "vhost-user-blk", "id": "eb", "node-name": "n",
                "addr": {"type": "unix", "path": s(&sock)}}),
            "another process is listening",
        ),
        (
            json!({"type": "vhost-user-blk", "id": "ea", "node-name": "n",
                "addr": {"type": "unix", "path": other}}),
            "Block export id 'ea' is already in use",
        ),
        (
            json!({"type": "nbd", "id": "eb", "node-name": "n"}),
            "export type 'nbd' is not supported",
        ),
        (
            json!({"type": "vhost-user-blk", "id": "eb", "node-name": "n", "iothread": "nope",
                "addr": {"type": "unix", "path": other}}),
            "Cannot find iothread nope",
        ),
        (
            json!({"type": "vhost-user-blk", "id": "eb", "node-name": "n", "bogus": 1,
                "addr": {"type": "unix", "path": other}}),
            "Parameter 'bogus' is unexpected",
        ),
    ];
    for (args, want) in cases {
        let (_, desc) = q.err("block-export-add", args.clone());
        assert!(desc.contains(want), "{args}: {desc}");
        let exports = q.ok("query-block-exports", json!({}));
        assert_eq!(exports.as_array().unwrap().len(), 1, "{args}: {exports}");
        assert!(!dir.path("b.sock").exists(), "{args}: a socket stayed");
    }
    let (_, desc) = q.err("block-export-del", json!({"id": "nothing"}));
    assert!(desc.contains("Export 'nothing' is not found"), "{desc}");
    // The first export still serves.
    assert!(connect_read_only(&sock).is_ok());
    drop(q);
    assert!(d.stop().success());
}

/// A QSD-style daemon: export `ea` (a raw image, writable, `queues`
/// queues, O_DIRECT if `direct`) and a monitor, all on iothread io0.
fn qsd_with_export(dir: &TestDir, queues: u16, direct: bool) -> (Daemon, std::path::PathBuf) {
    let img = dir.path("a.raw");
    make_raw(&img, 128 * MIB);
    let sock = dir.path("a.sock");
    let qmp_sock = dir.path("qmp.sock");
    let blockdev = format!(
        "driver=raw,node-name=a,file.driver=file,file.filename={},file.cache.direct={}",
        s(&img),
        if direct { "on" } else { "off" }
    );
    let args = QsdArgs::new()
        .iothread("io0")
        .blockdev(&blockdev)
        .writable_export("ea", "a", &sock, "io0", queues)
        .monitor("m", &qmp_sock);
    let d = Daemon::start_qsd(&sock, &args.build(), |_| {});
    (d, qmp_sock)
}

/// Add a null export `eb` on io0, then take it away again.
fn add_and_delete_an_export(q: &mut Qmp, sock: &Path) {
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "b", "size": 16 * MIB}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "eb", "node-name": "b", "iothread": "io0",
               "addr": {"type": "unix", "path": s(sock)}}),
    );
    let c = connect_read_only(sock).unwrap();
    drop(c);
    q.ok("block-export-del", json!({"id": "eb", "mode": "hard"}));
    assert_eq!(q.event()["event"], "BLOCK_EXPORT_DELETED");
    q.ok("blockdev-del", json!({"node-name": "b"}));
}

/// A Linux guest runs fio verify on one export while another export on the
/// same iothread is added and deleted over and over.
#[test]
fn a_guest_verifies_while_another_export_comes_and_goes() {
    let dir = TestDir::new("runtime-guest");
    let (d, qmp_sock) = qsd_with_export(&dir, 2, false);
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let b_sock = dir.path("b.sock");
        std::thread::spawn(move || {
            let mut q = Qmp::connect(&qmp_sock);
            let mut cycles = 0;
            while !stop.load(Ordering::SeqCst) {
                add_and_delete_an_export(&mut q, &b_sock);
                cycles += 1;
            }
            cycles
        })
    };
    let run = common::guest::run_guest(&d.sock, "fio-verify", 2);
    stop.store(true, Ordering::SeqCst);
    let cycles = churn.join().unwrap();
    assert!(run.passed(), "guest test failed; console above");
    assert!(
        !run.console.contains("verify: bad"),
        "fio reported a verify mismatch"
    );
    assert!(cycles > 0, "no export came and went during the guest's run");
    eprintln!("{cycles} export add/delete cycles during the guest's run");
    assert!(d.stop().success());
}

/// A drained section on one export stops only that export: another export
/// on the same iothread keeps being served.
#[test]
fn draining_one_export_does_not_stall_another_on_its_iothread() {
    let dir = TestDir::new("drain-isolation");
    let (d, qmp_sock) = qsd_with_export(&dir, 1, false);
    let mut q = Qmp::connect(&qmp_sock);
    let b_sock = dir.path("b.sock");
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "b", "size": 16 * MIB}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "eb", "node-name": "b", "iothread": "io0",
               "writable": true, "addr": {"type": "unix", "path": s(&b_sock)}}),
    );
    let mut a = connect(&d.sock, 1).unwrap();
    let mut b = connect(&b_sock, 1).unwrap();
    q.ok("block-drained-begin", json!({"export": "ea"}));
    // A's request waits in its ring while the section is held...
    submit(&mut a.queues[0], a.region.addr, Req::Write(0, 0, 4096), 7);
    a.queues[0].do_io(&mut [], 0, None, None).unwrap();
    // ...while B, on the same iothread, completes request after request.
    for i in 0..2000u64 {
        assert_eq!(b.run(0, Req::Write((i % 4096) * 4096, 0, 4096)), 0);
    }
    assert!(
        wait_one_for(&mut a.queues[0], Duration::from_millis(100)).is_none(),
        "A's request completed inside its drained section"
    );
    q.ok("block-drained-end", json!({"export": "ea"}));
    let done = wait_one_for(&mut a.queues[0], Duration::from_secs(30)).expect("A resumed");
    assert_eq!((done.ret, done.user_data), (0, 7));
    drop((a, b, q));
    assert!(d.stop().success());
}

//! Many exports in one daemon: what each costs once it has been served.

mod common;

use std::io::Write;
use std::time::Duration;

use common::qmp::Qmp;
use common::qsd::QsdArgs;
use common::*;
use serde_json::json;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// 100 null exports on one iothread (qemu-storage-daemon's command line),
/// each served once by a libblkio client that reads a block: no thread per
/// export, and the daemon's RSS may grow by at most 256 KiB per export.
/// With transparent huge pages for the allocator's per-thread memory it
/// grew by about 720 KiB (a 2 MiB page for each export's thread); with a
/// thread per export but no huge pages, by about 75 KiB; now about 50 KiB.
#[test]
fn an_export_served_once_keeps_little_memory() {
    const N: usize = 100;
    let dir = TestDir::new("scale-rss");
    let mut args = vec!["--object".to_string(), "iothread,id=io0".to_string()];
    for i in 0..N {
        args.push("--blockdev".into());
        args.push(format!("driver=null-co,node-name=n{i},size=1G"));
        args.push("--export".into());
        args.push(format!(
            "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={},writable=on,iothread=io0",
            dir.path(&format!("s{i}.sock")).display()
        ));
    }
    let d = Daemon::start_qsd(&dir.path(&format!("s{}.sock", N - 1)), &args, |_| {});
    // Idle exports share one thread that takes their frontends.
    let (_, threads) = fds_and_threads(d.pid());
    assert!(threads < 10, "{threads} threads for {N} idle exports");
    // The first session sets up what every later one shares.
    let mut c = connect(&dir.path("s0.sock"), 1).unwrap();
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
    drop(c);
    let before = rss_kib(d.pid());
    for i in 1..N {
        let mut c = connect(&dir.path(&format!("s{i}.sock")), 1).unwrap();
        assert_eq!(
            c.run(0, Req::Read(4096 * i as u64, 0, 4096)),
            0,
            "export e{i}"
        );
    }
    // Every connection's thread ended with it.
    let (_, threads) = fds_and_threads(d.pid());
    assert!(
        threads < 10,
        "{threads} threads after serving {N} exports once"
    );
    let grown = rss_kib(d.pid()).saturating_sub(before);
    let per_export = grown / (N as u64 - 1);
    eprintln!(
        "RSS grew {grown} KiB for {} exports served: {per_export} KiB each",
        N - 1
    );
    assert!(
        per_export <= 256,
        "RSS grew {grown} KiB for {} exports served: {per_export} KiB each",
        N - 1
    );
    d.stop();
}

fn connected(q: &mut Qmp, id: &str) -> bool {
    q.ok("query-block-exports", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .map(|e| e["x-connected"] == true)
        .unwrap_or_else(|| panic!("no export {id}"))
}

/// 200 exports in one daemon: a frontend that connects and then says
/// nothing holds e0, one that sends half a message stalls e1, and every
/// other export is served meanwhile; exports added and deleted at run time
/// (some served once) come and go; at the end the daemon is back to the
/// fds and threads it started with.
#[test]
fn two_hundred_exports_served_around_stalled_frontends_with_churn() {
    const N: usize = 200;
    let dir = TestDir::new("scale-200");
    let qmp = dir.path("qmp.sock");
    let sock = |i: usize| dir.path(&format!("s{i}.sock"));
    let mut args = QsdArgs::new().iothread("io0").monitor("m", &qmp);
    for i in 0..N {
        args = args
            .blockdev(&format!(
                "driver=null-co,node-name=n{i},size=16M,read-zeroes=on"
            ))
            .writable_export(&format!("e{i}"), &format!("n{i}"), &sock(i), "io0", 1);
    }
    let d = Daemon::start_qsd(&sock(N - 1), &args.build(), |_| {});
    let mut q = Qmp::connect(&qmp);
    let base = fds_and_threads(d.pid());

    // e0: connected, silent. e1: half a vhost-user header, then silence.
    let idle = std::os::unix::net::UnixStream::connect(sock(0)).unwrap();
    let mut stalled = std::os::unix::net::UnixStream::connect(sock(1)).unwrap();
    stalled.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
    poll_until(Duration::from_secs(10), "e0 connected", || {
        connected(&mut q, "e0")
    });

    for i in 2..N {
        let mut c = connect(&sock(i), 1).unwrap_or_else(|e| panic!("e{i}: {e}"));
        assert_eq!(c.run(0, Req::Write(4096, 0, 4096)), 0, "e{i}");
        assert_eq!(c.run(0, Req::Read(4096, 0, 4096)), 0, "e{i}");
    }
    assert!(
        connected(&mut q, "e0"),
        "the silent frontend was held all along"
    );

    for i in 0..20 {
        let (node, id, path) = (
            format!("c{i}"),
            format!("x{i}"),
            dir.path(&format!("x{i}.sock")),
        );
        q.ok(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": node, "size": 16 << 20}),
        );
        q.ok(
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": id, "node-name": node, "writable": true,
                   "iothread": "io0", "addr": {"type": "unix", "path": path.to_str().unwrap()}}),
        );
        if i % 2 == 0 {
            let mut c = connect(&path, 1).unwrap();
            assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0, "{id}");
            drop(c);
            poll_until(Duration::from_secs(10), "the client gone", || {
                !connected(&mut q, &id)
            });
        }
        q.ok("block-export-del", json!({"id": id}));
        poll_until(Duration::from_secs(10), "the export gone", || {
            q.ok("query-block-exports", json!({}))
                .as_array()
                .unwrap()
                .len()
                == N
        });
        q.ok("blockdev-del", json!({"node-name": node}));
        assert!(!path.exists(), "{id}: its socket stayed");
    }

    drop(idle);
    drop(stalled);
    poll_until(Duration::from_secs(10), "e0 and e1 free again", || {
        !connected(&mut q, "e0") && !connected(&mut q, "e1")
    });
    // Both serve again.
    for i in [0, 1] {
        let mut c = connect(&sock(i), 1).unwrap();
        assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0, "e{i}");
    }
    assert_nothing_leaked(d.pid(), base);
    assert!(d.stop().success());
}

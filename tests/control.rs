//! The QMP control socket against a real daemon: protocol, bad input,
//! several clients and events, drained sections end to end under load,
//! online resize, and shutdown through `quit`.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::qemu_img::*;
use common::qmp::*;
use common::*;

/// Poll a query until `cond` holds (bounded): for effects the daemon applies
/// after a client leaves, which no reply announces.
fn eventually(q: &mut Qmp, what: &str, cond: impl Fn(&mut Qmp) -> bool) {
    poll_until(
        Duration::from_secs(10),
        &format!("timed out waiting for {what}"),
        || cond(q),
    );
}

#[test]
fn greeting_negotiation_and_ids() {
    let dir = TestDir::new("qmp-basics");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let d = Daemon::with_control(&dir, &img, &[]);
    let mut q = Qmp::connect_raw(&dir.path("qmp"));
    assert!(q.greeting["QMP"]["version"]["qemu"].is_object());
    assert!(q.greeting["QMP"]["capabilities"].is_array());
    // Commands before negotiation are refused, the connection stays.
    let (class, desc) = q.err("query-block-exports", json!({}));
    assert_eq!(class, "CommandNotFound");
    assert!(desc.contains("qmp_capabilities"), "{desc}");
    q.send_raw(br#"{"execute": "qmp_capabilities", "id": {"n": [1, "x"]}}"#);
    assert_eq!(q.response(), json!({"return": {}, "id": {"n": [1, "x"]}}));
    let (class, _) = q.err("qmp_capabilities", json!({}));
    assert_eq!(class, "CommandNotFound");
    // Two requests in one write, no newline between them: two answers in order.
    q.send_raw(br#"{"execute":"query-version","id":1}{"execute":"nope","id":2}"#);
    let a = q.response();
    assert_eq!(a["id"], 1);
    assert!(a["return"]["package"]
        .as_str()
        .unwrap()
        .starts_with("ringblk"));
    // The QEMU release whose QMP ringblk follows.
    assert_eq!(
        a["return"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    let b = q.response();
    assert_eq!(
        (b["id"].clone(), b["error"]["class"].clone()),
        (json!(2), json!("CommandNotFound"))
    );
    let names = q.ok("query-commands", json!({}));
    for c in ["block_resize", "block-drain", "block-drained-begin", "quit"] {
        assert!(
            names.as_array().unwrap().iter().any(|n| n["name"] == c),
            "{c}"
        );
    }
    let exports = q.ok("query-block-exports", json!({}));
    let e = &exports[0];
    assert_eq!(e["id"], "vda");
    assert_eq!(e["type"], "vhost-user-blk");
    assert_eq!(e["node-name"], "fmt0");
    assert_eq!(e["x-num-queues"], 1);
    assert_eq!(e["x-connected"], false);
    assert!(e["x-socket"].as_str().unwrap().ends_with("sock"));
    let c = connect(&d.sock, 1).unwrap();
    assert_eq!(
        q.ok("query-block-exports", json!({}))[0]["x-connected"],
        true
    );
    drop(c);
    let fmt = q.node("fmt0");
    assert_eq!(fmt["drv"], "raw");
    assert_eq!(fmt["image"]["virtual-size"], 16 << 20);
    assert_eq!(fmt["ro"], false);
    assert_eq!(fmt["file"], img.to_str().unwrap());
    assert_eq!(
        fmt["x-children"],
        json!([{"role": "file", "node-name": "file0"}])
    );
    assert_eq!(
        (fmt["x-in-flight"].clone(), fmt["x-quiesce-counter"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(q.node("file0")["drv"], "file");
}

#[test]
fn bad_input_gets_errors_and_harms_nobody() {
    let dir = TestDir::new("qmp-bad");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let d = Daemon::with_control(&dir, &img, &["--logical-block-size", "4096"]);
    let mut c = connect(&d.sock, 1).unwrap();
    pattern(&mut c.buf()[..4096], 9, 9);
    assert_eq!(c.run(0, Req::Write(8192, 0, 4096)), 0);
    let mut q = Qmp::connect(&dir.path("qmp"));

    let generic = |q: &mut Qmp, raw: &[u8], want: &str| {
        q.send_raw(raw);
        let r = q.response();
        let (class, desc) = error_of(&r).unwrap_or_else(|| panic!("{raw:?}: {r}"));
        assert_eq!(class, "GenericError", "{desc}");
        assert!(
            desc.contains(want),
            "{:?}: {desc}",
            String::from_utf8_lossy(raw)
        );
    };
    generic(
        &mut q,
        b"{\"execute\": \"query-version\",, }\n",
        "JSON parse error",
    );
    generic(&mut q, b"hello\n", "JSON parse error");
    generic(&mut q, b"[1, 2]\n", "must be a JSON object");
    generic(&mut q, b"{\"arguments\": {}}\n", "lacks member 'execute'");
    generic(&mut q, b"{\"execute\": 5}\n", "must be a string");
    generic(
        &mut q,
        b"{\"execute\": \"block-drain\", \"arguments\": 3}\n",
        "must be an object",
    );

    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no-such-command",
            json!({}),
            "CommandNotFound",
            "has not been found",
        ),
        (
            "block_resize",
            json!({"export": "vda"}),
            "GenericError",
            "'size' is missing",
        ),
        (
            "block_resize",
            json!({"export": "vda", "size": "big"}),
            "GenericError",
            "Invalid parameter type for 'size'",
        ),
        (
            "block_resize",
            json!({"export": "vda", "size": -4096}),
            "GenericError",
            "Invalid parameter type for 'size'",
        ),
        (
            "block_resize",
            json!({"export": 7, "size": 4096}),
            "GenericError",
            "Invalid parameter type for 'export'",
        ),
        (
            "block_resize",
            json!({"export": "vdz", "size": 32 << 20}),
            "DeviceNotFound",
            "'vdz' not found",
        ),
        (
            "block-drain",
            json!({"node-name": "nope"}),
            "DeviceNotFound",
            "Cannot find node 'nope'",
        ),
        (
            "block-drain",
            json!({}),
            "GenericError",
            "'device' (or 'export') or 'node-name' is missing",
        ),
        (
            "block_resize",
            json!({"device": "vdz", "size": 32 << 20}),
            "DeviceNotFound",
            "Device 'vdz' not found",
        ),
        (
            "block_resize",
            json!({"device": "vda", "export": "vda", "size": 32 << 20}),
            "GenericError",
            "Only one of 'device' and 'export'",
        ),
        (
            "block-drain",
            json!({"export": "vda", "node-name": "fmt0"}),
            "GenericError",
            "Only one of",
        ),
        (
            "block-drain",
            json!({"export": "vda", "force": true}),
            "GenericError",
            "'force' is unexpected",
        ),
        (
            "query-block-exports",
            json!({"x": 1}),
            "GenericError",
            "'x' is unexpected",
        ),
        (
            "block_resize",
            json!({"export": "vda", "size": (16 << 20) + 512}),
            "GenericError",
            "multiple of the logical block size (4096",
        ),
        (
            "block_resize",
            json!({"export": "vda", "size": 8 << 20}),
            "GenericError",
            "Shrinking is not supported",
        ),
        (
            "block-drained-end",
            json!({"export": "vda"}),
            "GenericError",
            "No drained section",
        ),
    ];
    for (cmd, args, class, want) in cases {
        let (c, desc) = q.err(cmd, args.clone());
        assert_eq!(c, class, "{cmd} {args}: {desc}");
        assert!(desc.contains(want), "{cmd} {args}: {desc}");
    }
    // Nothing above changed the disk or left it drained.
    assert_eq!(q.node("fmt0")["image"]["virtual-size"], 16 << 20);
    assert_eq!(q.node("fmt0")["x-quiesce-counter"], 0);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);

    // A client that vanishes in the middle of a command: its section ends.
    {
        let mut gone = Qmp::connect(&dir.path("qmp"));
        gone.send_raw(
            b"{\"execute\": \"block-drained-begin\", \"arguments\": {\"export\": \"vda\"}}\n",
        );
    }
    eventually(&mut q, "the vanished client's section to end", |q| {
        q.node("fmt0")["x-quiesce-counter"] == 0
    });
    // A message that never ends closes that connection only.
    {
        let mut huge = Qmp::connect(&dir.path("qmp"));
        let mut long = b"[".to_vec();
        long.extend(std::iter::repeat_n(b'1', 2 << 20));
        // The daemon hangs up part-way through: the rest may not go out.
        let _ = huge.try_send_raw(&long);
        let r = huge.response();
        assert!(error_of(&r).unwrap().1.contains("too long"), "{r}");
        assert!(huge.closed(), "connection closed");
    }
    // The guest's disk still works and holds what it had.
    assert_eq!(c.run(0, Req::Read(8192, 0, 4096)), 0);
    let mut expect = vec![0u8; 4096];
    pattern(&mut expect, 9, 9);
    assert!(c.buf()[..4096] == expect[..]);
    q.ok("block-drain", json!({"export": "vda"}));
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn sections_nest_belong_to_their_client_and_raise_events() {
    let dir = TestDir::new("qmp-sections");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let d = Daemon::with_control(&dir, &img, &[]);
    let mut a = Qmp::connect(&dir.path("qmp"));
    let mut b = Qmp::connect(&dir.path("qmp"));
    let r = a.ok("block-drained-begin", json!({"export": "vda"}));
    assert_eq!(
        (r["quiesce-counter"].clone(), r["in-flight"].clone()),
        (json!(1), json!(0))
    );
    let r = a.ok("block-drained-begin", json!({"node-name": "file0"}));
    assert_eq!(r["node-name"], "file0");
    // Draining the file node drains its parent too (once more).
    assert_eq!(a.node("fmt0")["x-quiesce-counter"], 2);
    assert_eq!(
        a.ok("query-block-exports", json!({}))[0]["x-quiesced"],
        true
    );
    // Another client sees the events, but cannot end A's sections.
    let ev = b.event();
    assert_eq!(ev["event"], "BLOCK_DRAINED_BEGIN");
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    let (_, desc) = b.err("block-drained-end", json!({"export": "vda"}));
    assert!(desc.contains("this client"), "{desc}");
    let r = a.ok("block-drained-end", json!({"node-name": "file0"}));
    assert_eq!(r["quiesce-counter"], 0);
    assert_eq!(a.node("fmt0")["x-quiesce-counter"], 1);
    // A leaves with one section open: it is ended for A.
    drop(a);
    eventually(&mut b, "A's section to end", |q| {
        q.node("fmt0")["x-quiesce-counter"] == 0
    });
    assert_eq!(
        b.ok("query-block-exports", json!({}))[0]["x-quiesced"],
        false
    );
    // The guest is served again.
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    drop(c);
    assert!(d.stop().success());
}

const BLK: usize = 4096;
const QD: usize = 32;

/// Two queues, QD32 random writes (each 4 KiB block written once, in a
/// random order, with a pattern naming it). A drained section taken in
/// the middle returns with nothing in flight anywhere; while it is held no
/// request reaches the file and the client's requests wait; after it ends
/// everything completes and reads back.
#[test]
fn drained_section_under_load_stops_io_and_loses_nothing() {
    let dir = TestDir::new("qmp-drain-load");
    let img = dir.path("disk.raw");
    let blocks_per_queue = 8192u64;
    let size = 2 * blocks_per_queue * BLK as u64;
    make_raw(&img, size);
    let d = Daemon::with_control(&dir, &img, &["--num-queues", "2", "--iothreads", "2"]);
    let mut q = Qmp::connect(&dir.path("qmp"));
    let mut c = connect_with(&d.sock, 2, 2 * QD * BLK).unwrap();
    let base = c.region.addr;
    let mut qs = std::mem::take(&mut c.queues);
    let submitted = [AtomicU64::new(0), AtomicU64::new(0)];
    let completed = [AtomicU64::new(0), AtomicU64::new(0)];
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for (k, vq) in qs.iter_mut().enumerate() {
            let (sub, done, failed) = (&submitted[k], &completed[k], &failed);
            s.spawn(move || {
                // Queue k owns blocks k, k+2, k+4... in a shuffled order.
                let mut order: Vec<u64> = (0..blocks_per_queue).map(|i| i * 2 + k as u64).collect();
                let mut x = 0x2545_f491_4f6c_dd1du64 + k as u64;
                for i in (1..order.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    order.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let slot = |i: usize| base + (k * QD + i) * BLK;
                let mut next = 0usize;
                let mut outstanding = 0usize;
                let mut free: Vec<usize> = (0..QD).collect();
                while next < order.len() || outstanding > 0 {
                    while next < order.len() && outstanding < QD {
                        let i = free.pop().unwrap();
                        // SAFETY: slot i of queue k is ours until it completes.
                        let buf =
                            unsafe { std::slice::from_raw_parts_mut(slot(i) as *mut u8, BLK) };
                        pattern(buf, order[next], 1);
                        submit(
                            vq,
                            base,
                            Req::Write(order[next] * BLK as u64, slot(i) - base, BLK),
                            i,
                        );
                        next += 1;
                        outstanding += 1;
                        sub.fetch_add(1, Ordering::SeqCst);
                    }
                    let Some(comp) = wait_one_for(vq, Duration::from_secs(30)) else {
                        failed.store(true, Ordering::SeqCst);
                        return;
                    };
                    if comp.ret != 0 {
                        failed.store(true, Ordering::SeqCst);
                    }
                    free.push(comp.user_data);
                    outstanding -= 1;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Let the load build up, then drain in the middle of it.
        let total = |a: &[AtomicU64; 2]| a[0].load(Ordering::SeqCst) + a[1].load(Ordering::SeqCst);
        while total(&completed) < 2000 {
            assert!(
                !failed.load(Ordering::SeqCst),
                "I/O failed before the drain"
            );
            std::thread::yield_now();
        }
        let r = q.ok("block-drained-begin", json!({"export": "vda"}));
        assert_eq!(r["in-flight"], 0, "{r}");
        // Every layer reports zero in flight. (Drain spreads to parents:
        // the export's node is quiesced, the file below it just idle.)
        for n in ["fmt0", "file0"] {
            let node = q.node(n);
            assert_eq!(node["x-in-flight"], 0, "{node}");
        }
        assert_eq!(q.node("fmt0")["x-quiesce-counter"], 1);
        let e = &q.ok("query-block-exports", json!({}))[0];
        assert_eq!(
            (e["x-in-flight"].clone(), e["x-quiesced"].clone()),
            (json!(0), json!(true))
        );
        let file_requests = q.node("file0")["x-requests"].as_u64().unwrap();
        let writes_done = q.ok("query-blockstats", json!({}))[0]["stats"]["wr_operations"]
            .as_u64()
            .unwrap();
        // Hold the section for a while: nothing may move meanwhile.
        let held = Instant::now();
        while held.elapsed() < Duration::from_millis(500) {
            std::thread::yield_now();
        }
        assert_eq!(
            q.node("file0")["x-requests"].as_u64().unwrap(),
            file_requests,
            "a request reached the file while drained"
        );
        let stats = q.ok("query-blockstats", json!({}));
        assert_eq!(
            stats[0]["stats"]["wr_operations"].as_u64().unwrap(),
            writes_done
        );
        assert!(total(&completed) <= writes_done);
        assert!(
            total(&submitted) > total(&completed),
            "the client's new requests wait"
        );
        assert!(
            total(&submitted) < 2 * blocks_per_queue,
            "the drain came before the end"
        );
        let r = q.ok("block-drained-end", json!({"export": "vda"}));
        assert_eq!(r["quiesce-counter"], 0);
    });
    assert!(
        !failed.load(Ordering::SeqCst),
        "a request failed or timed out"
    );
    assert_eq!(
        completed[0].load(Ordering::SeqCst) + completed[1].load(Ordering::SeqCst),
        2 * blocks_per_queue
    );
    // Per-queue statistics add up.
    let stats = q.ok("query-blockstats", json!({}));
    let per_queue: Vec<u64> = stats[0]["x-queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["stats"]["write"]["operations"].as_u64().unwrap())
        .collect();
    assert_eq!(per_queue, vec![blocks_per_queue, blocks_per_queue]);
    let w = &stats[0]["x-stats"]["write"];
    assert_eq!(w["bytes"].as_u64().unwrap(), size);
    assert_eq!(w["failed"], 0);
    assert!(w["latency"]["average-ns"].as_u64().unwrap() > 0);
    assert!(w["latency"]["p99-us"].as_u64().unwrap() >= w["latency"]["p50-us"].as_u64().unwrap());
    let hist_total: u64 = w["latency"]["histogram-us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(hist_total, 2 * blocks_per_queue);
    drop(qs);
    drop(c);
    assert!(d.stop().success());
    // Full verify, straight from the file.
    let f = std::fs::File::open(&img).unwrap();
    let (mut got, mut want) = (vec![0u8; BLK], vec![0u8; BLK]);
    for b in 0..2 * blocks_per_queue {
        f.read_exact_at(&mut got, b * BLK as u64).unwrap();
        pattern(&mut want, b, 1);
        assert!(got == want, "block {b} lost");
    }
}

#[test]
fn block_resize_grows_raw_and_qcow2_and_clients_see_it() {
    let dir = TestDir::new("qmp-resize");
    // raw: the file grows; a libblkio client (no backend channel) sees the
    // new capacity through GET_CONFIG when it connects again.
    let raw = dir.path("disk.raw");
    make_raw(&raw, 16 << 20);
    let d = Daemon::with_control(&dir, &raw, &[]);
    let mut q = Qmp::connect(&dir.path("qmp"));
    let mut listener = Qmp::connect(&dir.path("qmp"));
    let c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 16 << 20);
    // QEMU's argument: `device`, the BlockBackend (an export's is its id).
    assert_eq!(
        q.ok("block_resize", json!({"device": "vda", "size": 32 << 20})),
        json!({})
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 32 << 20);
    assert_eq!(q.node("fmt0")["image"]["virtual-size"], 32 << 20);
    assert_eq!(q.node("fmt0")["x-quiesce-counter"], 0);
    let ev = listener.event();
    assert_eq!(
        (ev["event"].clone(), ev["data"]["size"].clone()),
        (json!("BLOCK_RESIZED"), json!(32 << 20))
    );
    drop(c);
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 32 << 20);
    let last = (32 << 20) - 4096;
    pattern(&mut c.buf()[..4096], 77, 1);
    assert_eq!(c.run(0, Req::Write(last, 0, 4096)), 0);
    assert_eq!(c.run(0, Req::Read(last, 4096, 4096)), 0);
    let b = c.buf();
    assert!(b[..4096] == b[4096..8192]);
    // Same size again: nothing to do, still fine (ringblk's `export` too).
    q.ok("block_resize", json!({"export": "vda", "size": 32 << 20}));
    drop(c);
    assert!(d.stop().success());

    // qcow2 (named by node), written before and after, checked by qemu-img.
    let dir = TestDir::new("qmp-resize-qcow2");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    let d = Daemon::with_control(&dir, &img, &[]);
    let mut q = Qmp::connect(&dir.path("qmp"));
    let mut c = connect(&d.sock, 1).unwrap();
    pattern(&mut c.buf()[..4096], 1, 2);
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    q.ok(
        "block_resize",
        json!({"node-name": "fmt0", "size": 1u64 << 30}),
    );
    drop(c);
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 1 << 30);
    pattern(&mut c.buf()[..4096], 2, 2);
    assert_eq!(c.run(0, Req::Write((1 << 30) - 4096, 0, 4096)), 0);
    drop(c);
    assert!(d.stop().success());
    assert_clean(&img);
    let info = qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 1u64 << 30);
    let mut expect = vec![0u8; 4096];
    let tail = flatten(&img, &dir.path("tail.raw"));
    let mut got = vec![0u8; 4096];
    for (off, blk) in [(0u64, 1u64), ((1 << 30) - 4096, 2)] {
        tail.read_exact_at(&mut got, off).unwrap();
        pattern(&mut expect, blk, 2);
        assert!(got == expect, "data at {off}");
    }
}

#[test]
fn read_only_export_refuses_resize() {
    let dir = TestDir::new("qmp-resize-ro");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let d = Daemon::with_control(&dir, &img, &["--read-only"]);
    let mut q = Qmp::connect(&dir.path("qmp"));
    let (_, desc) = q.err("block_resize", json!({"export": "vda", "size": 32 << 20}));
    assert!(desc.contains("read-only"), "{desc}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
    assert!(d.stop().success());
}

#[test]
fn quit_shuts_down_cleanly_and_announces_it() {
    let dir = TestDir::new("qmp-quit");
    let img = dir.path("disk.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    let d = Daemon::with_control(&dir, &img, &[]);
    let mut watcher = Qmp::connect(&dir.path("qmp"));
    let mut q = Qmp::connect(&dir.path("qmp"));
    // Even with a drained section held by a client, quit completes.
    q.ok("block-drained-begin", json!({"export": "vda"}));
    let mut c = connect(&d.sock, 1).unwrap();
    pattern(&mut c.buf()[..4096], 5, 5);
    // This write waits in the virtqueue while drained; it must not be
    // lost or block the shutdown.
    submit(&mut c.queues[0], c.region.addr, Req::Write(0, 0, 4096), 0);
    assert_eq!(q.ok("quit", json!({})), json!({}));
    loop {
        let ev = watcher.event();
        if ev["event"] == "SHUTDOWN" {
            assert_eq!(ev["data"]["reason"], "host-qmp-quit");
            break;
        }
    }
    assert!(watcher.recv().is_none(), "clients are disconnected");
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(!dir.path("qmp").exists(), "control socket removed");
    std::mem::forget(c);
    assert_clean(&img);
}

#[test]
fn ctl_runs_commands_for_people_and_scripts() {
    let dir = TestDir::new("qmp-ctl");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let d = Daemon::with_control(&dir, &img, &[]);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringblk"))
            .arg("ctl")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let sock = dir.path("qmp");
    let s = sock.to_str().unwrap();
    let (ok, out, _) = ctl(&[s, "query-block-exports"]);
    assert!(
        ok && out.contains("id: vda") && out.contains("type: vhost-user-blk"),
        "{out}"
    );
    let (ok, out, _) = ctl(&[s, "block_resize", "export=vda", "size=32M"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
    let (ok, out, _) = ctl(&["--json", s, "block-drain", "export=vda"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node-name"], "fmt0");
    assert!(v["drain-time-ns"].is_u64());
    let (ok, _, err) = ctl(&[s, "block_resize", "export=vda", "size=1M"]);
    assert!(!ok && err.contains("GenericError: Shrinking"), "{err}");
    let (ok, _, err) = ctl(&[s, "block-drain", "bogus"]);
    assert!(!ok && err.contains("key=value"), "{err}");
    let (ok, _, err) = ctl(&[dir.path("nothing").to_str().unwrap(), "quit"]);
    assert!(!ok && err.contains("nothing"), "{err}");
    let (ok, out, err) = ctl(&[s, "quit"]);
    assert!(ok, "quit: {out}{err}");
    assert!(d.wait_exit(Duration::from_secs(30)).success());
}

/// Drains while frontends come and go: a client disconnects with requests
/// in flight as drains run; a new one connects inside a held section and
/// is served when it ends.
#[test]
fn drains_racing_frontend_disconnects() {
    let dir = TestDir::new("qmp-drain-disconnect");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let d = Daemon::with_control(&dir, &img, &["--num-queues", "2", "--iothreads", "2"]);
    let mut q = Qmp::connect(&dir.path("qmp"));
    for _ in 0..5 {
        let mut c = connect_with(&d.sock, 2, 2 * QD * BLK).unwrap();
        let base = c.region.addr;
        for k in 0..2 {
            for i in 0..QD {
                let off = ((k * QD + i) * BLK) as u64;
                submit(
                    &mut c.queues[k],
                    base,
                    Req::Write(off, (k * QD + i) * BLK, BLK),
                    i,
                );
            }
        }
        std::thread::scope(|s| {
            let drains = s.spawn(|| {
                let mut q2 = Qmp::connect(&dir.path("qmp"));
                for _ in 0..10 {
                    q2.ok("block-drain", json!({"export": "vda"}));
                }
            });
            drop(c); // disconnect with requests in flight
            drains.join().unwrap();
        });
        // Requests popped after the last drain finish, the session ends.
        eventually(
            &mut q,
            "the disconnected frontend's requests to finish",
            |q| {
                let e = &q.ok("query-block-exports", json!({}))[0];
                e["x-in-flight"] == 0 && e["x-connected"] == false
            },
        );
    }
    // A frontend that connects inside a drained section waits for its end.
    q.ok("block-drained-begin", json!({"export": "vda"}));
    let mut c = connect(&d.sock, 1).unwrap();
    pattern(&mut c.buf()[..BLK], 3, 3);
    submit(&mut c.queues[0], c.region.addr, Req::Write(0, 0, BLK), 0);
    assert!(
        wait_one_for(&mut c.queues[0], Duration::from_millis(300)).is_none(),
        "served while drained"
    );
    q.ok("block-drained-end", json!({"export": "vda"}));
    let done =
        wait_one_for(&mut c.queues[0], Duration::from_secs(10)).expect("served after the end");
    assert_eq!(done.ret, 0);
    assert_eq!(c.run(0, Req::Read(0, BLK, BLK)), 0);
    let b = c.buf();
    assert!(b[..BLK] == b[BLK..2 * BLK]);
    drop(c);
    assert!(d.stop().success());
}

/// `serve` runs one iothread per queue, but leaves a CPU for the guest:
/// at most CPUs - 1 iothreads (at least one) unless told otherwise, and
/// never more than there are queues. QMP's query-iothreads shows them.
#[test]
fn serve_iothreads_default_to_one_per_queue_leaving_a_cpu() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let spare = cpus.saturating_sub(1).max(1);
    for (extra, want) in [
        (&["--num-queues", "4"][..], 4.min(spare)),
        (&["--num-queues", "4", "--iothreads", "3"][..], 3),
        (&["--num-queues", "2", "--iothreads", "8"][..], 2),
        (&[][..], 1),
    ] {
        let dir = TestDir::new("serve-iothreads");
        let img = dir.path("disk.raw");
        make_raw(&img, 1 << 20);
        let d = Daemon::with_control(&dir, &img, extra);
        let mut q = Qmp::connect(&dir.path("qmp"));
        let threads = q.ok("query-iothreads", json!({}));
        assert_eq!(threads.as_array().unwrap().len(), want, "{extra:?}");
        drop(q);
        assert!(d.stop().success());
    }
}

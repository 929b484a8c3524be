//! Live external snapshots, transactions and active commit, with QEMU's
//! QMP commands: every test runs against ringblk and against
//! qemu-storage-daemon (the reference), with libblkio clients writing
//! while the graph changes under them and qemu-img judging the images.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion};
use common::qemu_img::{check, identical, qemu_img};
use common::qmp::Qmp;
use common::qsd::QsdArgs;
use common::storage::{connect_to, Impl, Storage};
use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Every disk's size.
const DISK: u64 = 64 * MIB;
/// The writers' block size and queue depth.
const BS: usize = 4096;
const QD: usize = 32;
/// How long a QMP command may take before the test fails.
const QMP_LIMIT: Duration = Duration::from_secs(10);
/// Writes a second while an active commit runs (see Writer::set_rate).
const COMMIT_RATE: u64 = 2000;
/// How long a job may take to reach a state before the test fails.
const JOB_LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Every test, once against each daemon. The qemu-storage-daemon runs
/// show that what the tests expect is QEMU's behaviour; they are not run
/// by default (`cargo test --test snapshot -- --ignored` runs them):
/// qemu-storage-daemon 7.2 sometimes stops completing a disk's writes
/// after a transaction across iothreads (seen here: a writer got no
/// completion for 30 s), which would make every run a coin toss.
macro_rules! against_both {
    ($($name:ident),* $(,)?) => {
        mod ringblk {
            $(#[test] fn $name() { super::$name(super::Impl::Ringblk) })*
        }
        mod qemu_storage_daemon {
            $(
                #[test]
                #[ignore = "reference run against qemu-storage-daemon; can hang in QEMU 7.2"]
                fn $name() { super::$name(super::Impl::Qsd) }
            )*
        }
    };
}

against_both!(
    a_transaction_snapshots_two_busy_exports_on_two_iothreads_twenty_times,
    a_failed_transaction_leaves_the_graph_as_it_was,
    blockdev_snapshot_puts_an_added_overlay_above_a_busy_export,
    an_active_commit_under_writes_pivots_the_export_back_onto_its_base,
    a_daemon_killed_during_a_commit_loses_no_flushed_write,
    a_daemon_killed_while_a_commit_copies_loses_no_flushed_write,
    a_chain_made_live_opens_in_qemu_img_and_qemu_storage_daemon,
    cancelling_a_ready_commit_leaves_the_export_on_its_overlay,
    a_daemon_stopped_during_a_commit_cancels_it_and_leaves_a_clean_chain,
    a_commit_without_auto_finalize_or_auto_dismiss_waits_for_finalize_and_dismiss,
    snapshot_and_commit_errors_are_qemus_and_change_nothing,
    a_transaction_mixes_new_and_added_overlays_on_two_busy_exports,
);

// ---------------------------------------------------------------------
// Set-up and helpers

/// Disks `a` (export `ea`, iothread io0) and, with `two`, `b` (export
/// `eb`, io1): raw images of DISK bytes; a QMP monitor on DIR/qmp.sock.
fn start_disks(which: Impl, dir: &TestDir, two: bool) -> (Storage, Qmp) {
    let mut args = QsdArgs::new().iothread("io0").iothread("io1");
    let disks: &[(&str, &str)] = if two {
        &[("a", "io0"), ("b", "io1")]
    } else {
        &[("a", "io0")]
    };
    for (n, io) in disks {
        let img = dir.path(&format!("{n}.raw"));
        make_raw(&img, DISK);
        args = args.raw(n, &img).writable_export(
            &format!("e{n}"),
            n,
            &dir.path(&format!("{n}.sock")),
            io,
            1,
        );
    }
    let args = args.monitor("mon0", &dir.path("qmp.sock"));
    let st = Storage::start(which, &dir.0, &args, &dir.path("a.sock"));
    let mut q = Qmp::connect(&dir.path("qmp.sock"));
    q.set_timeout(QMP_LIMIT);
    (st, q)
}

/// A `blockdev-snapshot-sync` action: a new qcow2 `file` (node `new`)
/// above node `node`.
fn snap(node: &str, file: &Path, new: &str) -> Value {
    json!({"type": "blockdev-snapshot-sync", "data": {
        "node-name": node, "snapshot-file": s(file), "snapshot-node-name": new,
        "format": "qcow2", "mode": "absolute-paths"}})
}

/// Export id → node name, from query-block-exports.
fn export_nodes(q: &mut Qmp) -> Vec<(String, String)> {
    let e = q.ok("query-block-exports", json!({}));
    let mut v: Vec<(String, String)> = e
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["id"].as_str().unwrap().to_string(),
                x["node-name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn assert_exports_on(q: &mut Qmp, want: &[(&str, &str)], when: &str) {
    let got = export_nodes(q);
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want, "{when}: exports (id, node) are on other nodes");
}

/// Up to QD completions, waiting at most `limit` for the first; none if
/// none came (or the queue failed, e.g. its daemon died).
fn reap(q: &mut Blkioq, limit: Duration) -> Vec<Completion> {
    let mut c: Vec<MaybeUninit<Completion>> = (0..QD).map(|_| MaybeUninit::uninit()).collect();
    let mut t = limit;
    match q.do_io(&mut c, 1, Some(&mut t), None) {
        // SAFETY: do_io initialised the first n entries.
        Ok(n) => c[..n]
            .iter()
            .map(|x| unsafe { x.assume_init_read() })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Write `model` as a raw reference image.
fn write_reference(path: &Path, model: &[u8]) {
    std::fs::write(path, model).unwrap();
}

fn assert_same(top: &Path, top_fmt: &str, reference: &Path, what: &str) {
    let (same, out) = identical(top, top_fmt, reference, "raw");
    assert!(
        same,
        "{what}: {} differs from the reference: {out}",
        top.display()
    );
}

/// `qemu-img info --backing-chain` of `top`: the chain's filenames, top
/// first.
/// The image (chain) at `img` reads exactly as `model`, what the writer
/// wrote (compared through a reference raw file in `dir`).
fn holds(dir: &TestDir, img: &Path, fmt: &str, model: &[u8], what: &str) {
    let reference = dir.path("a.ref");
    write_reference(&reference, model);
    assert_same(img, fmt, &reference, what);
}

/// The writer stops, the daemon stops cleanly, and the base `a.raw` holds
/// everything written (after a commit).
fn the_base_holds_everything_written(dir: &TestDir, st: Storage, q: Qmp, w: Writer) {
    let (model, _) = w.finish();
    stop_cleanly(st, q);
    holds(
        dir,
        &dir.path("a.raw"),
        "raw",
        &model,
        "the base after commit",
    );
}

/// Stop the daemon (its QMP connection closed first); it must exit cleanly.
fn stop_cleanly(st: Storage, q: Qmp) {
    drop(q);
    assert!(st.stop().success(), "the daemon exited with an error");
}

/// `v` deserializes into QEMU's type for it.
fn schema<T: serde::de::DeserializeOwned>(what: &str, v: &Value) {
    if let Err(e) = serde_json::from_value::<T>(v.clone()) {
        panic!("{what} does not match QEMU's schema: {e}\n{v:#}");
    }
}

fn chain(top: &Path) -> Vec<String> {
    let out = qemu_img(&["info", "--backing-chain", "--output=json", &s(top)]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap().to_string())
        .collect()
}

/// Write block `blk` (64 KiB) with `round`'s pattern, read it back.
fn write_read(c: &mut Client, blk: u64, round: u64, what: &str) {
    let len = 65536;
    pattern(&mut c.buf()[..len], blk, round);
    assert_eq!(
        c.run(0, Req::Write(blk * len as u64, 0, len)),
        0,
        "{what}: write"
    );
    assert_eq!(
        c.run(0, Req::Read(blk * len as u64, len, len)),
        0,
        "{what}: read"
    );
    let (w, r) = c.buf().split_at(len);
    assert!(w == &r[..len], "{what}: block {blk} read back other data");
}

/// Read the whole disk through `c` and compare with `model`.
fn assert_reads_as(c: &mut Client, model: &[u8], what: &str) {
    let chunk = 1 << 20;
    for off in (0..model.len()).step_by(chunk) {
        assert_eq!(
            c.run(0, Req::Read(off as u64, 0, chunk)),
            0,
            "{what}: read at {off}"
        );
        let got = &c.buf()[..chunk];
        if got != &model[off..off + chunk] {
            let i = (0..chunk).find(|&i| got[i] != model[off + i]).unwrap();
            panic!("{what}: byte {} differs from what was written", off + i);
        }
    }
}

// ---------------------------------------------------------------------
// A writer at QD32 that remembers what it wrote

/// A client thread writing 4 KiB blocks at random (never two in flight on
/// one block) at QD32, keeping a model of the disk; any failed or hung
/// request fails the test. Unpaced unless `set_rate` says otherwise.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    handle: JoinHandle<(Vec<u8>, Duration)>,
}

impl Writer {
    fn start(mut c: Client, seed: u64, mut model: Vec<u8>, name: &'static str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let (st, dn, rt) = (stop.clone(), done.clone(), rate.clone());
        let handle = std::thread::spawn(move || {
            // Pacing: writes submitted since `paced_from` at `cur_rate`/s.
            let (mut cur_rate, mut paced_from, mut paced_n) = (0u64, Instant::now(), 0u64);
            let blocks = model.len() / BS;
            let mut busy = vec![false; blocks];
            let mut slots: Vec<Option<(usize, Instant)>> = vec![None; QD];
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut seq = 0u64;
            let mut max_lat = Duration::ZERO;
            let base = c.region.addr;
            loop {
                let stopping = st.load(Ordering::SeqCst);
                let r = rt.load(Ordering::SeqCst);
                if r != cur_rate {
                    (cur_rate, paced_from, paced_n) = (r, Instant::now(), 0);
                }
                if !stopping {
                    for (slot, state) in slots.iter_mut().enumerate() {
                        if state.is_some() {
                            continue;
                        }
                        if cur_rate > 0
                            && paced_n as f64
                                >= paced_from.elapsed().as_secs_f64() * cur_rate as f64
                        {
                            break;
                        }
                        paced_n += 1;
                        let blk = loop {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let b = (x % blocks as u64) as usize;
                            if !busy[b] {
                                break b;
                            }
                        };
                        busy[blk] = true;
                        seq += 1;
                        pattern(&mut c.buf()[slot * BS..][..BS], blk as u64, seq);
                        submit(
                            &mut c.queues[0],
                            base,
                            Req::Write((blk * BS) as u64, slot * BS, BS),
                            slot,
                        );
                        *state = Some((blk, Instant::now()));
                    }
                }
                if slots.iter().all(|s| s.is_none()) {
                    if stopping {
                        break;
                    }
                    // Paced, nothing in flight: the next write is due in
                    // at most 1/rate s.
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let got = reap(&mut c.queues[0], Duration::from_secs(30));
                assert!(!got.is_empty(), "{name}: no write completed within 30 s");
                for comp in got {
                    let (blk, t) = slots[comp.user_data].take().unwrap();
                    assert_eq!(
                        comp.ret, 0,
                        "{name}: a write failed while the graph changed"
                    );
                    max_lat = max_lat.max(t.elapsed());
                    let slot = comp.user_data;
                    model[blk * BS..][..BS].copy_from_slice(&c.buf()[slot * BS..][..BS]);
                    busy[blk] = false;
                    dn.fetch_add(1, Ordering::SeqCst);
                }
            }
            (model, max_lat)
        });
        Writer {
            stop,
            done,
            rate,
            handle,
        }
    }

    /// At most `per_sec` writes a second from now on (0: unpaced). An
    /// active commit converges only if the guest dirties clusters slower
    /// than the job copies them; unpaced, this writer dirties a 64 KiB
    /// cluster per 4 KiB write, tens of thousands a second.
    fn set_rate(&self, per_sec: u64) {
        self.rate.store(per_sec, Ordering::SeqCst);
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// Wait (bounded) for `n` more completed writes.
    fn wait_for_more(&self, n: u64) {
        let start = self.done();
        poll_until(Duration::from_secs(60), "writes completing", || {
            self.done() >= start + n
        });
    }

    /// Stop, wait for what is in flight; the model and the longest
    /// request latency.
    fn finish(self) -> (Vec<u8>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("writer thread failed")
    }
}

/// A writer on disk `disk` (its export's socket `DISK.sock`), from a
/// zeroed model.
fn writer_on(which: Impl, dir: &TestDir, disk: &'static str, seed: u64) -> Writer {
    let c = connect_to(which, &dir.path(&format!("{disk}.sock")), 1);
    Writer::start(c, seed, vec![0; DISK as usize], disk)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

// ---------------------------------------------------------------------
// 1. Twenty transactions over two busy exports

fn a_transaction_snapshots_two_busy_exports_on_two_iothreads_twenty_times(which: Impl) {
    let dir = TestDir::new("snap-txn");
    let (st, mut q) = start_disks(which, &dir, true);
    let wa = writer_on(which, &dir, "a", 1);
    let wb = writer_on(which, &dir, "b", 2);
    let mut lat = Vec::new();
    let (mut top_a, mut top_b) = ("a".to_string(), "b".to_string());
    for i in 1..=20 {
        // Each overlay gets writes of its own before the next goes on.
        wa.wait_for_more(256);
        wb.wait_for_more(256);
        let (na, nb) = (format!("a{i}"), format!("b{i}"));
        let actions = json!([
            snap(&top_a, &dir.path(&format!("{na}.qcow2")), &na),
            snap(&top_b, &dir.path(&format!("{nb}.qcow2")), &nb),
        ]);
        let t0 = Instant::now();
        let r = q.cmd("transaction", json!({ "actions": actions }));
        let dt = t0.elapsed();
        assert!(r.get("return").is_some(), "transaction {i} failed: {r}");
        assert!(dt < QMP_LIMIT, "transaction {i} took {dt:?}");
        lat.push(dt);
        assert_exports_on(
            &mut q,
            &[("ea", &na), ("eb", &nb)],
            &format!("after transaction {i}"),
        );
        (top_a, top_b) = (na, nb);
    }
    wa.wait_for_more(256);
    wb.wait_for_more(256);
    let writes = wa.done() + wb.done();
    let (ma, la) = wa.finish();
    let (mb, lb) = wb.finish();
    lat.sort();
    eprintln!(
        "{which:?}: 20 two-disk snapshot transactions: median {:?}, p99 {:?}, max {:?}; \
         {writes} writes at QD32, longest write {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
        la.max(lb)
    );
    // ringblk logs how long each transaction kept the disks drained.
    let log = st.log();
    let mut drained: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("transaction: "))
        .collect();
    drained.truncate(3);
    for l in drained {
        eprintln!(
            "{which:?}: {}",
            l.split("transaction: ").last().unwrap_or(l)
        );
    }
    stop_cleanly(st, q);
    for (n, model) in [("a", ma), ("b", mb)] {
        let reference = dir.path(&format!("{n}.ref"));
        write_reference(&reference, &model);
        let top = dir.path(&format!("{n}20.qcow2"));
        assert_same(&top, "qcow2", &reference, n);
        for i in 1..=20 {
            common::qemu_img::assert_clean(&dir.path(&format!("{n}{i}.qcow2")));
        }
        let want: Vec<String> = (0..=20)
            .rev()
            .map(|i| {
                if i == 0 {
                    s(&dir.path(&format!("{n}.raw")))
                } else {
                    s(&dir.path(&format!("{n}{i}.qcow2")))
                }
            })
            .collect();
        assert_eq!(chain(&top), want, "{n}: the backing chain");
    }
}

// ---------------------------------------------------------------------
// 2. Failed transactions change nothing

/// What a transaction that fails must leave: the same nodes, the exports
/// where they were, no overlay file it created.
fn assert_nothing_changed(q: &mut Qmp, nodes_before: &Value, what: &str) {
    assert_exports_on(q, &[("ea", "a"), ("eb", "b")], what);
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let (nodes, nodes_before) = (without_counters(&nodes), without_counters(nodes_before));
    if nodes != nodes_before {
        panic!(
            "{what}: query-named-block-nodes changed:\n{}",
            json_diff("", &nodes_before, &nodes).join("\n")
        );
    }
}

/// `nodes` without experimental ("x-") members: ringblk's request
/// counters (`x-requests`) count the flushes a transaction makes whether
/// it succeeds or not; they are not the graph.
fn without_counters(nodes: &Value) -> Value {
    let mut v = nodes.clone();
    for n in v.as_array_mut().unwrap() {
        n.as_object_mut()
            .unwrap()
            .retain(|k, _| !k.starts_with("x-"));
    }
    v
}

/// Where `a` and `b` differ, as "path: a -> b" lines.
fn json_diff(path: &str, a: &Value, b: &Value) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    json_diff(
                        &format!("{path}.{k}"),
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    )
                })
                .collect()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .flat_map(|(i, (p, q))| {
                let name = p["node-name"].as_str().map(|n| n.to_string());
                json_diff(&format!("{path}[{}]", name.unwrap_or(i.to_string())), p, q)
            })
            .collect(),
        _ if a == b => Vec::new(),
        _ => vec![format!("{path}: {a} -> {b}")],
    }
}

/// A QMP error: (class, text).
type ErrorPair = (String, String);

/// A transaction that must fail: it leaves the nodes as they were.
/// Returns its error and QEMU's for it, to compare once everything else
/// was checked.
fn refused(q: &mut Qmp, args: Value, qemu_says: &str, when: &str) -> (ErrorPair, ErrorPair) {
    let before = q.ok("query-named-block-nodes", json!({}));
    let got = q.err("transaction", args);
    assert_nothing_changed(q, &before, when);
    (got, ("GenericError".into(), qemu_says.into()))
}

fn a_failed_transaction_leaves_the_graph_as_it_was(which: Impl) {
    let dir = TestDir::new("snap-fail");
    let (st, mut q) = start_disks(which, &dir, true);
    let mut ca = connect_to(which, &dir.path("a.sock"), 1);
    let mut cb = connect_to(which, &dir.path("b.sock"), 1);
    write_read(&mut ca, 0, 1, "a before");
    write_read(&mut cb, 0, 1, "b before");

    // The second action's directory does not exist.
    let a1 = dir.path("a1.qcow2");
    let b1 = dir.path("missing/b1.qcow2");
    // QEMU's words are checked last (after what the failure left behind).
    let mut texts = vec![refused(
        &mut q,
        json!({"actions": [snap("a", &a1, "a1"), snap("b", &b1, "b1")]}),
        &format!("Could not create '{}': No such file or directory", s(&b1)),
        "after a failed second action",
    )];
    eprintln!("{which:?}: failed action: {:?}", texts[0].0);
    overlay_removed(which, &a1);
    write_read(&mut ca, 1, 2, "a after a failed transaction");
    write_read(&mut cb, 1, 2, "b after a failed transaction");

    // An abort action fails the transaction after a good one.
    let a2 = dir.path("a2.qcow2");
    texts.push(refused(
        &mut q,
        json!({"actions": [snap("a", &a2, "a2"), {"type": "abort", "data": {}}]}),
        "Transaction aborted using Abort action",
        "after an abort action",
    ));
    overlay_removed(which, &a2);
    write_read(&mut ca, 2, 3, "a after an aborted transaction");
    write_read(&mut cb, 2, 3, "b after an aborted transaction");

    // completion-mode "grouped" is refused for snapshot actions, before
    // anything is created.
    let a3 = dir.path("a3.qcow2");
    texts.push(refused(
        &mut q,
        json!({"actions": [snap("a", &a3, "a3")],
               "properties": {"completion-mode": "grouped"}}),
        "Action 'blockdev-snapshot-sync' does not support Transaction property completion-mode = grouped",
        "after completion-mode grouped",
    ));
    assert!(!a3.exists(), "a refused transaction created its overlay");
    // "individual" is the default and is accepted; nothing the failures
    // left behind (node names, files) stands in the way of the same
    // snapshots now.
    q.ok(
        "transaction",
        json!({"actions": [snap("a", &a1, "a1"), snap("b", &dir.path("b1.qcow2"), "b1")],
               "properties": {"completion-mode": "individual"}}),
    );
    assert_exports_on(&mut q, &[("ea", "a1"), ("eb", "b1")], "after a good one");
    write_read(&mut ca, 3, 4, "a in its overlay");
    write_read(&mut cb, 3, 4, "b in its overlay");
    drop((ca, cb, q));
    assert!(st.stop().success(), "the daemon exited with an error");
    common::qemu_img::assert_clean(&a1);
    common::qemu_img::assert_clean(&dir.path("b1.qcow2"));
    let wrong: Vec<String> = texts
        .iter()
        .filter(|(got, want)| got != want)
        .map(|(got, want)| format!("got {got:?}, QEMU says {want:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "errors not in QEMU's words:\n{}",
        wrong.join("\n")
    );
}

/// ringblk removes the overlay files a failed transaction created;
/// qemu-storage-daemon 7.2 leaves them (its abort only undoes the graph
/// change), which is said, not asserted.
fn overlay_removed(which: Impl, file: &Path) {
    match which {
        Impl::Ringblk => assert!(
            !file.exists(),
            "the failed transaction left its overlay {}",
            file.display()
        ),
        Impl::Qsd => eprintln!(
            "qemu-storage-daemon: after a failed transaction {} exists: {}",
            file.display(),
            file.exists()
        ),
    }
}

// ---------------------------------------------------------------------
// 3. blockdev-snapshot with an overlay from blockdev-add

fn blockdev_snapshot_puts_an_added_overlay_above_a_busy_export(which: Impl) {
    let dir = TestDir::new("snap-add");
    let (st, mut q) = start_disks(which, &dir, false);
    let mut c = connect_to(which, &dir.path("a.sock"), 1);
    // 64 blocks of 64 KiB in the base.
    let len = 65536;
    let mut base_model = vec![0u8; DISK as usize];
    for blk in 0..64u64 {
        write_read(&mut c, blk, 1, "base");
        base_model[blk as usize * len..][..len].copy_from_slice(&c.buf()[..len]);
    }
    let ov = dir.path("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&dir.path("a.raw")),
        "-F",
        "raw",
        &s(&ov),
    ]);
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ov",
               "file": {"driver": "file", "filename": s(&ov)}, "backing": null}),
    );
    // A writer keeps the export busy while the overlay goes on (it writes
    // anywhere, the first 4 MiB included: reads below are checked against
    // its model).
    drop(c);
    let w = Writer::start(
        connect_to(which, &dir.path("a.sock"), 1),
        3,
        base_model.clone(),
        "a",
    );
    w.wait_for_more(512);
    q.ok("blockdev-snapshot", json!({"node": "a", "overlay": "ov"}));
    assert_exports_on(&mut q, &[("ea", "ov")], "after blockdev-snapshot");
    w.wait_for_more(512);
    let (model, _) = w.finish();
    let mut c = connect_to(which, &dir.path("a.sock"), 1);
    let mut model = model;
    // Even blocks rewritten in the overlay; odd ones read from the base.
    for blk in (0..64u64).step_by(2) {
        write_read(&mut c, blk, 2, "overlay");
        model[blk as usize * len..][..len].copy_from_slice(&c.buf()[..len]);
    }
    assert_reads_as(&mut c, &model, "through the overlay");
    let node = q.node("ov");
    assert_eq!(node["backing_file_depth"], 1, "ov's backing: {node}");
    drop((c, q));
    assert!(st.stop().success(), "the daemon exited with an error");
    holds(&dir, &ov, "qcow2", &model, "the overlay");
    common::qemu_img::assert_clean(&ov);
    // The even blocks' round-2 data is in the overlay only.
    let base = std::fs::read(dir.path("a.raw")).unwrap();
    for blk in (0..64usize).step_by(2) {
        assert!(
            base[blk * len..][..len] != model[blk * len..][..len],
            "block {blk}'s write after the snapshot reached the base"
        );
    }
    assert_eq!(chain(&ov), [s(&ov), s(&dir.path("a.raw"))]);
}

// ---------------------------------------------------------------------
// 4. Active commit under writes

/// JOB_STATUS_CHANGE statuses of job `id` among `events`.
fn statuses(events: &[Value], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == id)
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect()
}

fn an_active_commit_under_writes_pivots_the_export_back_onto_its_base(which: Impl) {
    let dir = TestDir::new("snap-commit");
    let (st, mut q) = start_disks(which, &dir, false);
    let w = writer_on(which, &dir, "a", 4);
    w.wait_for_more(1024);
    let ov = dir.path("s1.qcow2");
    q.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "a", "snapshot-file": s(&ov), "snapshot-node-name": "s1",
               "format": "qcow2", "mode": "absolute-paths"}),
    );
    assert_exports_on(&mut q, &[("ea", "s1")], "after the snapshot");
    w.wait_for_more(4096);
    w.set_rate(COMMIT_RATE);
    let mut events = Vec::new();
    let r = q.ok("block-commit", json!({"job-id": "c0", "device": "s1"}));
    assert_eq!(r, json!({}));
    events.append(&mut q.events);
    let (ready, before) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_READY");
    events.extend(before);
    eprintln!("{which:?}: {ready}");
    assert_eq!(ready["data"]["type"], "commit");
    assert_eq!(ready["data"]["device"], "c0");
    assert_eq!(ready["data"]["speed"], 0);
    assert_eq!(
        ready["data"]["len"], ready["data"]["offset"],
        "BLOCK_JOB_READY: len and offset differ (QEMU: equal, the job caught up)"
    );
    schema::<qapi_qmp::BLOCK_JOB_READY>("BLOCK_JOB_READY", &ready["data"]);
    events.push(ready);
    let jobs = q.ok("query-jobs", json!({}));
    eprintln!("{which:?}: query-jobs while ready: {jobs}");
    assert_eq!(jobs[0]["id"], "c0");
    assert_eq!(jobs[0]["type"], "commit");
    assert_eq!(jobs[0]["status"], "ready");
    let bjobs = q.ok("query-block-jobs", json!({}));
    eprintln!("{which:?}: query-block-jobs while ready: {bjobs}");
    assert_eq!(bjobs[0]["device"], "c0");
    assert_eq!(bjobs[0]["ready"], true);
    // QEMU's own types, from its QAPI schema (the qapi-qmp crate).
    schema::<Vec<qapi_qmp::JobInfo>>("query-jobs", &jobs);
    schema::<Vec<qapi_qmp::BlockJobInfo>>("query-block-jobs", &bjobs);
    // Writes go on while the job mirrors them.
    w.wait_for_more(1024);
    q.ok("job-complete", json!({"id": "c0"}));
    let (done, before) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_COMPLETED");
    events.extend(before);
    eprintln!("{which:?}: {done}");
    assert!(done["data"].get("error").is_none(), "commit failed: {done}");
    schema::<qapi_qmp::BLOCK_JOB_COMPLETED>("BLOCK_JOB_COMPLETED", &done["data"]);
    for e in events.iter().filter(|e| e["event"] == "JOB_STATUS_CHANGE") {
        schema::<qapi_qmp::JOB_STATUS_CHANGE>("JOB_STATUS_CHANGE", &e["data"]);
    }
    assert_eq!(done["data"]["device"], "c0");
    assert_eq!(done["data"]["type"], "commit");
    assert_eq!(
        done["data"]["len"], done["data"]["offset"],
        "BLOCK_JOB_COMPLETED of a successful job: len and offset differ (QEMU: equal)"
    );
    events.push(done);
    // auto-dismiss: the job goes (JOB_STATUS_CHANGE null), query-jobs is
    // empty.
    let (gone, before) = q.event_where(JOB_LIMIT, |e| {
        e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "null"
    });
    events.extend(before);
    events.push(gone);
    let seq = statuses(&events, "c0");
    eprintln!("{which:?}: JOB_STATUS_CHANGE c0: {seq:?}");
    let want = ["created", "running", "ready", "waiting", "pending", "null"];
    let mut it = seq.iter();
    for st in want {
        assert!(
            it.any(|s| s == st),
            "status {st} missing or out of order in {seq:?}"
        );
    }
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    assert_exports_on(&mut q, &[("ea", "a")], "after the commit");
    w.wait_for_more(1024);
    let (model, lat) = w.finish();
    eprintln!("{which:?}: longest write during snapshot + commit: {lat:?}");
    stop_cleanly(st, q);
    holds(
        &dir,
        &dir.path("a.raw"),
        "raw",
        &model,
        "the base after commit",
    );
}

// ---------------------------------------------------------------------
// 5. SIGKILL during a commit

/// Region written round after round: 768 blocks of 64 KiB (48 MiB).
const ROUND_BLOCKS: u64 = 768;
const ROUND_BS: usize = 65536;

/// Rounds: every block of the region with round r's pattern, a flush,
/// then r is durable. Runs until stopped or its daemon dies.
fn round_writer(
    mut c: Client,
    stop: Arc<AtomicBool>,
    durable: Arc<AtomicU64>,
    first: u64,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let base = c.region.addr;
        let mut round = first;
        'rounds: loop {
            let mut next = 0u64;
            let mut inflight = 0usize;
            let mut free: Vec<usize> = (0..QD).collect();
            while next < ROUND_BLOCKS || inflight > 0 {
                while next < ROUND_BLOCKS && !free.is_empty() {
                    let slot = free.pop().unwrap();
                    pattern(&mut c.buf()[slot * ROUND_BS..][..ROUND_BS], next, round);
                    submit(
                        &mut c.queues[0],
                        base,
                        Req::Write(next * ROUND_BS as u64, slot * ROUND_BS, ROUND_BS),
                        slot,
                    );
                    next += 1;
                    inflight += 1;
                }
                let got = reap(&mut c.queues[0], Duration::from_millis(200));
                if got.is_empty() && stop.load(Ordering::SeqCst) {
                    break 'rounds;
                }
                for comp in got {
                    assert_eq!(comp.ret, 0, "round {round}: a write failed");
                    free.push(comp.user_data);
                    inflight -= 1;
                }
            }
            submit(&mut c.queues[0], base, Req::Flush, QD);
            loop {
                let got = reap(&mut c.queues[0], Duration::from_millis(200));
                if let Some(comp) = got.first() {
                    assert_eq!(comp.ret, 0, "round {round}: the flush failed");
                    break;
                }
                if stop.load(Ordering::SeqCst) {
                    break 'rounds;
                }
            }
            durable.store(round, Ordering::SeqCst);
            round += 1;
        }
    })
}

fn a_daemon_killed_during_a_commit_loses_no_flushed_write(which: Impl) {
    killed_during_a_commit(which, false);
}

/// The same, killed right after block-commit returns: the job is still
/// copying into the base (allocating its clusters).
fn a_daemon_killed_while_a_commit_copies_loses_no_flushed_write(which: Impl) {
    killed_during_a_commit(which, true);
}

fn killed_during_a_commit(which: Impl, at_once: bool) {
    let dir = TestDir::new(if at_once {
        "snap-kill-now"
    } else {
        "snap-kill"
    });
    let base = dir.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "64M"]);
    let sock = dir.path("a.sock");
    let args = QsdArgs::new()
        .iothread("io0")
        .qcow2("a", &base)
        .writable_export("ea", "a", &sock, "io0", 1)
        .monitor("mon0", &dir.path("qmp.sock"));
    let st = Storage::start(which, &dir.0, &args, &sock);
    let mut q = Qmp::connect(&dir.path("qmp.sock"));
    q.set_timeout(QMP_LIMIT);
    let stop = Arc::new(AtomicBool::new(false));
    let durable = Arc::new(AtomicU64::new(0));
    let c = connect_to(which, &sock, 1);
    let writer = round_writer(c, stop.clone(), durable.clone(), 1);
    poll_until(
        Duration::from_secs(60),
        "round 2 durable in the base",
        || durable.load(Ordering::SeqCst) >= 2,
    );
    let ov = dir.path("s1.qcow2");
    q.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "a", "snapshot-file": s(&ov), "snapshot-node-name": "s1",
               "format": "qcow2"}),
    );
    let at_snapshot = durable.load(Ordering::SeqCst);
    poll_until(Duration::from_secs(60), "two rounds in the overlay", || {
        durable.load(Ordering::SeqCst) >= at_snapshot + 2
    });
    // The job runs (copying, or READY and mirroring) while rounds go on;
    // the daemon dies before job-complete.
    q.ok("block-commit", json!({"job-id": "c0", "device": "s1"}));
    if at_once {
        // As soon as the job has copied something.
        spin_until(JOB_LIMIT, "the job copied nothing", || {
            q.ok("query-jobs", json!({}))[0]["current-progress"] != 0
        });
    } else {
        let at_commit = durable.load(Ordering::SeqCst);
        poll_until(
            Duration::from_secs(60),
            "a round flushed during the commit",
            || durable.load(Ordering::SeqCst) > at_commit,
        );
    }
    let jobs = q.ok("query-jobs", json!({}));
    eprintln!("{which:?}: killed with {jobs}");
    assert_eq!(jobs[0]["id"], "c0", "the job is gone before the kill");
    st.kill9();
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer failed before the kill");
    let r = durable.load(Ordering::SeqCst);
    eprintln!("{which:?}: last durable round {r}");
    for img in [&ov, &base] {
        let (code, out) = check(img);
        assert!(
            code == 0 || code == 3,
            "qemu-img check {} after SIGKILL: exit {code}\n{out}",
            img.display()
        );
    }
    assert_eq!(chain(&ov), [s(&ov), s(&base)]);
    // Restarted on the top image: every block is round r's or r+1's.
    let args = QsdArgs::new()
        .iothread("io0")
        .qcow2("top", &ov)
        .writable_export("ea", "top", &sock, "io0", 1);
    let st = Storage::start(which, &dir.0, &args, &sock);
    let mut c = connect_to(which, &sock, 1);
    let mut want = vec![0u8; ROUND_BS];
    for blk in 0..ROUND_BLOCKS {
        assert_eq!(
            c.run(0, Req::Read(blk * ROUND_BS as u64, 0, ROUND_BS)),
            0,
            "read after restart"
        );
        let ok = [r, r + 1].iter().any(|&round| {
            pattern(&mut want, blk, round);
            c.buf()[..ROUND_BS] == want[..]
        });
        assert!(
            ok,
            "block {blk} holds neither round {r} (flushed) nor round {}",
            r + 1
        );
    }
    drop(c);
    assert!(
        st.stop().success(),
        "the restarted daemon exited with an error"
    );
}

// ---------------------------------------------------------------------
// 6. The chain opens in QEMU

fn a_chain_made_live_opens_in_qemu_img_and_qemu_storage_daemon(which: Impl) {
    let dir = TestDir::new("snap-interop");
    let (st, mut q) = start_disks(which, &dir, false);
    let w = writer_on(which, &dir, "a", 6);
    let mut top = "a".to_string();
    let mut files: Vec<PathBuf> = vec![dir.path("a.raw")];
    for i in 1..=3 {
        w.wait_for_more(2048);
        let f = dir.path(&format!("s{i}.qcow2"));
        let n = format!("s{i}");
        q.ok("transaction", json!({"actions": [snap(&top, &f, &n)]}));
        files.push(f);
        top = n;
    }
    w.wait_for_more(2048);
    let (model, _) = w.finish();
    stop_cleanly(st, q);
    let top = files.last().unwrap().clone();
    holds(&dir, &top, "qcow2", &model, "qemu-img");
    let mut want: Vec<String> = files.iter().map(|f| s(f)).collect();
    want.reverse();
    assert_eq!(chain(&top), want);
    // qemu-storage-daemon opens the top with its chain and serves what was
    // written.
    let sock = dir.path("qsd.sock");
    let args = QsdArgs::new()
        .iothread("io0")
        .qcow2("top", &top)
        .writable_export("e", "top", &sock, "io0", 1);
    let qsd = Storage::start(Impl::Qsd, &dir.0, &args, &sock);
    let mut c = connect_to(Impl::Qsd, &sock, 1);
    assert_reads_as(&mut c, &model, "qemu-storage-daemon on the chain");
    drop(c);
    // Only what it served matters here; qemu-storage-daemon 7.2 sometimes
    // does not exit on SIGTERM on this busy machine.
    qsd.kill9();
}

// ---------------------------------------------------------------------
// 7. Job control: cancel, manual finalize and dismiss

/// Disk `a` with a writer, snapshotted into `s1` and with writes in it.
fn busy_overlay(which: Impl, dir: &TestDir, seed: u64) -> (Storage, Qmp, Writer) {
    let (st, mut q) = start_disks(which, dir, false);
    let w = writer_on(which, dir, "a", seed);
    w.wait_for_more(1024);
    q.ok(
        "transaction",
        json!({"actions": [snap("a", &dir.path("s1.qcow2"), "s1")]}),
    );
    w.wait_for_more(2048);
    w.set_rate(COMMIT_RATE);
    (st, q, w)
}

fn node_names(q: &mut Qmp) -> Vec<String> {
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let mut v: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .filter(|n| !n.starts_with('#'))
        .collect();
    v.sort();
    v
}

fn cancelling_a_ready_commit_leaves_the_export_on_its_overlay(which: Impl) {
    let dir = TestDir::new("snap-cancel");
    let (st, mut q, w) = busy_overlay(which, &dir, 7);
    q.ok("block-commit", json!({"job-id": "c0", "device": "s1"}));
    q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_READY");
    w.wait_for_more(1024);
    q.ok("job-cancel", json!({"id": "c0"}));
    let (cancelled, mut events) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_CANCELLED");
    eprintln!("{which:?}: {cancelled}");
    assert_eq!(cancelled["data"]["device"], "c0");
    assert_eq!(cancelled["data"]["type"], "commit");
    let (gone, before) = q.event_where(JOB_LIMIT, |e| {
        e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "null"
    });
    events.extend(before);
    events.push(gone);
    let seq = statuses(&events, "c0");
    eprintln!("{which:?}: JOB_STATUS_CHANGE c0 after job-cancel: {seq:?}");
    assert_eq!(seq, ["aborting", "concluded", "null"]);
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    assert_exports_on(&mut q, &[("ea", "s1")], "after a cancelled commit");
    assert_eq!(node_names(&mut q), ["a", "s1"]);
    w.wait_for_more(1024);
    let (model, _) = w.finish();
    stop_cleanly(st, q);
    holds(&dir, &dir.path("s1.qcow2"), "qcow2", &model, "the overlay");
    common::qemu_img::assert_clean(&dir.path("s1.qcow2"));
}

fn a_daemon_stopped_during_a_commit_cancels_it_and_leaves_a_clean_chain(which: Impl) {
    let dir = TestDir::new("snap-stop");
    let (st, mut q, w) = busy_overlay(which, &dir, 9);
    q.ok("block-commit", json!({"job-id": "c0", "device": "s1"}));
    q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_READY");
    w.wait_for_more(1024);
    let (model, _) = w.finish();
    drop(q);
    // SIGTERM with the job running: it is cancelled, then the disks close.
    assert!(st.stop().success(), "the daemon exited with an error");
    let top = dir.path("s1.qcow2");
    common::qemu_img::assert_clean(&top);
    assert_eq!(chain(&top), [s(&top), s(&dir.path("a.raw"))]);
    holds(&dir, &top, "qcow2", &model, "the overlay chain");
}

/// A drained section on a commit's base pauses the job (ringblk's
/// block-drained-begin; QEMU has no such command).
#[test]
fn a_drained_section_pauses_a_commit_job() {
    let dir = TestDir::new("snap-pause");
    let (st, mut q, w) = busy_overlay(Impl::Ringblk, &dir, 10);
    q.ok("block-commit", json!({"job-id": "c0", "device": "s1"}));
    q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_READY");
    let paused = |q: &mut Qmp| q.ok("query-block-jobs", json!({}))[0]["paused"].clone();
    assert_eq!(paused(&mut q), json!(false));
    q.ok("block-drained-begin", json!({"node-name": "a"}));
    assert_eq!(paused(&mut q), json!(true), "paused inside the section");
    let busy = q.ok("query-block-jobs", json!({}))[0]["busy"].clone();
    assert_eq!(busy, json!(false), "and not copying");
    q.ok("block-drained-end", json!({"node-name": "a"}));
    assert_eq!(paused(&mut q), json!(false));
    w.wait_for_more(1024);
    q.ok("job-complete", json!({"id": "c0"}));
    let (done, _) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "{done}");
    the_base_holds_everything_written(&dir, st, q, w);
}

fn a_commit_without_auto_finalize_or_auto_dismiss_waits_for_finalize_and_dismiss(which: Impl) {
    let dir = TestDir::new("snap-manual");
    let (st, mut q, w) = busy_overlay(which, &dir, 8);
    q.ok(
        "block-commit",
        json!({"job-id": "c0", "device": "s1", "auto-finalize": false, "auto-dismiss": false}),
    );
    q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_READY");
    w.wait_for_more(1024);
    // The older command, by job id ("device").
    q.ok("block-job-complete", json!({"device": "c0"}));
    let (pending, _) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_PENDING");
    eprintln!("{which:?}: {pending}");
    assert_eq!(pending["data"], json!({"type": "commit", "id": "c0"}));
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "pending", "{jobs}");
    // Not pivoted yet (QEMU shows the job's implicit filter node above
    // s1, "#blockNNN", as the export's node while the job runs).
    let e = export_nodes(&mut q);
    eprintln!("{which:?}: exports while pending: {e:?}");
    assert_ne!(e[0].1, "a", "pivoted onto the base before job-finalize");
    // (No writes are awaited here: QEMU holds the job's final drained
    // section from PENDING until job-finalize, so the export's writes wait.)
    q.ok("job-finalize", json!({"id": "c0"}));
    let (done, _) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "commit failed: {done}");
    q.event_where(JOB_LIMIT, |e| {
        e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "concluded"
    });
    let jobs = q.ok("query-jobs", json!({}));
    eprintln!("{which:?}: query-jobs once concluded: {jobs}");
    assert_eq!(jobs[0]["id"], "c0");
    assert_eq!(jobs[0]["status"], "concluded");
    assert!(jobs[0].get("error").is_none(), "{jobs}");
    assert_exports_on(&mut q, &[("ea", "a")], "after finalize");
    q.ok("job-dismiss", json!({"id": "c0"}));
    q.event_where(JOB_LIMIT, |e| {
        e["event"] == "JOB_STATUS_CHANGE" && e["data"]["status"] == "null"
    });
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    assert_eq!(node_names(&mut q), ["a"], "the committed overlay stayed");
    w.wait_for_more(1024);
    the_base_holds_everything_written(&dir, st, q, w);
}

// ---------------------------------------------------------------------
// 8. Errors, in QEMU's words

fn snapshot_and_commit_errors_are_qemus_and_change_nothing(which: Impl) {
    let dir = TestDir::new("snap-errors");
    let (st, mut q) = start_disks(which, &dir, true);
    q.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": "a", "snapshot-file": s(&dir.path("s1.qcow2")),
               "snapshot-node-name": "s1", "format": "qcow2"}),
    );
    let x = dir.path("x.qcow2");
    let sync = |extra: Value| {
        let mut args =
            json!({"snapshot-file": s(&x), "snapshot-node-name": "x", "format": "qcow2"});
        args.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        args
    };
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        // `device` names a BlockBackend; an export's has no name.
        (
            "blockdev-snapshot-sync",
            sync(json!({"device": "a"})),
            "GenericError",
            "Cannot find device='a' nor node-name=''",
        ),
        (
            "blockdev-snapshot-sync",
            sync(json!({"node-name": "nope"})),
            "GenericError",
            "Cannot find device='' nor node-name='nope'",
        ),
        // Only the top of a chain takes an overlay.
        (
            "blockdev-snapshot-sync",
            sync(json!({"node-name": "a"})),
            "GenericError",
            "Node 'a' is busy: node is used as backing hd of 's1'",
        ),
        (
            "blockdev-snapshot-sync",
            json!({"node-name": "s1", "snapshot-file": s(&x), "snapshot-node-name": "b",
                   "format": "qcow2"}),
            "GenericError",
            "New overlay node-name already in use",
        ),
        (
            "block-commit",
            json!({"job-id": "c0", "device": "nope"}),
            "DeviceNotFound",
            "Device 'nope' not found",
        ),
        (
            "block-commit",
            json!({"job-id": "c0", "device": "b"}),
            "GenericError",
            "cannot commit an image into itself",
        ),
        (
            "job-complete",
            json!({"id": "c9"}),
            "GenericError",
            "Job not found",
        ),
        (
            "job-cancel",
            json!({"id": "c9"}),
            "GenericError",
            "Job not found",
        ),
        (
            "job-dismiss",
            json!({"id": "c9"}),
            "GenericError",
            "Job not found",
        ),
        (
            "block-job-complete",
            json!({"device": "c9"}),
            "DeviceNotActive",
            "Block job 'c9' not found",
        ),
    ];
    let nodes = node_names(&mut q);
    let mut wrong = Vec::new();
    for (cmd, args, class, desc) in cases {
        let (c, d) = q.err(cmd, args.clone());
        if (c.as_str(), d.as_str()) != (class, desc) {
            wrong.push(format!(
                "{cmd} {args}: got {c}: {d}; QEMU says {class}: {desc}"
            ));
        }
        assert_eq!(node_names(&mut q), nodes, "{cmd} {args} changed the graph");
        assert_exports_on(&mut q, &[("ea", "s1"), ("eb", "b")], cmd);
        assert!(!x.exists(), "{cmd} {args} created {}", x.display());
    }
    assert!(
        wrong.is_empty(),
        "errors not in QEMU's words:\n{}",
        wrong.join("\n")
    );
    stop_cleanly(st, q);
}

// ---------------------------------------------------------------------
// 9. Both snapshot kinds in one transaction

fn a_transaction_mixes_new_and_added_overlays_on_two_busy_exports(which: Impl) {
    let dir = TestDir::new("snap-mixed");
    let (st, mut q) = start_disks(which, &dir, true);
    let wa = writer_on(which, &dir, "a", 9);
    let wb = writer_on(which, &dir, "b", 10);
    let ovb = dir.path("ovb.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&dir.path("b.raw")),
        "-F",
        "raw",
        &s(&ovb),
    ]);
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "ovb",
               "file": {"driver": "file", "filename": s(&ovb)}, "backing": null}),
    );
    wa.wait_for_more(512);
    wb.wait_for_more(512);
    // The second action names no overlay node: nothing happens, and the
    // node blockdev-add made stays.
    let a1 = dir.path("a1.qcow2");
    let nodes = node_names(&mut q);
    let (class, desc) = q.err(
        "transaction",
        json!({"actions": [
            snap("a", &a1, "a1"),
            {"type": "blockdev-snapshot", "data": {"node": "b", "overlay": "nope"}},
        ]}),
    );
    eprintln!("{which:?}: blockdev-snapshot of a missing overlay: {class}: {desc}");
    assert_exports_on(&mut q, &[("ea", "a"), ("eb", "b")], "after the failure");
    assert_eq!(node_names(&mut q), nodes, "the failure changed the nodes");
    overlay_removed(which, &a1);
    wa.wait_for_more(512);
    wb.wait_for_more(512);
    q.ok(
        "transaction",
        json!({"actions": [
            snap("a", &a1, "a1"),
            {"type": "blockdev-snapshot", "data": {"node": "b", "overlay": "ovb"}},
        ]}),
    );
    assert_exports_on(
        &mut q,
        &[("ea", "a1"), ("eb", "ovb")],
        "after the transaction",
    );
    wa.wait_for_more(1024);
    wb.wait_for_more(1024);
    let (ma, _) = wa.finish();
    let (mb, _) = wb.finish();
    stop_cleanly(st, q);
    for (top, model, n) in [(&a1, ma, "a"), (&ovb, mb, "b")] {
        let reference = dir.path(&format!("{n}.ref"));
        write_reference(&reference, &model);
        assert_same(top, "qcow2", &reference, n);
        common::qemu_img::assert_clean(top);
        assert_eq!(chain(top), [s(top), s(&dir.path(&format!("{n}.raw")))]);
    }
    assert_eq!(
        (class.as_str(), desc.as_str()),
        (
            "GenericError",
            "Cannot find device='nope' nor node-name='nope'"
        ),
        "not in QEMU's words"
    );
}

//! I/O throttling end to end: `throttle-group` objects and `throttle`
//! filter nodes on qemu-storage-daemon's command line and over QMP, with
//! libblkio clients at QD32 measuring what passes. Rates are counted from
//! the completion times the client records, over windows after a warmup;
//! QEMU's leaky bucket lets a tenth of a second's worth pass at once, so a
//! 1 s window may hold the rate plus that.
//!
//! The tests measure rates, so they run one at a time (`serial`): two
//! daemons at thousands of requests per second on a 2-CPU machine would
//! measure each other.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::Completion;
use common::qmp::Qmp;
use common::*;
use serde_json::{json, Value};

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;
/// The client's queue depth throughout.
const DEPTH: usize = 32;
/// The null node's size: 1 GiB, as a number (qemu-storage-daemon's
/// null-co takes no size suffix).
const NULL_SIZE: &str = "1073741824";

/// The tests measure rates: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn s(p: &Path) -> String {
    p.to_str().expect("paths are UTF-8").to_string()
}

// ---------------------------------------------------------------------------
// Command lines

/// `--object throttle-group,id=ID,limits.K=V,...` for `limits` "K=V,...".
fn group_arg(id: &str, limits: &str) -> String {
    let mut a = format!("throttle-group,id={id}");
    for kv in limits.split(',').filter(|kv| !kv.is_empty()) {
        a.push_str(",limits.");
        a.push_str(kv);
    }
    a
}

fn export_arg(id: &str, node: &str, sock: &Path, iothread: Option<&str>) -> String {
    let mut a = format!(
        "type=vhost-user-blk,id={id},node-name={node},addr.type=unix,addr.path={},writable=on",
        s(sock)
    );
    if let Some(t) = iothread {
        a.push_str(",iothread=");
        a.push_str(t);
    }
    a
}

fn monitor_args(qmp: &Path) -> Vec<String> {
    vec![
        "--chardev".into(),
        format!("socket,id=m,path={},server=on,wait=off", s(qmp)),
        "--monitor".into(),
        "chardev=m".into(),
    ]
}

/// The brief's command line: group tg0 with `limits`, null node n0,
/// throttle node t0 over it, export e0 of t0 on `sock`, QMP on `qmp`.
fn null_throttled(limits: &str, sock: &Path, qmp: &Path) -> Vec<String> {
    let mut a = vec![
        "--object".into(),
        group_arg("tg0", limits),
        "--blockdev".into(),
        format!("driver=null-co,node-name=n0,size={NULL_SIZE}"),
        "--blockdev".into(),
        "driver=throttle,node-name=t0,throttle-group=tg0,file=n0".into(),
        "--export".into(),
        export_arg("e0", "t0", sock, None),
    ];
    a.extend(monitor_args(qmp));
    a
}

fn start(args: &[String], sock: &Path) -> Daemon {
    let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    Daemon::start_qsd(sock, &argv, |_| {})
}

/// A daemon serving the brief's command line, its QMP monitor connected.
struct Setup {
    dir: TestDir,
    d: Daemon,
    q: Qmp,
}

impl Setup {
    fn null(name: &str, limits: &str) -> Setup {
        let dir = TestDir::new(name);
        let (sock, qmp) = (dir.path("e0.sock"), dir.path("qmp.sock"));
        let d = start(&null_throttled(limits, &sock, &qmp), &sock);
        let q = Qmp::connect(&qmp);
        Setup { dir, d, q }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path("e0.sock")
    }
}

// ---------------------------------------------------------------------------
// QMP helpers

/// A number `node` shows in query-named-block-nodes.
fn node_stat(q: &mut Qmp, node: &str, member: &str) -> u64 {
    let n = q.node(node);
    n[member]
        .as_u64()
        .unwrap_or_else(|| panic!("node {node} has no {member}: {n}"))
}

fn queued(q: &mut Qmp, node: &str) -> u64 {
    node_stat(q, node, "x-throttle-queued")
}

fn limits_of(q: &mut Qmp, path: &str) -> Value {
    q.ok("qom-get", json!({"path": path, "property": "limits"}))
}

/// ThrottleLimits' 19 members with QEMU's defaults (no limit, bursts of
/// 1 s), `set` changed.
fn expected_limits(set: Value) -> Value {
    let mut m = serde_json::Map::new();
    for b in [
        "bps-total",
        "bps-read",
        "bps-write",
        "iops-total",
        "iops-read",
        "iops-write",
    ] {
        m.insert(b.into(), json!(0));
        m.insert(format!("{b}-max"), json!(0));
        m.insert(format!("{b}-max-length"), json!(1));
    }
    m.insert("iops-size".into(), json!(0));
    for (k, v) in set.as_object().unwrap() {
        assert!(m.contains_key(k), "{k} is no ThrottleLimits member");
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

// ---------------------------------------------------------------------------
// The load: a libblkio client keeping DEPTH requests in flight from its own
// thread, recording when each completes.

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

#[derive(Default)]
struct Shared {
    /// Stop submitting; then wait for what is in flight.
    stop: AtomicBool,
    /// How long, once stopped, to wait for the requests in flight.
    drain_ms: AtomicU64,
    submitted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    /// Completion times, in order.
    times: Mutex<Vec<Instant>>,
    /// An error of the client itself (not a request's status).
    error: Mutex<Option<String>>,
}

struct Load {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// When the first request was submitted (about).
    started: Instant,
}

/// What a load did, for counting after the fact.
struct Outcome {
    submitted: u64,
    completed: u64,
    failed: u64,
    times: Vec<Instant>,
    error: Option<String>,
}

impl Load {
    /// Run `op`s of `len` bytes at QD32 over `client`'s first queue,
    /// cycling through the disk, until stopped.
    fn start(client: Client, op: Op, len: usize) -> Load {
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || run_load(client, op, len, &sh));
        Load {
            shared,
            thread: Some(thread),
            started,
        }
    }

    /// Requests completed so far.
    fn completed(&self) -> u64 {
        self.shared.completed.load(Ordering::SeqCst)
    }

    fn submitted(&self) -> u64 {
        self.shared.submitted.load(Ordering::SeqCst)
    }

    /// Submit no more; wait up to `limit` for the requests in flight.
    fn stop_submitting(&self, limit: Duration) {
        self.shared
            .drain_ms
            .store(limit.as_millis() as u64, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Stop (if not yet), wait for the requests in flight (up to `limit`),
    /// and give what happened.
    fn finish(mut self, limit: Duration) -> Outcome {
        if !self.shared.stop.load(Ordering::SeqCst) {
            self.stop_submitting(limit);
        }
        self.thread.take().unwrap().join().expect("load thread");
        let sh = &self.shared;
        Outcome {
            submitted: sh.submitted.load(Ordering::SeqCst),
            completed: sh.completed.load(Ordering::SeqCst),
            failed: sh.failed.load(Ordering::SeqCst),
            times: std::mem::take(&mut *sh.times.lock().unwrap()),
            error: sh.error.lock().unwrap().clone(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.drain_ms.store(0, Ordering::SeqCst);
            self.shared.stop.store(true, Ordering::SeqCst);
            let _ = t.join();
        }
    }
}

fn run_load(mut c: Client, op: Op, len: usize, sh: &Shared) {
    assert!(DEPTH * len <= c.region.len, "buffers for every slot");
    let base = c.region.addr;
    let blocks = c.capacity() / len as u64;
    let mut q = c.queues.remove(0);
    let mut free: Vec<usize> = (0..DEPTH).collect();
    let mut in_flight = 0usize;
    let mut next = 0u64;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut drain_deadline = None;
    loop {
        if !sh.stop.load(Ordering::SeqCst) {
            while let Some(slot) = free.pop() {
                let off = (next % blocks) * len as u64;
                next += 1;
                let req = match op {
                    Op::Read => Req::Read(off, slot * len, len),
                    Op::Write => Req::Write(off, slot * len, len),
                };
                submit(&mut q, base, req, slot);
                in_flight += 1;
                sh.submitted.fetch_add(1, Ordering::SeqCst);
            }
        } else {
            if in_flight == 0 {
                break;
            }
            let deadline = *drain_deadline.get_or_insert_with(|| {
                Instant::now() + Duration::from_millis(sh.drain_ms.load(Ordering::SeqCst))
            });
            if Instant::now() >= deadline {
                break;
            }
        }
        let mut t = Duration::from_millis(20);
        match q.do_io(&mut comps, 1, Some(&mut t), None) {
            Ok(n) => {
                let now = Instant::now();
                let mut failed = 0;
                for x in &comps[..n] {
                    // SAFETY: do_io initialised the first `n` entries.
                    let comp = unsafe { x.assume_init_read() };
                    free.push(comp.user_data);
                    if comp.ret != 0 {
                        failed += 1;
                    }
                }
                in_flight -= n;
                sh.times.lock().unwrap().extend(std::iter::repeat_n(now, n));
                sh.failed.fetch_add(failed, Ordering::SeqCst);
                sh.completed.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.errno().raw_os_error() == libc::ETIME => {}
            Err(e) => {
                *sh.error.lock().unwrap() = Some(e.to_string());
                break;
            }
        }
    }
}

impl Outcome {
    /// Completions in [a, b).
    fn count(&self, a: Instant, b: Instant) -> usize {
        self.times.iter().filter(|t| **t >= a && **t < b).count()
    }

    /// Completions per second over [a, b).
    fn rate(&self, a: Instant, b: Instant) -> f64 {
        self.count(a, b) as f64 / (b - a).as_secs_f64()
    }

    /// The most completions in any window of `w`.
    fn max_in_window(&self, w: Duration) -> usize {
        self.busiest_window(w).0
    }

    /// The most completions in any window of `w`, and when that window
    /// begins (the first of them).
    fn busiest_window(&self, w: Duration) -> (usize, Option<Instant>) {
        let t = &self.times;
        let (mut i, mut best, mut at) = (0, 0, None);
        for j in 0..t.len() {
            while t[j] - t[i] >= w {
                i += 1;
            }
            if j - i + 1 > best {
                best = j - i + 1;
                at = Some(t[i]);
            }
        }
        (best, at)
    }

    /// Completions in each of `n` steps of `step` from `from`: the shape
    /// of the load over time, for messages.
    fn profile(&self, from: Instant, step: Duration, n: u32) -> Vec<usize> {
        (0..n)
            .map(|i| self.count(from + step * i, from + step * (i + 1)))
            .collect()
    }

    /// Nothing failed and nothing was left without a completion.
    fn assert_all_ok(&self) {
        assert!(self.error.is_none(), "client error: {:?}", self.error);
        assert_eq!(self.failed, 0, "{} request(s) failed", self.failed);
        assert_eq!(
            self.completed, self.submitted,
            "{} request(s) submitted, {} completed",
            self.submitted, self.completed
        );
    }
}

/// Within `tol` (a fraction) of `want`.
fn assert_near(what: &str, got: f64, want: f64, tol: f64) {
    eprintln!("{what}: {got:.1} (want {want} ±{:.0}%)", tol * 100.0);
    assert!(
        (got - want).abs() <= want * tol,
        "{what}: {got:.1}, not within ±{:.0}% of {want}",
        tol * 100.0
    );
}

fn sleep_until(t: Instant) {
    std::thread::sleep(t.saturating_duration_since(Instant::now()));
}

// ---------------------------------------------------------------------------
// Accuracy

/// Run a load against `sock` for a 1 s warmup and a 5 s window; the rate
/// (requests per second) over the window.
fn measured_rate(client: Client, op: Op, len: usize) -> f64 {
    let load = Load::start(client, op, len);
    let a = load.started + Duration::from_secs(1);
    let b = a + Duration::from_secs(5);
    sleep_until(b);
    let out = load.finish(Duration::from_secs(5));
    out.assert_all_ok();
    out.rate(a, b)
}

#[test]
fn accuracy_iops_total() {
    let _s = serial();
    let mut t = Setup::null("throttle-iops", "iops-total=2000");
    let iops = measured_rate(connect(&t.sock(), 1).unwrap(), Op::Read, 4 * KIB);
    assert_near("iops-total=2000: IOPS", iops, 2000.0, 0.05);
    assert!(node_stat(&mut t.q, "t0", "x-throttled-requests") > 0);
    assert!(t.d.stop().success());
}

#[test]
fn accuracy_bps_read() {
    let _s = serial();
    let t = Setup::null("throttle-bps", "bps-read=67108864");
    let len = 64 * KIB;
    let rate = measured_rate(connect(&t.sock(), 1).unwrap(), Op::Read, len);
    let bps = rate * len as f64;
    assert_near("bps-read=64 MiB/s: MiB/s", bps / MIB as f64, 64.0, 0.05);
    assert!(t.d.stop().success());
}

/// A burst rate for a burst length: QEMU's bucket holds max × length, so
/// the burst lasts until it is full (at 2000/s in and 500/s out: about
/// 2.5 s), then the rate is the average; a bucket kept full never lets a
/// burst through again.
#[test]
fn burst_allowed_once() {
    let _s = serial();
    let t = Setup::null(
        "throttle-burst",
        "iops-total=500,iops-total-max=2000,iops-total-max-length=2",
    );
    let load = Load::start(connect(&t.sock(), 1).unwrap(), Op::Read, 4 * KIB);
    let t0 = load.started;
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    sleep_until(at(10_500));
    let out = load.finish(Duration::from_secs(5));
    out.assert_all_ok();
    // The burst's end: after the last 100 ms of the first 5 s at 1500/s
    // or more. When it ends depends on the rate the burst really ran at
    // (the bucket fills at that rate less 500/s).
    let shape = out.profile(t0, Duration::from_millis(100), 105);
    let end = 1
        + (0..50)
            .rev()
            .find(|i| shape[*i] >= 150)
            .unwrap_or_else(|| panic!("no burst; per 100 ms: {shape:?}"));
    let end_ms = 100 * end as u64;
    let burst = out.rate(at(200), at(2_000));
    eprintln!("burst: {burst:.0}/s over 0.2-2 s, ended after {end_ms} ms");
    assert!(
        (1800.0..=2100.0).contains(&burst),
        "the burst ran at {burst:.0}/s, not close to 2000; per 100 ms: {shape:?}"
    );
    // The bucket (4000) full at 2000/s in and 500/s out after about 2.5 s,
    // a little more if the burst ran slower.
    assert!(
        (2_000..=3_500).contains(&end_ms),
        "the burst lasted {end_ms} ms; per 100 ms: {shape:?}"
    );
    let (a, b, c) = (at(end_ms + 500), at(end_ms + 3_500), at(end_ms + 6_500));
    assert_near("after the burst: IOPS", out.rate(a, b), 500.0, 0.05);
    assert_near("later: IOPS", out.rate(b, c), 500.0, 0.05);
    // No second burst: after the first, no 1 s window comes near the
    // burst rate. (A window may hold somewhat more than the rate: when the
    // client or the daemon did not run for a moment, the bucket, holding
    // 4000, lets the time lost be caught up at up to the burst rate.)
    let tail = Outcome {
        times: out.times.iter().copied().filter(|x| *x >= a).collect(),
        ..out
    };
    let (most, from) = tail.busiest_window(Duration::from_secs(1));
    let from = from.map(|x| x - t0).unwrap_or_default();
    eprintln!("burst: at most {most} in 1 s after it (from {from:?})");
    assert!(
        most <= 650,
        "{most} requests in one second after the burst (from {from:?}); per 100 ms: {shape:?}"
    );
    assert!(t.d.stop().success());
}

/// One group over two throttle nodes, each exported on its own iothread:
/// the two clients share the budget, fairly.
#[test]
fn group_of_two_exports_on_different_iothreads() {
    let _s = serial();
    let dir = TestDir::new("throttle-two");
    let (s0, s1, qmp) = (
        dir.path("e0.sock"),
        dir.path("e1.sock"),
        dir.path("qmp.sock"),
    );
    let mut args: Vec<String> = vec![
        "--object".into(),
        "iothread,id=io0".into(),
        "--object".into(),
        "iothread,id=io1".into(),
        "--object".into(),
        group_arg("tg0", "iops-total=2000"),
        "--blockdev".into(),
        format!("driver=null-co,node-name=n0,size={NULL_SIZE}"),
        "--blockdev".into(),
        format!("driver=null-co,node-name=n1,size={NULL_SIZE}"),
        "--blockdev".into(),
        "driver=throttle,node-name=t0,throttle-group=tg0,file=n0".into(),
        "--blockdev".into(),
        "driver=throttle,node-name=t1,throttle-group=tg0,file=n1".into(),
        "--export".into(),
        export_arg("e0", "t0", &s0, Some("io0")),
        "--export".into(),
        export_arg("e1", "t1", &s1, Some("io1")),
    ];
    args.extend(monitor_args(&qmp));
    let d = start(&args, &s0);
    let mut q = Qmp::connect(&qmp);
    let l0 = Load::start(connect(&s0, 1).unwrap(), Op::Read, 4 * KIB);
    let l1 = Load::start(connect(&s1, 1).unwrap(), Op::Read, 4 * KIB);
    let a = l1.started + Duration::from_secs(1);
    let b = a + Duration::from_secs(5);
    sleep_until(b);
    let (o0, o1) = (
        l0.finish(Duration::from_secs(5)),
        l1.finish(Duration::from_secs(5)),
    );
    o0.assert_all_ok();
    o1.assert_all_ok();
    let (r0, r1) = (o0.rate(a, b), o1.rate(a, b));
    eprintln!("two exports: {r0:.0} + {r1:.0} IOPS");
    assert_near("two exports: IOPS in sum", r0 + r1, 2000.0, 0.05);
    for (i, r) in [r0, r1].into_iter().enumerate() {
        assert!(
            r >= 0.35 * (r0 + r1),
            "export e{i} got {r:.0} of {:.0} IOPS",
            r0 + r1
        );
    }
    // Both members throttled, on their own iothreads.
    for t in ["t0", "t1"] {
        assert!(node_stat(&mut q, t, "x-throttled-requests") > 0, "{t}");
    }
    let names = thread_names(d.pid());
    assert!(
        names.iter().any(|n| n == "io0") && names.iter().any(|n| n == "io1"),
        "{names:?}"
    );
    assert!(d.stop().success());
}

/// qom-set changes the limits of a group in use; the load follows at once.
#[test]
fn live_qom_set() {
    let _s = serial();
    let mut t = Setup::null("throttle-qom-set", "iops-total=2000");
    let load = Load::start(connect(&t.sock(), 1).unwrap(), Op::Read, 4 * KIB);
    let a = load.started + Duration::from_secs(1);
    let b = a + Duration::from_secs(2);
    sleep_until(b);
    t.q.ok(
        "qom-set",
        json!({"path": "tg0", "property": "limits", "value": {"iops-total": 4000}}),
    );
    let set = Instant::now();
    let c = set + Duration::from_secs(5);
    sleep_until(c);
    let out = load.finish(Duration::from_secs(5));
    out.assert_all_ok();
    // Before: a sanity check over 2 s (accuracy_iops_total measures it);
    // after: the 5 s from the change on, the new buckets' first tenth of a
    // second (400) included.
    assert_near("before qom-set: IOPS", out.rate(a, b), 2000.0, 0.10);
    assert_near("after qom-set: IOPS", out.rate(set, c), 4000.0, 0.05);
    let want = expected_limits(json!({"iops-total": 4000}));
    assert_eq!(limits_of(&mut t.q, "tg0"), want);
    assert_eq!(limits_of(&mut t.q, "/objects/tg0"), want);
    assert_eq!(want.as_object().unwrap().len(), 19);
    assert!(t.d.stop().success());
}

// ---------------------------------------------------------------------------
// Drained sections, graph changes, export deletion and shutdown

/// At 200 IOPS the bucket lets 21 pass at once: no 1 s window may hold
/// more than the rate plus that, give or take the client's scheduling
/// (it stamps a completion when it gets to it: 15 is 75 ms late).
const LIMIT_200_WINDOW: usize = 200 + 21 + 15;

/// A drained section on the node below the filter, then on the filter
/// itself: it begins at once (the queued requests are parked, not waited
/// for), nothing reaches the node below while it lasts, and the requests
/// resume within the budget after it.
#[test]
fn drain_parks_queued_requests() {
    let _s = serial();
    let mut t = Setup::null("throttle-drain", "iops-total=200");
    let load = Load::start(connect(&t.sock(), 1).unwrap(), Op::Read, 4 * KIB);
    let q = &mut t.q;
    for node in ["n0", "t0"] {
        poll_until(Duration::from_secs(10), "the throttle queue fills", || {
            queued(q, "t0") >= 20
        });
        let begin = Instant::now();
        let info = q.ok("block-drained-begin", json!({"node-name": node}));
        let took = begin.elapsed();
        eprintln!("block-drained-begin {node}: {took:?} ({info})");
        assert!(
            took < Duration::from_millis(50),
            "block-drained-begin on {node} took {took:?} with requests queued"
        );
        let requests = node_stat(q, "n0", "x-requests");
        let done = load.completed();
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            assert_eq!(
                node_stat(q, "n0", "x-requests"),
                requests,
                "requests reached n0 while {node} was drained"
            );
            let parked = queued(q, "t0");
            assert!(
                parked >= 20,
                "only {parked} queued while {node} was drained"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q.ok("block-drained-end", json!({"node-name": node}));
        poll_until(
            Duration::from_secs(2),
            "the client goes on after the drained section",
            || load.completed() >= done + 20,
        );
    }
    // Some steady throttling after the second section.
    let settle = Instant::now() + Duration::from_secs(1);
    sleep_until(settle);
    let out = load.finish(Duration::from_secs(5));
    out.assert_all_ok();
    let most = out.max_in_window(Duration::from_secs(1));
    eprintln!("drain: {} requests, at most {most} in 1 s", out.times.len());
    assert!(
        most <= LIMIT_200_WINDOW,
        "{most} requests completed within one second (limit 200, burst 21)"
    );
    assert!(t.d.stop().success());
}

/// A raw image over a file node (f0, n0), the filter t0 over them in a
/// group of 200 IOPS, exported as e0; the daemon, its monitor and a
/// client writing at QD32 with the throttle queue full.
fn throttled_image(dir: &TestDir) -> (Daemon, Qmp, Load) {
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let (sock, qmp) = (dir.path("e0.sock"), dir.path("qmp.sock"));
    let mut args: Vec<String> = vec![
        "--object".into(),
        group_arg("tg0", "iops-total=200"),
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", s(&img)),
        "--blockdev".into(),
        "driver=raw,node-name=n0,file=f0".into(),
        "--blockdev".into(),
        "driver=throttle,node-name=t0,throttle-group=tg0,file=n0".into(),
        "--export".into(),
        export_arg("e0", "t0", &sock, None),
    ];
    args.extend(monitor_args(&qmp));
    let d = start(&args, &sock);
    let mut q = Qmp::connect(&qmp);
    let load = Load::start(connect(&sock, 1).unwrap(), Op::Write, 4 * KIB);
    poll_until(Duration::from_secs(10), "the throttle queue fills", || {
        queued(&mut q, "t0") >= 20
    });
    (d, q, load)
}

/// A snapshot of `node` as a transaction, timed; it must not take long
/// with requests queued.
fn snapshot_now(q: &mut Qmp, node: &str, snap: &Path) {
    let begin = Instant::now();
    q.ok(
        "transaction",
        json!({"actions": [{"type": "blockdev-snapshot-sync", "data": {
            "node-name": node, "snapshot-file": s(snap),
            "snapshot-node-name": "s0", "format": "qcow2"}}]}),
    );
    let took = begin.elapsed();
    eprintln!("snapshot of {node} under throttle: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "the snapshot of {node} took {took:?} with requests queued"
    );
}

/// Snapshot `target` (the filter `t0` or the raw node `n0` below it)
/// while writes wait in the throttle queue, let the client go on for a
/// while, and check what every snapshot of a throttled disk must give:
/// no write failed, the filter now sits on the overlay `s0` and the export
/// on the filter, and the overlay took the writes. Returns the busiest
/// second of completions.
fn snapshot_with_writes_queued(name: &str, target: &str) -> usize {
    let _s = serial();
    let dir = TestDir::new(name);
    let snap = dir.path("snap.qcow2");
    let (d, mut q, load) = throttled_image(&dir);
    let parked = queued(&mut q, "t0");
    snapshot_now(&mut q, target, &snap);
    let done = load.completed();
    poll_until(
        Duration::from_secs(2),
        "the client goes on after the snapshot",
        || load.completed() >= done + 50,
    );
    let out = load.finish(Duration::from_secs(5));
    let most = out.max_in_window(Duration::from_secs(1));
    eprintln!(
        "snapshot of {target} with {parked} queued: {} writes, {} failed, at most {most} in 1 s",
        out.completed, out.failed
    );
    out.assert_all_ok();
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "t0", "{exports}");
    let children = q.node("t0")["x-children"].clone();
    assert_eq!(children[0]["node-name"], "s0", "{children}");
    assert!(node_stat(&mut q, "s0", "x-requests") > 0);
    drop(q);
    assert!(d.stop().success());
    common::qemu_img::assert_clean(&snap);
    most
}

/// A snapshot of the raw node under the filter while writes wait in the
/// throttle queue (qemu-storage-daemon takes it: the overlay goes between
/// the filter and the raw node): the transaction's drained section does
/// not wait for the queue, and the writes go on at the limit into the
/// overlay.
#[test]
fn snapshot_under_throttle() {
    let most = snapshot_with_writes_queued("throttle-snapshot", "n0");
    assert!(
        most <= LIMIT_200_WINDOW,
        "{most} requests completed within one second (limit 200, burst 21)"
    );
}

/// The snapshot taken of the filter node itself (the export's root) is
/// one of the node it filters (ringblk's rule, unlike QEMU, which puts the
/// overlay on top and leaves the guest's writes unthrottled): the overlay
/// goes under the filter, the export stays on the filter, and the writes
/// that were waiting in the throttle queue complete, into the overlay
/// (qemu-storage-daemon 7.2, under the same load, fails none either).
#[test]
fn snapshot_of_the_filter_fails_no_queued_write() {
    snapshot_with_writes_queued("throttle-snapshot-top", "t0");
}

/// Active commit of the overlay under the filter back into its base, with
/// writes waiting in the throttle queue all along: the commit's own filter
/// goes under the throttle filter while the job runs (so the guest's
/// writes are copied too), and at the end the throttle filter sits on the
/// base, the export on the throttle filter, and no write failed. (Before,
/// the commit moved only BlockBackends: the throttle filter stayed on the
/// overlay and the guest's writes went around the job.)
#[test]
fn commit_under_the_filter_with_writes_queued() {
    let _s = serial();
    let dir = TestDir::new("throttle-commit");
    let snap = dir.path("snap.qcow2");
    let (d, mut q, load) = throttled_image(&dir);
    snapshot_now(&mut q, "n0", &snap);
    q.ok("block-commit", json!({"job-id": "c0", "device": "s0"}));
    let during = q.node("t0")["x-children"].clone();
    assert_ne!(
        during[0]["node-name"], "s0",
        "the job's filter is not under t0: {during}"
    );
    let limit = Duration::from_secs(60);
    q.event_where(limit, |e| e["event"] == "BLOCK_JOB_READY");
    q.ok("job-complete", json!({"id": "c0"}));
    let (done, _) = q.event_where(limit, |e| e["event"] == "BLOCK_JOB_COMPLETED");
    assert!(done["data"].get("error").is_none(), "commit failed: {done}");
    let after = load.completed();
    poll_until(
        Duration::from_secs(2),
        "the client goes on after the commit",
        || load.completed() >= after + 50,
    );
    let out = load.finish(Duration::from_secs(5));
    out.assert_all_ok();
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(exports[0]["node-name"], "t0", "{exports}");
    let children = q.node("t0")["x-children"].clone();
    assert_eq!(children[0]["node-name"], "n0", "{children}");
    drop(q);
    assert!(d.stop().success());
}

/// block-export-del mode=hard with a full throttle queue: every queued
/// request completes, successfully, at the limit.
#[test]
fn export_deletion_completes_queued_requests() {
    let _s = serial();
    let mut t = Setup::null("throttle-export-del", "iops-total=100");
    let load = Load::start(connect(&t.sock(), 1).unwrap(), Op::Read, 4 * KIB);
    poll_until(Duration::from_secs(10), "the throttle queue fills", || {
        queued(&mut t.q, "t0") >= 20
    });
    load.stop_submitting(Duration::from_secs(10));
    let parked = queued(&mut t.q, "t0");
    let waiting = load.submitted() - load.completed();
    let begin = Instant::now();
    t.q.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    let took = begin.elapsed();
    let out = load.finish(Duration::from_secs(10));
    eprintln!(
        "export deletion: {parked} queued ({waiting} in flight at the client), took {took:?}; \
         {} submitted, {} completed, {} failed",
        out.submitted, out.completed, out.failed
    );
    out.assert_all_ok();
    // At 100/s, with the bucket full, the queue takes parked / 100 s; a
    // few may go before the command arrives.
    let least = Duration::from_millis(10 * parked.saturating_sub(5));
    assert!(
        took >= least,
        "{parked} queued requests were let go in {took:?}: not at the limit"
    );
    let most = out.max_in_window(Duration::from_secs(1));
    assert!(most <= 100 + 11 + 10, "{most} requests within one second");
    assert!(t.d.stop().success());
}

/// SIGTERM with a full queue at 50 IOPS: the queue is released without
/// limits, the daemon exits at once, and the client loses nothing.
#[test]
fn sigterm_with_full_queue_exits_promptly() {
    let _s = serial();
    let mut t = Setup::null("throttle-sigterm", "iops-total=50");
    let load = Load::start(connect(&t.sock(), 1).unwrap(), Op::Read, 4 * KIB);
    poll_until(Duration::from_secs(10), "the throttle queue fills", || {
        queued(&mut t.q, "t0") >= 30
    });
    load.stop_submitting(Duration::from_secs(5));
    let parked = queued(&mut t.q, "t0");
    let pid = t.d.pid();
    let begin = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let Setup { d, q, dir } = t;
    let st = d.wait_exit(Duration::from_secs(30));
    let took = begin.elapsed();
    let out = load.finish(Duration::from_secs(5));
    eprintln!(
        "SIGTERM with {parked} queued: exit {st} after {took:?}; {} submitted, {} completed",
        out.submitted, out.completed
    );
    drop((q, dir));
    assert!(st.success(), "exit status {st}");
    assert!(
        took < Duration::from_secs(1),
        "the daemon took {took:?} to exit with {parked} queued at 50 IOPS"
    );
    out.assert_all_ok();
}

// ---------------------------------------------------------------------------
// Refused input

/// The client's read still succeeds and tg0's limits are what they were.
fn still_serving(q: &mut Qmp, c: &mut Client, limits: &Value, after: &str) {
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0, "I/O after {after}");
    assert_eq!(&limits_of(q, "tg0"), limits, "tg0's limits after {after}");
}

#[test]
fn bad_input() {
    let _s = serial();
    let mut t = Setup::null("throttle-bad", "iops-total=1000");
    let mut c = connect(&t.sock(), 1).unwrap();
    let q = &mut t.q;
    let limits = limits_of(q, "tg0");
    assert_eq!(limits, expected_limits(json!({"iops-total": 1000})));
    let add = |limits: Value| json!({"qom-type": "throttle-group", "id": "tg1", "limits": limits});
    let conflict =
        "bps/iops/max total values and read/write values cannot be used at the same time";
    let refused: Vec<(&str, Value, &str)> = vec![
        (
            "object-add",
            add(json!({"iops-total": 10, "iops-read": 5})),
            conflict,
        ),
        (
            "object-add",
            add(json!({"iops-size": 4096})),
            "iops size requires an iops value to be set",
        ),
        (
            "object-add",
            add(json!({"iops-total-max": 100})),
            "bps_max/iops_max require corresponding bps/iops values",
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 5}}),
            "attempt to add duplicate property 'tg0' to object (type 'container')",
        ),
        (
            "object-del",
            json!({"id": "tg0"}),
            "object 'tg0' is in use, can not be deleted",
        ),
        (
            "object-del",
            json!({"id": "nope"}),
            "object 'nope' not found",
        ),
        (
            "qom-set",
            json!({"path": "nope", "property": "limits", "value": {"iops-total": 5}}),
            "Device 'nope' not found",
        ),
        (
            "qom-set",
            json!({"path": "tg0", "property": "x-iops-total", "value": 5}),
            "Property cannot be set after initialization",
        ),
        (
            "qom-set",
            json!({"path": "tg0", "property": "limits",
                   "value": {"iops-read": 5}}),
            conflict,
        ),
        (
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t9",
                   "throttle-group": "nope", "file": "n9"}),
            "Throttle group 'nope' does not exist",
        ),
        (
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "t9", "file": "n9"}),
            "Parameter 'throttle-group' is missing",
        ),
    ];
    // A node of its own for the refused filters to sit on.
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n9", "size": 1 << 20}),
    );
    for (cmd, args, want) in refused {
        let (class, desc) = q.err(cmd, args.clone());
        assert_eq!(desc, want, "{cmd} {args}");
        if cmd == "qom-set" && want.starts_with("Device") {
            assert_eq!(class, "DeviceNotFound", "{cmd} {args}");
        }
        still_serving(q, &mut c, &limits, &format!("{cmd} {args}"));
    }
    // Nothing was left behind by the refusals.
    let (class, _) = q.err("qom-get", json!({"path": "tg1", "property": "limits"}));
    assert_eq!(class, "DeviceNotFound");
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "t9"),
        "{nodes}"
    );
    drop(c);
    assert!(t.d.stop().success());

    // The same conflict on the command line: refused at start.
    let dir = TestDir::new("throttle-bad-cli");
    let args = null_throttled(
        "iops-total=10,iops-read=5",
        &dir.path("e0.sock"),
        &dir.path("qmp.sock"),
    );
    let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let err = ringblk_refuses(&argv);
    assert!(err.contains(conflict), "{err}");
}

// ---------------------------------------------------------------------------
// qemu-storage-daemon as the reference

/// qemu-storage-daemon on `args` (which name a pid file `pidfile`), up
/// once the pid file exists; killed when dropped.
struct Qsd(Child);

impl Qsd {
    fn start(args: &[String], pidfile: &Path) -> Qsd {
        let mut child = Command::new("qemu-storage-daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is required (scripts/test installs it)");
        if let Err(e) = wait_ready(&mut child, Duration::from_secs(30), || {
            pidfile.exists().then_some(())
        }) {
            let _ = child.kill();
            panic!("qemu-storage-daemon {e}");
        }
        Qsd(child)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// accuracy_iops_total's command line under qemu-storage-daemon and under
/// ringblk, measured by the same client: both at the limit. And the same
/// qom-get answers for the same object-add, and the same refusals.
#[test]
fn qsd_reference() {
    let _s = serial();
    // Groups added over QMP: with `limits`, and with the flat x- aliases.
    let to_add = [
        json!({"qom-type": "throttle-group", "id": "tg1", "limits": {
            "iops-total": 1000, "iops-total-max": 3000, "iops-total-max-length": 4,
            "bps-read": 1048576, "bps-write-max": 0, "iops-size": 8192}}),
        json!({"qom-type": "throttle-group", "id": "tg2",
               "x-iops-read": 300, "x-iops-read-max": 600, "x-bps-write": 4096}),
    ];
    let refusals = [
        json!({"qom-type": "throttle-group", "id": "bad",
               "limits": {"bps-total": 10, "bps-write": 5}}),
        json!({"qom-type": "throttle-group", "id": "bad", "limits": {"iops-size": 512}}),
        json!({"qom-type": "throttle-group", "id": "bad", "limits": {"bps-read-max": 9}}),
        json!({"qom-type": "throttle-group", "id": "bad",
               "limits": {"iops-write": 9, "iops-write-max": 5}}),
        json!({"qom-type": "throttle-group", "id": "bad",
               "limits": {"iops-write": 9, "iops-write-max-length": 5}}),
    ];
    // What a daemon shows: its IOPS, qom-get of tg0 (from the command
    // line) and of each group added, and its refusals.
    type Seen = (f64, Vec<Value>, Vec<String>);
    let probe = |q: &mut Qmp, rate: f64| -> Seen {
        let mut limits = vec![limits_of(q, "tg0")];
        for add in &to_add {
            q.ok("object-add", add.clone());
            let id = add["id"].as_str().unwrap();
            limits.push(limits_of(q, &format!("/objects/{id}")));
        }
        let errs = refusals
            .iter()
            .map(|a| q.err("object-add", a.clone()).1)
            .collect();
        (rate, limits, errs)
    };

    let dir = TestDir::new("throttle-qsd");
    let (sock, qmp, pidfile) = (
        dir.path("e0.sock"),
        dir.path("qmp.sock"),
        dir.path("daemon.pid"),
    );
    let mut args = null_throttled("iops-total=2000", &sock, &qmp);
    args.push("--pidfile".into());
    args.push(s(&pidfile));

    let reference = {
        let qsd = Qsd::start(&args, &pidfile);
        let mut q = Qmp::connect(&qmp);
        let client = common::storage::connect_retrying(true, || connect(&sock, 1))
            .expect("connect to qemu-storage-daemon");
        let rate = measured_rate(client, Op::Read, 4 * KIB);
        let seen = probe(&mut q, rate);
        drop(qsd);
        seen
    };
    let _ = std::fs::remove_file(&pidfile);
    let ours = {
        let d = start(&args, &sock);
        let mut q = Qmp::connect(&qmp);
        let rate = measured_rate(connect(&sock, 1).unwrap(), Op::Read, 4 * KIB);
        let seen = probe(&mut q, rate);
        drop(q);
        assert!(d.stop().success());
        seen
    };
    assert_near("qemu-storage-daemon: IOPS", reference.0, 2000.0, 0.05);
    assert_near("ringblk: IOPS", ours.0, 2000.0, 0.05);
    // QEMU's members and defaults are what the tests here expect.
    assert_eq!(
        reference.1[0],
        expected_limits(json!({"iops-total": 2000})),
        "qemu-storage-daemon: qom-get tg0 limits"
    );
    for (i, id) in ["tg0", "tg1", "tg2"].iter().enumerate() {
        assert_eq!(ours.1[i], reference.1[i], "qom-get {id} limits");
    }
    assert_eq!(ours.2, reference.2, "object-add refusals");
}

// ---------------------------------------------------------------------------
// A guest

/// fio in a Linux guest (TCG) on a disk limited to 500 IOPS measures 500.
#[test]
fn guest_fio_500() {
    let _s = serial();
    let dir = TestDir::new("throttle-guest");
    let (sock, qmp) = (dir.path("e0.sock"), dir.path("qmp.sock"));
    let d = start(&null_throttled("iops-total=500", &sock, &qmp), &sock);
    let run = common::guest::run_guest(&sock, "fio-throttle", 1);
    assert!(run.passed(), "guest test failed; console above");
    let iops: f64 = run
        .console
        .lines()
        .find_map(|l| l.split("RB-THROTTLE-IOPS ").nth(1))
        .expect("fio's result on the console")
        .trim()
        .parse()
        .expect("fio's IOPS is a number");
    assert_near("guest fio at iops-total=500: IOPS", iops, 500.0, 0.05);
    assert!(d.stop().success());
}

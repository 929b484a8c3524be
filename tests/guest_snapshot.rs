//! A Linux guest (TCG, two queues) runs fio verify passes over its whole
//! disk while the host takes a live snapshot of it and later commits the
//! overlay back into the base and pivots the export onto it: the guest's
//! data checks out throughout, and the base image ends up holding exactly
//! what the guest last saw.

mod common;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::guest::run_guest_talking;
use common::qmp::Qmp;
use common::qsd::QsdArgs;
use common::storage::{Impl, Storage};
use common::*;
use serde_json::json;

const DISK: u64 = 64 << 20;
const JOB_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn a_guest_verifies_its_disk_through_a_live_snapshot_and_commit_on_ringblk() {
    a_guest_verifies_its_disk_through_a_live_snapshot_and_commit(Impl::Ringblk)
}

/// The reference run, on demand (`-- --ignored`): see tests/snapshot.rs.
#[test]
#[ignore = "reference run against qemu-storage-daemon; can hang in QEMU 7.2"]
fn a_guest_verifies_its_disk_through_a_live_snapshot_and_commit_on_qemu_storage_daemon() {
    a_guest_verifies_its_disk_through_a_live_snapshot_and_commit(Impl::Qsd)
}

/// Where the host is. Each step is taken as a fio pass starts (so it lands
/// while fio writes), and only once a whole pass ran after the previous
/// step (`after` is the last pass started by then): every layout of the
/// graph sees a full write-and-verify pass.
enum Step {
    Snapshot,
    Commit { after: u32 },
    Complete { after: u32 },
    Stop { after: u32 },
    Done,
}

/// `RB-ITER-n-START` / `RB-ITER-n-DONE` → (n, started).
fn marker(line: &str) -> Option<(u32, bool)> {
    let rest = line.trim().strip_prefix("RB-ITER-")?;
    let (n, what) = rest.split_once('-')?;
    Some((n.parse().ok()?, what == "START"))
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn a_guest_verifies_its_disk_through_a_live_snapshot_and_commit(which: Impl) {
    let dir = TestDir::new("guest-snap");
    let img = dir.path("a.raw");
    make_raw(&img, DISK);
    let sock = dir.path("a.sock");
    let qmp_sock = dir.path("qmp.sock");
    let args = QsdArgs::new()
        .iothread("io0")
        .raw("a", &img)
        .writable_export("ea", "a", &sock, "io0", 2)
        .monitor("mon0", &qmp_sock);
    let st = Storage::start(which, &dir.0, &args, &sock);
    let mut q = Qmp::connect(&qmp_sock);
    q.set_timeout(Duration::from_secs(10));
    let ov = dir.path("s1.qcow2");

    let mut step = Step::Snapshot;
    let mut last_started = 0u32;
    let mut failure: Option<String> = None;
    let mut log: Vec<String> = Vec::new();
    let run = run_guest_talking(&sock, "fio-snapshot", 2, |line, input| {
        let stop = |input: &mut dyn Write| {
            let _ = input.write_all(b"rb-host-stop\n");
            let _ = input.flush();
        };
        if line.contains("RB-FIO-FAILED") {
            stop(input);
            return;
        }
        let Some((n, started)) = marker(line) else {
            return;
        };
        if !started || matches!(step, Step::Done) {
            return;
        }
        last_started = n;
        // Pass n starts: act if a whole pass ran since the last step.
        let acted = catch_unwind(AssertUnwindSafe(|| match step {
            Step::Snapshot if n >= 2 => {
                q.ok(
                    "blockdev-snapshot-sync",
                    json!({"node-name": "a", "snapshot-file": ov.to_str().unwrap(),
                           "snapshot-node-name": "s1", "format": "qcow2",
                           "mode": "absolute-paths"}),
                );
                let e = q.ok("query-block-exports", json!({}));
                assert_eq!(e[0]["node-name"], "s1", "export not on the overlay: {e}");
                log.push(format!("snapshot as pass {n} started"));
                step = Step::Commit {
                    after: last_started,
                };
            }
            Step::Commit { after } if n > after + 1 => {
                q.ok("block-commit", json!({"job-id": "c0", "device": "s1"}));
                let (ready, _) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_READY");
                log.push(format!("commit started as pass {n} started: {ready}"));
                step = Step::Complete {
                    after: last_started,
                };
            }
            Step::Complete { after } if n > after + 1 => {
                q.ok("job-complete", json!({"id": "c0"}));
                let (done, _) = q.event_where(JOB_LIMIT, |e| e["event"] == "BLOCK_JOB_COMPLETED");
                assert!(done["data"].get("error").is_none(), "commit failed: {done}");
                let e = q.ok("query-block-exports", json!({}));
                assert_eq!(e[0]["node-name"], "a", "export not back on the base: {e}");
                log.push(format!("commit completed as pass {n} started: {done}"));
                step = Step::Stop {
                    after: last_started,
                };
            }
            Step::Stop { after } if n > after + 1 => {
                log.push(format!("stop as pass {n} started"));
                step = Step::Done;
            }
            _ => {}
        }));
        if let Err(e) = acted {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failure = Some(format!("host step as pass {n} started failed: {msg}"));
            step = Step::Done;
        }
        if matches!(step, Step::Done) {
            stop(input);
        }
    });
    eprintln!("{which:?}: host steps: {log:#?}");
    if let Some(f) = failure {
        panic!("{f}");
    }
    assert!(
        matches!(step, Step::Done),
        "the guest finished before the host's steps were done ({} of 4): {log:?}",
        log.len()
    );
    assert!(run.passed(), "guest test failed; console above");
    assert!(
        !run.console.contains("verify: bad"),
        "fio reported a verify mismatch"
    );
    let guest_md5 = run
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("RB-MD5 "))
        .expect("the guest printed no md5")
        .trim()
        .to_string();
    drop(q);
    assert!(st.stop().success(), "the daemon exited with an error");
    assert_eq!(
        md5(&img),
        guest_md5,
        "the base image differs from what the guest read last"
    );
    common::qemu_img::assert_clean(&ov);
}

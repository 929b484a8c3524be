//! Snapshots and commits on real files: transactions are all or nothing,
//! the snapshotted image's locks become a backing file's, and a commit
//! leaves the base holding everything the guest wrote.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::drain_tests::{eventually, gate_node, Gate, OnDrop};
use super::*;
use crate::error::ErrorKind;
use crate::formats::lock::ImageLock;
use crate::formats::CacheMode;
use crate::uring::{AlignedBuf, IoThread, IoVec};

const SIZE: u64 = 4 << 20;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/unit-tmp"));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(format!("snap-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A raw image of SIZE bytes, every byte `fill`, as a backend's root.
fn raw_disk(g: &Graph, name: &str, fill: u8) -> (PathBuf, Arc<BlockBackend>) {
    let path = scratch(name);
    std::fs::write(&path, vec![fill; SIZE as usize]).unwrap();
    let node = open_image(
        g,
        &ImageOptions {
            path: path.clone(),
            format: ImageFormat::Raw,
            read_only: false,
            cache: CacheMode::Writeback,
            block_size: 512,
            qcow2: Default::default(),
            force_share: false,
            backing: BackingPolicy::None,
            auto_names: true,
            lock_wait: Default::default(),
        },
    )
    .unwrap();
    let b = BlockBackend::new(name, node, false);
    (path, b)
}

fn io(t: &IoThread, b: &Arc<BlockBackend>, write: Option<u8>, offset: u64) -> Vec<u8> {
    let b = b.clone();
    t.handle().block_on(move || async move {
        let buf = IoVec::from_buf(AlignedBuf::zeroed(4096, 4096));
        if let Some(v) = write {
            buf.copy_from(&[v; 4096]);
            b.write(offset, &buf).await.unwrap();
        }
        b.read(offset, &buf).await.unwrap();
        let mut out = vec![0; 4096];
        buf.copy_to(&mut out);
        out
    })
}

fn sync(node: &Arc<Node>, file: &std::path::Path, mode: OverlayMode, name: &str) -> Action {
    Action::SnapshotSync {
        node: node.clone(),
        file: file.to_path_buf(),
        node_name: Some(name.into()),
        mode,
    }
}

fn node_names(g: &Graph) -> Vec<String> {
    let mut v: Vec<String> = g.all_nodes().iter().map(|n| n.name().to_string()).collect();
    v.sort();
    v
}

#[test]
fn a_failed_action_leaves_every_disk_and_file_as_it_was() {
    let g = Graph::new();
    let (_, a) = raw_disk(&g, "fail-a", 1);
    let (_, b) = raw_disk(&g, "fail-b", 2);
    let (ra, rb) = (a.root().unwrap(), b.root().unwrap());
    let before = node_names(&g);
    let ov_a = scratch("fail-ov-a");
    let missing = scratch("no-such-dir").join("ov-b.qcow2");
    let e = g
        .transaction(vec![
            sync(&ra, &ov_a, OverlayMode::AbsolutePaths, "fail-ova"),
            sync(&rb, &missing, OverlayMode::AbsolutePaths, "fail-ovb"),
        ])
        .unwrap_err();
    assert!(e.message().contains("Could not create"), "{e}");
    assert_eq!(e.kind(), ErrorKind::Io, "a folder that does not exist");
    assert!(!ov_a.exists(), "the first action's overlay file is removed");
    assert!(Arc::ptr_eq(&a.root().unwrap(), &ra) && Arc::ptr_eq(&b.root().unwrap(), &rb));
    assert!(!ra.is_read_only() && !rb.is_read_only(), "still writable");
    assert_eq!(node_names(&g), before);

    let e = g
        .transaction(vec![
            sync(&ra, &ov_a, OverlayMode::AbsolutePaths, "fail-ova"),
            Action::Abort,
        ])
        .unwrap_err();
    assert_eq!(e.message(), "Transaction aborted using Abort action");
    assert!(!ov_a.exists());
    assert_eq!(node_names(&g), before);
    // Not drained any more: I/O goes on.
    let t = IoThread::start("snap-fail", Duration::ZERO).unwrap();
    assert_eq!(io(&t, &a, Some(7), 0), vec![7; 4096]);
    assert_eq!(ra.quiesce_counter(), 0);
}

#[test]
fn a_snapshot_moves_writes_to_the_overlay_and_locks_the_image_as_a_backing_file() {
    let g = Graph::new();
    let (path, b) = raw_disk(&g, "snap", 5);
    let t = IoThread::start("snap-move", Duration::ZERO).unwrap();
    let old = b.root().unwrap();
    // Writable: nobody else may even read it consistently.
    let probe = || {
        let f = std::fs::File::open(&path).unwrap();
        ImageLock::for_open(true, false).apply(&f, &path)
    };
    assert!(probe().is_err());
    let ov = scratch("snap-ov");
    g.transaction(vec![sync(&old, &ov, OverlayMode::AbsolutePaths, "snap-ov")])
        .unwrap();
    let top = b.root().unwrap();
    assert_eq!(top.name(), "snap-ov");
    assert!(old.is_read_only());
    assert!(probe().is_ok(), "a read-only backing file shares reading");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert!(
        ImageLock::for_open(false, false).apply(&f, &path).is_err(),
        "but not writing"
    );
    drop(f);
    assert_eq!(io(&t, &b, Some(9), 8192), vec![9; 4096]);
    assert_eq!(io(&t, &b, None, 65536 * 3), vec![5; 4096], "read through");
    assert_eq!(
        std::fs::read(&path).unwrap()[8192],
        5,
        "the base is untouched"
    );

    // The same node again, and a name in use: refused, nothing changes.
    let ov2 = scratch("snap-ov2");
    let e = g
        .transaction(vec![
            sync(&top, &ov2, OverlayMode::AbsolutePaths, "snap-ov2"),
            sync(
                &top,
                &scratch("snap-ov3"),
                OverlayMode::AbsolutePaths,
                "snap-ov3",
            ),
        ])
        .unwrap_err();
    assert!(e.message().contains("twice"), "{e}");
    let e = g
        .transaction(vec![sync(
            &top,
            &ov2,
            OverlayMode::AbsolutePaths,
            "snap-ov",
        )])
        .unwrap_err();
    assert!(e.message().contains("already in use"), "{e}");
    assert!(!ov2.exists());
    let e = g
        .transaction(vec![sync(&old, &ov2, OverlayMode::AbsolutePaths, "x")])
        .unwrap_err();
    assert!(
        e.message().contains("used as backing hd"),
        "only the top: {e}"
    );
    drop(b);
    drop(top);
    drop(old);
    let (ok, out) = qemu_img_check(&ov);
    assert!(ok, "{out}");
}

fn qemu_img_check(p: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .expect("qemu-img is required");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_commit_pivots_onto_the_base_with_everything_written() {
    let g = Graph::new();
    let (path, b) = raw_disk(&g, "commit", 3);
    let t = IoThread::start("snap-commit", Duration::ZERO).unwrap();
    let base = b.root().unwrap();
    let ov = scratch("commit-ov");
    g.transaction(vec![sync(
        &base,
        &ov,
        OverlayMode::AbsolutePaths,
        "commit-ov",
    )])
    .unwrap();
    io(&t, &b, Some(4), 0);
    io(&t, &b, Some(6), SIZE - 4096);
    start_commit(CommitOptions {
        job_id: "unit-c0".into(),
        top: b.root().unwrap(),
        base: None,
        filter_node_name: None,
        auto_finalize: true,
        auto_dismiss: false,
    })
    .unwrap();
    assert_eq!(b.root().unwrap().driver_name(), "commit_top");
    // Written while the job runs: copied too.
    io(&t, &b, Some(8), 65536 * 10);
    eventually("the job to be ready", || {
        g.jobs().query_jobs()[0]["status"] == "ready"
    });
    g.jobs().complete("unit-c0").unwrap();
    assert_eq!(g.jobs().query_jobs()[0]["status"], "concluded");
    g.jobs().dismiss("unit-c0").unwrap();
    assert_eq!(g.jobs().query_jobs(), serde_json::json!([]));
    assert!(Arc::ptr_eq(&b.root().unwrap(), &base), "back on the base");
    assert!(g.find_node("commit-ov").is_none(), "the overlay closed");
    assert!(ov.exists(), "its file stays");
    io(&t, &b, Some(1), 4096);
    drop(b);
    drop(base);
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data[0], 4);
    assert_eq!(data[4096], 1);
    assert_eq!(data[65536 * 10], 8);
    assert_eq!(data[SIZE as usize - 1], 6);
    assert_eq!(data[65536 * 20], 3);
}

#[test]
fn a_commit_reopens_a_base_opened_read_only_for_writing() {
    let g = Graph::new();
    let base = scratch("ro-base");
    std::fs::write(&base, vec![2u8; SIZE as usize]).unwrap();
    let ov = scratch("ro-ov");
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&base)
        .args(["-F", "raw"])
        .arg(&ov)
        .status()
        .expect("qemu-img is required")
        .success();
    assert!(ok);
    let top = open_image(
        &g,
        &ImageOptions {
            path: ov.clone(),
            format: ImageFormat::Qcow2,
            read_only: false,
            cache: CacheMode::Writeback,
            block_size: 512,
            qcow2: Default::default(),
            force_share: false,
            backing: BackingPolicy::Any,
            auto_names: true,
            lock_wait: Default::default(),
        },
    )
    .unwrap();
    let base_node = top.child(ChildRole::Backing).unwrap();
    assert!(base_node.is_read_only());
    let b = BlockBackend::new("ro-commit", top, false);
    let t = IoThread::start("snap-ro", Duration::ZERO).unwrap();
    io(&t, &b, Some(0x5a), 65536);
    start_commit(CommitOptions {
        job_id: "unit-c1".into(),
        top: b.root().unwrap(),
        base: None,
        filter_node_name: None,
        auto_finalize: true,
        auto_dismiss: true,
    })
    .unwrap();
    assert!(!base_node.is_read_only(), "reopened for writing");
    eventually("the job to be ready", || {
        g.jobs().query_jobs()[0]["status"] == "ready"
    });
    g.jobs().complete("unit-c1").unwrap();
    assert_eq!(
        g.jobs().query_jobs(),
        serde_json::json!([]),
        "auto-dismissed"
    );
    assert!(Arc::ptr_eq(&b.root().unwrap(), &base_node));
    io(&t, &b, Some(0x77), 0);
    drop(b);
    drop(base_node);
    let data = std::fs::read(&base).unwrap();
    assert_eq!((data[0], data[65536], data[65536 * 2]), (0x77, 0x5a, 2));
}

/// Run `f` on a thread of its own; its result, or a failure naming `what`
/// if it has not returned within 20 s (it waits for something it must not).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} waited for another disk's request"))
}

#[test]
fn a_snapshot_and_a_commit_of_one_disk_do_not_wait_for_another() {
    let g = Graph::new();
    let (_, a) = raw_disk(&g, "iso-a", 1);
    // Disk b, in the same graph: its read hangs until the test ends.
    let gate = Arc::new(Gate::default());
    let b = BlockBackend::new("iso-b", gate_node(&g, "iso-b-node", &gate), false);
    let t = IoThread::start("snap-iso", Duration::ZERO).unwrap();
    let _unstick = OnDrop(|| gate.open());
    let (tx, rx) = std::sync::mpsc::channel();
    let bb = b.clone();
    t.handle().run(move || {
        crate::uring::spawn(async move {
            let buf = IoVec::from_buf(AlignedBuf::zeroed(4096, 4096));
            let _ = tx.send(bb.read(0, &buf).await.is_ok());
        });
    });
    eventually("b's read to be in flight", || b.in_flight() == 1);

    // Draining every node, as QEMU does, would wait for b's read forever.
    let base = a.root().unwrap();
    let (ga, root, ov) = (g.clone(), base.clone(), scratch("iso-ov"));
    within("a snapshot of disk a", move || {
        ga.transaction(vec![sync(&root, &ov, OverlayMode::AbsolutePaths, "iso-ov")])
    })
    .unwrap();
    io(&t, &a, Some(9), 0);
    start_commit(CommitOptions {
        job_id: "iso-c".into(),
        top: a.root().unwrap(),
        base: None,
        filter_node_name: None,
        auto_finalize: true,
        auto_dismiss: true,
    })
    .unwrap();
    eventually("the job to be ready", || {
        g.jobs().query_jobs()[0]["status"] == "ready"
    });
    let ga = g.clone();
    within("job-complete on disk a", move || {
        ga.jobs().complete("iso-c")
    })
    .unwrap();
    assert_eq!(g.jobs().query_jobs(), serde_json::json!([]));
    assert!(Arc::ptr_eq(&a.root().unwrap(), &base), "back on the base");
    assert_eq!(io(&t, &a, None, 0), vec![9; 4096]);
    assert_eq!(b.in_flight(), 1, "b's read was stuck all along");
    gate.open();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
}

//! Replies to QEMU-named QMP commands deserialize into QEMU's own types,
//! generated from its QAPI schema (the `qapi-qmp` crate), and carry the
//! members qemu-storage-daemon's replies carry for the same command line.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::qemu_img::qemu_img;
use common::qmp::Qmp;
use common::qsd::QsdArgs;
use common::*;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn command_line(dir: &TestDir) -> Vec<String> {
    let d = |f: &str| dir.path(f);
    QsdArgs::new()
        .iothread("io0")
        .file_node("f0", &d("plain.raw"))
        .blockdev("driver=raw,node-name=r0,file=f0")
        .file_node("qf", &d("top.qcow2"))
        .blockdev("driver=qcow2,node-name=q0,file=qf")
        .blockdev("driver=null-co,node-name=n0")
        .vhost_export("e0", "r0", &d("e0.sock"), "writable=on,iothread=io0")
        .vhost_export("e1", "q0", &d("e1.sock"), "iothread=io0")
        .monitor("m", &d("qmp.sock"))
        .build()
}

fn images(dir: &TestDir) {
    make_raw(&dir.path("plain.raw"), 16 << 20);
    make_raw(&dir.path("base.raw"), 16 << 20);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s(&dir.path("top.qcow2")),
    ]);
}

/// The replies to every QEMU-named query this test checks (Null where
/// the daemon does not have the command: qemu-storage-daemon 7.2 has no
/// query-iothreads).
fn queries(q: &mut Qmp) -> Vec<(&'static str, Value)> {
    [
        ("query-block-exports", json!({})),
        ("query-named-block-nodes", json!({})),
        ("query-named-block-nodes", json!({"flat": true})),
        ("query-blockstats", json!({})),
        ("query-blockstats", json!({"query-nodes": true})),
        ("query-iothreads", json!({})),
        ("query-version", json!({})),
    ]
    .into_iter()
    .map(|(c, args)| {
        let r = q.cmd(c, args);
        (c, r.get("return").cloned().unwrap_or(Value::Null))
    })
    .collect()
}

fn parses<T: DeserializeOwned>(what: &str, v: &Value) {
    if let Err(e) = serde_json::from_value::<T>(v.clone()) {
        panic!("{what} does not match QEMU's schema: {e}\n{v:#}");
    }
}

/// The top-level member names of every element of a list reply, without
/// ringblk's own `x-` members.
fn members(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| a.as_slice())
        .unwrap_or(std::slice::from_ref(v))
        .iter()
        .filter_map(|e| e.as_object())
        .flat_map(|o| o.keys().filter(|k| !k.starts_with("x-")).cloned())
        .collect()
}

#[test]
fn replies_match_qemus_schema_and_qemu_storage_daemons_members() {
    let dir = TestDir::new("qapi");
    images(&dir);
    let args = command_line(&dir);
    let d = Daemon::start_qsd(&dir.path("e0.sock"), &args, |_| {});
    let mut q = Qmp::connect(&dir.path("qmp.sock"));
    // Some I/O so statistics are not all zero.
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
    drop(c);
    let ours = queries(&mut q);
    for (cmd, reply) in &ours {
        assert!(!reply.is_null(), "{cmd} failed");
        match *cmd {
            "query-block-exports" => parses::<Vec<qapi_qmp::BlockExportInfo>>(cmd, reply),
            "query-named-block-nodes" => parses::<Vec<qapi_qmp::BlockDeviceInfo>>(cmd, reply),
            "query-blockstats" => parses::<Vec<qapi_qmp::BlockStats>>(cmd, reply),
            "query-iothreads" => parses::<Vec<qapi_qmp::IOThreadInfo>>(cmd, reply),
            "query-version" => parses::<qapi_qmp::VersionInfo>(cmd, reply),
            other => unreachable!("{other}"),
        }
    }
    drop(q);
    assert!(d.stop().success());

    // qemu-storage-daemon with the same command line, same queries.
    let mut qsd = KillOnDrop(
        Command::new("qemu-storage-daemon")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is required (scripts/test installs it)"),
    );
    let mut q = Qmp::connect_starting(
        &dir.path("qmp.sock"),
        &mut qsd.0,
        "qemu-storage-daemon",
        Duration::from_secs(20),
    );
    let theirs = queries(&mut q);
    drop(qsd);
    for ((cmd, mine), (_, reference)) in ours.iter().zip(&theirs) {
        let missing: Vec<String> = members(reference)
            .difference(&members(mine))
            .cloned()
            .collect();
        assert!(
            missing.is_empty(),
            "{cmd}: qemu-storage-daemon's reply has members ours lacks: {missing:?}\nours: {mine:#}\ntheirs: {reference:#}"
        );
    }
}

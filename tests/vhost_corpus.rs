//! Real frontends' messages, recorded through a relaying proxy: every one
//! must pass the daemon's decoder (the fuzz target's entry point). With
//! RINGBLK_RECORD_CORPUS=1 the frames are also written as fuzz seeds to
//! fuzz/corpus/vhost_user_msg/, and QEMU's are recorded too.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::recorder::{Frame, Recorder};
use common::*;
use vhost::vhost_user::message::FrontendReq;

const MIB: u64 = 1 << 20;

fn recording() -> bool {
    std::env::var_os("RINGBLK_RECORD_CORPUS").is_some()
}

fn save(prefix: &str, frames: &[Frame]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/vhost_user_msg");
    std::fs::create_dir_all(&dir).unwrap();
    for (k, f) in frames.iter().enumerate() {
        let name = FrontendReq::try_from(f.request())
            .map_or_else(|_| format!("req{}", f.request()), |r| format!("{r:?}"));
        std::fs::write(dir.join(format!("seed-{prefix}-{k:03}-{name}")), f.seed()).unwrap();
    }
}

fn assert_all_accepted(who: &str, frames: &[Frame]) {
    assert!(!frames.is_empty(), "{who} sent nothing");
    for f in frames {
        assert!(
            ringblk::fuzzing::vhost_user_msg(&f.seed()),
            "{who}: the decoder refuses request {} ({} fds, {} bytes)",
            f.request(),
            f.nfds,
            f.bytes.len()
        );
    }
}

#[test]
fn libblkio_messages_pass_the_decoder() {
    let dir = TestDir::new("corpus-blkio");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let rec = Recorder::start(&dir.path("proxy"), &d.sock);
    let mut c = connect(&rec.path, 1).expect("libblkio through the proxy");
    c.buf()[..4096].fill(0x3c);
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    assert_eq!(c.run(0, Req::Read(0, 4096, 4096)), 0);
    drop(c);
    let frames = rec.finish();
    assert_all_accepted("libblkio", &frames);
    if recording() {
        save("libblkio", &frames);
    }
}

/// QEMU's device setup and SeaBIOS's use of the disk (no guest kernel).
#[test]
fn qemu_messages_pass_the_decoder() {
    if !recording() {
        eprintln!("set RINGBLK_RECORD_CORPUS=1 to record QEMU's messages");
        return;
    }
    let dir = TestDir::new("corpus-qemu");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let rec = Recorder::start(&dir.path("proxy"), &d.sock);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "128M", "-nodefaults"])
        .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
        .args(["-machine", "memory-backend=mem", "-display", "none"])
        .arg("-chardev")
        .arg(format!("socket,id=vu,path={}", rec.path.display()))
        .args([
            "-device",
            "vhost-user-blk-pci,chardev=vu,num-queues=1,bootindex=1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64");
    // SeaBIOS drives the disk: wait for its queue to start (QEMU never
    // exits by itself).
    let started = d.log_shows_within("queue 0 started", Duration::from_secs(40));
    let _ = qemu.kill();
    let _ = qemu.wait();
    let frames = rec.finish();
    save("qemu", &frames);
    assert_all_accepted("QEMU", &frames);
    assert!(started, "QEMU's firmware never started a queue");
}

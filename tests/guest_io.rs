//! A Linux guest under QEMU uses ringblk as its disk.

mod common;

use common::guest::{run_guest, run_guest_with};
use common::*;

#[test]
fn guest_fio_verify_on_two_queues() {
    let dir = TestDir::new("guest-fio");
    let img = dir.path("disk.raw");
    make_raw(&img, 128 << 20);
    let d = Daemon::start_two_iothreads(&dir.path("sock"), &img, &["--serial", "ringblk-guest"]);
    let run = run_guest(&d.sock, "fio-verify", 2);
    assert!(run.passed(), "guest test failed; console above");
    assert!(
        !run.console.contains("verify: bad"),
        "fio reported a verify mismatch"
    );
    let log = d.stderr();
    assert!(
        log.contains("queue 0 started") && log.contains("queue 1 started"),
        "both virtqueues should have run"
    );
    assert!(
        log.contains("write cache to writethrough"),
        "the guest's write-through switch never arrived"
    );
    assert!(d.stop().success());
}

#[test]
fn guest_fio_verify_on_a_qcow2_image_with_a_backing_file() {
    let dir = TestDir::new("guest-qcow2");
    let base = dir.path("base.raw");
    make_raw(&base, 128 << 20);
    common::qemu_img::qemu_io("raw", &base, "write -P 0x5a 0 128M");
    let img = dir.path("disk.qcow2");
    common::qemu_img::qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
    ]);
    let d = Daemon::start_two_iothreads(&dir.path("sock"), &img, &["--serial", "ringblk-guest"]);
    let run = run_guest(&d.sock, "fio-verify", 2);
    assert!(run.passed(), "guest test failed; console above");
    assert!(d.stop().success());
    common::qemu_img::assert_clean(&img);
}

/// Online resize the guest sees: the guest waits; the host grows the disk
/// over QMP; QEMU gets CONFIG_CHANGE_MSG, re-reads the config and tells
/// the guest, whose /sys/block/vda/size grows; it writes the new last
/// sector, which the host then finds in the image.
#[test]
fn guest_sees_an_online_resize_and_uses_the_new_end() {
    use std::os::unix::fs::FileExt;
    let dir = TestDir::new("guest-resize");
    let img = dir.path("disk.qcow2");
    common::qemu_img::qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let qmp = dir.path("qmp");
    let d = Daemon::with_control(&dir, &img, &[]);
    let new_size: u64 = 96 << 20;
    let mut resized = false;
    let run = run_guest_with(&d.sock, "resize", 1, |line| {
        if line.contains("RESIZE-READY") && !resized {
            let mut q = common::qmp::Qmp::connect(&qmp);
            q.ok(
                "block_resize",
                serde_json::json!({"export": "vda", "size": new_size}),
            );
            resized = true;
        }
    });
    assert!(resized, "the guest never got ready; console above");
    assert!(run.passed(), "guest test failed; console above");
    assert!(
        run.console
            .contains(&format!("guest sees {} sectors", new_size / 512)),
        "guest saw a different size"
    );
    assert!(
        d.log_shows("sent CONFIG_CHANGE_MSG"),
        "no config-change message was sent"
    );
    assert!(d.stop().success());
    common::qemu_img::assert_clean(&img);
    let want = format!("ringblk-resize-{}", new_size / 512);
    let mut got = vec![0u8; want.len()];
    common::qemu_img::flatten(&img, &dir.path("flat.raw"))
        .read_exact_at(&mut got, new_size - 512)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

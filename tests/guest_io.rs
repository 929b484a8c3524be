//! A Linux guest under QEMU uses ringblk as its disk.

mod common;

use common::guest::run_guest;
use common::*;

#[test]
fn guest_fio_verify_on_two_queues() {
    let dir = TestDir::new("guest-fio");
    let img = dir.path("disk.raw");
    make_raw(&img, 128 << 20);
    let d = Daemon::start(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--num-queues",
            "2",
            "--serial",
            "ringblk-guest",
        ],
    );
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
    let d = Daemon::start(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--num-queues",
            "2",
            "--serial",
            "ringblk-guest",
        ],
    );
    let run = run_guest(&d.sock, "fio-verify", 2);
    assert!(run.passed(), "guest test failed; console above");
    assert!(d.stop().success());
    common::qemu_img::assert_clean(&img);
}

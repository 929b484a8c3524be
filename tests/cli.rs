//! The command line: defaults, help, and clear errors for bad input.

mod common;

use std::process::Command;

use common::*;

/// Run ringblk to completion; a run that should have been refused but
/// serves instead is killed after 30 s and fails the test.
fn ringblk(args: &[&str]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out,
        Err(_) => {
            // kill(2) on our own child, which should have exited.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("ringblk {args:?} did not exit");
        }
    }
}

#[test]
fn serve_without_an_image_creates_one_and_prints_how_to_attach_qemu() {
    let dir = TestDir::new("default-image");
    let d = Daemon::start_in(&dir.path("sock"), &[], Some(&dir.0));
    let img = dir.path("ringblk.qcow2");
    assert!(img.exists(), "no default image");
    assert!(d.stdout.contains("created"), "{}", d.stdout);
    assert!(d.stdout.contains("vhost-user-blk-pci"), "{}", d.stdout);
    assert!(d.stdout.contains("memory-backend-memfd"), "{}", d.stdout);
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.capacity(), 1 << 30);
    c.buf()[..512].fill(1);
    assert_eq!(c.run(0, Req::Write(0, 0, 512)), 0);
    drop(c);
    assert!(d.stop().success());
    // A second start reuses the image (and says so) rather than replacing it.
    let d = Daemon::start_in(&dir.path("sock"), &[], Some(&dir.0));
    assert!(d.stdout.contains("existing"), "{}", d.stdout);
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.run(0, Req::Read(0, 0, 512)), 0);
    assert!(c.buf()[..512].iter().all(|&b| b == 1));
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn help_documents_every_flag() {
    let out = ringblk(&["serve", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socket",
        "--image",
        "--format",
        "--null",
        "--num-queues",
        "--iothreads",
        "--queue-size",
        "--read-only",
        "--cache",
        "--serial",
        "--logical-block-size",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--queue-size", "100"], "power of two"),
        (&["serve", "--num-queues", "0"], "num-queues"),
        (&["serve", "--iothreads", "0"], "iothreads"),
        (&["serve", "--logical-block-size", "1024"], "512 or 4096"),
        (&["serve", "--null", "12X"], "suffix"),
        (
            &["serve", "--null", "1G", "--image", "x.img"],
            "cannot be used with",
        ),
        (
            &["serve", "--serial", "a-serial-that-is-far-too-long"],
            "longer than 20",
        ),
        (&["serve", "--cache", "sometimes"], "invalid value"),
    ];
    for (args, want) in cases {
        let out = ringblk(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
    }
}

#[test]
fn unusable_images_are_refused_with_their_name() {
    let dir = TestDir::new("bad-images");
    let sock = dir.path("sock");
    let missing = dir.path("missing.img");
    let out = ringblk(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.img"));

    // A qcow2 feature we do not implement: refused, naming image and feature.
    let q = dir.path("disk.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o", "extended_l2=on"])
        .arg(&q)
        .arg("16M")
        .output();
    assert!(
        made.is_ok_and(|o| o.status.success()),
        "qemu-img is required (scripts/test installs it)"
    );
    let out = ringblk(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        q.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("extended L2") && err.contains("disk.qcow2"),
        "{err}"
    );

    // An image smaller than one logical block.
    let tiny = dir.path("tiny.img");
    make_raw(&tiny, 100);
    let out = ringblk(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        tiny.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller than one"));
}

#[test]
fn a_live_socket_is_not_stolen() {
    let dir = TestDir::new("live-socket");
    let d = Daemon::start(&dir.path("sock"), &["--null", "1M"]);
    let out = ringblk(&[
        "serve",
        "--socket",
        d.sock.to_str().unwrap(),
        "--null",
        "1M",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process is listening"));
    // The first daemon still serves.
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.run(0, Req::Read(0, 0, 512)), 0);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn logical_block_size_4096_is_advertised() {
    let dir = TestDir::new("lbs");
    let img = dir.path("disk.raw");
    make_raw(&img, 1 << 20);
    let d = Daemon::start(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--logical-block-size",
            "4096",
        ],
    );
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.blkio.get_i32("request-alignment").unwrap(), 4096);
    c.buf()[..4096].fill(9);
    assert_eq!(c.run(0, Req::Write(4096, 0, 4096)), 0);
    assert_eq!(c.run(0, Req::Read(4096, 0, 4096)), 0);
    drop(c);
    assert!(d.stop().success());
}

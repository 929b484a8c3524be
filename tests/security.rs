//! What a hostile guest or a neighbouring process must never achieve: the
//! probed-format attack (CVE-2008-2004), two writers on one image, and
//! planted socket paths. Real daemon, libblkio, qemu-img, qemu-io and
//! qemu-storage-daemon.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::qemu_img::qemu_img;
use common::qsd::QsdArgs;
use common::*;

const MIB: u64 = 1 << 20;

/// Run `ringblk serve ARGS` expecting it to refuse to start; its stderr.
fn refused(args: &[&str]) -> String {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    ringblk_refuses(&all)
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is required (scripts/test installs it): {e}"))
}

fn stderr_of(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The guest writes a real qcow2 header naming a host file into sector 0
/// of an image whose format was probed: refused, and after a restart with
/// the same command line the disk is still raw and shows no host data.
#[test]
fn probed_raw_image_refuses_a_header_naming_a_host_file() {
    let dir = TestDir::new("probe-attack");
    let secret = dir.path("secret");
    std::fs::write(&secret, b"TOP-SECRET-HOST-DATA".repeat(50_000)).unwrap();
    let evil = dir.path("evil.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&evil),
        "1M",
    ]);
    let mut header = std::fs::read(&evil).unwrap();
    header.resize(header.len().next_multiple_of(4096), 0);
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let args = ["--image", s(&img)];

    let d = Daemon::start(&dir.path("sock"), &args);
    assert!(
        d.stdout
            .contains("format probed as raw; give --format raw to pin it"),
        "the banner says the format was probed:\n{}",
        d.stdout
    );
    let mut c = connect(&d.sock, 1).unwrap();
    c.buf()[..header.len()].copy_from_slice(&header);
    let ret = c.run(0, Req::Write(0, 0, header.len()));
    assert!(ret < 0, "the header write must fail, got {ret}");
    // An ordinary boot sector is still written.
    c.buf()[..4096].fill(0);
    c.buf()[510] = 0x55;
    c.buf()[511] = 0xaa;
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    // Writes elsewhere are untouched by the rule.
    c.buf()[..4096].copy_from_slice(&header[..4096]);
    assert_eq!(c.run(0, Req::Write(MIB, 0, 4096)), 0);
    drop(c);
    assert!(d.log_shows("look like qcow/qcow2"), "{}", d.stderr());
    assert!(d.stop().success());

    // Same command line again: still raw, no host data anywhere in reach.
    let d = Daemon::start(&dir.path("sock"), &args);
    assert!(d.stdout.contains("format probed as raw"), "{}", d.stdout);
    let mut c = connect(&d.sock, 1).unwrap();
    // Two reads: one segment may carry at most size_max (1 MiB).
    let mut data = Vec::new();
    for at in [0, MIB] {
        assert_eq!(c.run(0, Req::Read(at, 0, MIB as usize)), 0);
        data.extend_from_slice(&c.buf()[..MIB as usize]);
    }
    assert_eq!(&data[510..512], &[0x55, 0xaa], "the boot sector was kept");
    assert!(
        !data.windows(20).any(|w| w == b"TOP-SECRET-HOST-DATA"),
        "host data reached the guest"
    );
    drop(c);
    assert!(d.stop().success());

    // With the format given, the guest owns its whole disk.
    let d = Daemon::start(&dir.path("sock"), &["--image", s(&img), "--format", "raw"]);
    assert!(!d.stdout.contains("probed"), "{}", d.stdout);
    let mut c = connect(&d.sock, 1).unwrap();
    c.buf()[..header.len()].copy_from_slice(&header);
    assert_eq!(c.run(0, Req::Write(0, 0, header.len())), 0);
    drop(c);
    assert!(d.stop().success());
    let written = std::fs::read(&img).unwrap();
    assert_eq!(&written[..header.len()], &header[..]);
}

/// qemu-storage-daemon holding `img` (format `fmt`) writable; killed on drop.
struct Qsd(Child);

impl Qsd {
    fn start(dir: &TestDir, img: &Path, fmt: &str) -> Qsd {
        let pidfile = dir.path(&format!("qsd-{fmt}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let sock = dir.path(&format!("qsd-{fmt}.sock"));
        let args = QsdArgs::new()
            .image(fmt, "n0", img)
            .vhost_export("e0", "n0", &sock, "writable=on")
            .pidfile(&pidfile);
        let child = Command::new("qemu-storage-daemon")
            .args(args.build())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is required (scripts/test installs it)");
        let mut q = Qsd(child);
        // The pid file is written once every option has been processed.
        wait_ready(&mut q.0, Duration::from_secs(20), || {
            pidfile.exists().then_some(())
        })
        .unwrap_or_else(|e| panic!("qemu-storage-daemon {e}"));
        q
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn image_locks_are_seen_by_qemu_tools_and_other_daemons() {
    let dir = TestDir::new("locks");
    let qcow = dir.path("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&qcow), "16M"]);
    let raw = dir.path("disk.raw");
    make_raw(&raw, 16 * MIB);

    for (img, fmt) in [(&qcow, "qcow2"), (&raw, "raw")] {
        let d = Daemon::start(&dir.path("sock"), &["--image", s(img), "--format", fmt]);
        // A second ringblk, writable or read-only.
        let e = refused(&["--socket", s(&dir.path("sock2")), "--image", s(img)]);
        assert!(
            e.contains("image is locked") && e.contains("\"write\""),
            "{fmt}: {e}"
        );
        let e = refused(&[
            "--socket",
            s(&dir.path("sock2")),
            "--image",
            s(img),
            "--read-only",
        ]);
        assert!(e.contains("shared \"write\" lock"), "{fmt}: {e}");
        // qemu-io as a writer.
        let o = tool("qemu-io", &["-f", fmt, "-c", "write 0 4k", s(img)]);
        assert!(
            stderr_of(&o).contains("Failed to get \"write\" lock"),
            "{fmt}: qemu-io wrote beside ringblk: {}",
            stderr_of(&o)
        );
        // qemu-img as against a running QEMU: qcow2 info needs -U.
        let o = tool("qemu-img", &["info", "-f", fmt, s(img)]);
        if fmt == "qcow2" {
            assert!(!o.status.success());
            assert!(
                stderr_of(&o).contains("Failed to get shared \"write\" lock"),
                "{}",
                stderr_of(&o)
            );
        }
        let o = tool("qemu-img", &["info", "-U", "-f", fmt, s(img)]);
        assert!(o.status.success(), "{}", stderr_of(&o));
        // The daemon serves on, unharmed.
        let mut c = connect(&d.sock, 1).unwrap();
        assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
        drop(c);
        assert!(d.stop().success());
        // Locks went with the daemon.
        let o = tool("qemu-io", &["-f", fmt, "-c", "write 0 4k", s(img)]);
        assert!(o.status.success(), "{fmt}: {}", stderr_of(&o));
    }

    // ringblk sees qemu-storage-daemon's locks.
    for (img, fmt, needle) in [
        (&qcow, "qcow2", "failed to get \"write\" lock"),
        (&raw, "raw", "failed to get shared \"write\" lock"),
    ] {
        let qsd = Qsd::start(&dir, img, fmt);
        let e = refused(&["--socket", s(&dir.path("sock")), "--image", s(img)]);
        assert!(e.contains(needle), "{fmt}: {e}");
        if fmt == "qcow2" {
            // Read-only inspection beside a writer needs --force-share.
            let e = refused(&[
                "--socket",
                s(&dir.path("sock")),
                "--image",
                s(img),
                "--read-only",
            ]);
            assert!(e.contains("shared \"write\" lock"), "{e}");
            let d = Daemon::start(
                &dir.path("sock"),
                &["--image", s(img), "--read-only", "--force-share"],
            );
            let mut c = connect_read_only(&d.sock).unwrap();
            assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
            drop(c);
            assert!(d.stop().success());
        }
        drop(qsd);
    }

    // --force-share is for read-only use only.
    let e = refused(&["--image", s(&raw), "--force-share"]);
    assert!(e.contains("--read-only"), "{e}");
}

/// Backing files are locked as QEMU locks them: readable by others, never
/// written while an overlay uses them.
#[test]
fn backing_files_are_locked_against_writers() {
    let dir = TestDir::new("backing-locks");
    let base = dir.path("base.raw");
    make_raw(&base, 16 * MIB);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    let d = Daemon::start(&dir.path("sock"), &["--image", s(&top)]);
    let o = tool("qemu-io", &["-f", "raw", "-c", "write 0 4k", s(&base)]);
    assert!(
        stderr_of(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr_of(&o)
    );
    let o = tool("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", s(&base)]);
    assert!(
        o.status.success(),
        "a reader of the backing file: {}",
        stderr_of(&o)
    );
    assert!(d.stop().success());
}

#[test]
fn sockets_are_private_and_never_replace_other_files() {
    let dir = TestDir::new("sockets");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;

    let d = Daemon::with_control(&dir, &img, &[]);
    assert_eq!(mode(&d.sock), 0o600, "vhost-user socket");
    assert_eq!(mode(&dir.path("qmp")), 0o600, "control socket");
    assert!(d.stop().success());
    assert!(
        !dir.path("sock").exists(),
        "the socket goes with the daemon"
    );

    let d = Daemon::start(
        &dir.path("sock"),
        &["--image", s(&img), "--socket-mode", "0660"],
    );
    assert_eq!(mode(&d.sock), 0o660);
    assert!(d.stop().success());

    // A planted symlink is not followed.
    let link = dir.path("link.sock");
    std::os::unix::fs::symlink(dir.path("target.sock"), &link).unwrap();
    let e = refused(&["--socket", s(&link), "--image", s(&img)]);
    assert!(e.contains("symbolic link"), "{e}");
    assert!(!dir.path("target.sock").exists());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    // A regular file in the way is left alone.
    let file = dir.path("file.sock");
    std::fs::write(&file, b"someone's data").unwrap();
    let e = refused(&["--socket", s(&file), "--image", s(&img)]);
    assert!(e.contains("not a socket"), "{e}");
    let ctl = refused(&[
        "--socket",
        s(&dir.path("sock")),
        "--control",
        s(&file),
        "--image",
        s(&img),
    ]);
    assert!(ctl.contains("not a socket"), "{ctl}");
    assert_eq!(std::fs::read(&file).unwrap(), b"someone's data");

    // A stale socket (its owner died) is replaced.
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(std::fs::symlink_metadata(&stale)
        .unwrap()
        .file_type()
        .is_socket());
    let d = Daemon::start(&stale, &["--image", s(&img)]);
    assert!(connect(&d.sock, 1).is_ok());
    assert!(d.stop().success());
}

/// A qcow2 from an untrusted source may name any host file as its backing
/// file; --backing-policy keeps it to its own folder, or to none at all.
#[test]
fn backing_policy_keeps_untrusted_images_in_their_folder() {
    let dir = TestDir::new("backing-policy");
    std::fs::create_dir(dir.path("vm")).unwrap();
    std::fs::write(dir.path("secret.raw"), vec![0x5e; MIB as usize]).unwrap();
    make_raw(&dir.path("vm/base.raw"), MIB);
    std::os::unix::fs::symlink("../secret.raw", dir.path("vm/link.raw")).unwrap();
    let overlay = |name: &str, backing: &str| {
        let p = dir.path(&format!("vm/{name}"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "raw",
            s(&p),
            "1M",
        ]);
        p
    };
    let escaping = overlay("escape.qcow2", "../secret.raw");
    let absolute = overlay("absolute.qcow2", s(&dir.path("secret.raw")));
    let via_link = overlay("link.qcow2", "link.raw");
    let inside = overlay("inside.qcow2", "base.raw");
    let sock = dir.path("sock");

    for img in [&escaping, &absolute, &via_link] {
        let e = refused(&[
            "--socket",
            s(&sock),
            "--image",
            s(img),
            "--backing-policy",
            "same-dir",
        ]);
        assert!(
            e.contains("not inside the image's folder"),
            "{}: {e}",
            img.display()
        );
    }
    let d = Daemon::start(
        &sock,
        &["--image", s(&inside), "--backing-policy", "same-dir"],
    );
    assert!(d.stop().success());
    let e = refused(&[
        "--socket",
        s(&sock),
        "--image",
        s(&inside),
        "--backing-policy",
        "none",
    ]);
    assert!(e.contains("backing policy is 'none'"), "{e}");
    // The default follows QEMU: the image's word is taken.
    let d = Daemon::start(&sock, &["--image", s(&escaping)]);
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0x5e));
    drop(c);
    assert!(d.stop().success());
}

/// A FIFO named as the image or as a backing file is refused at once; it
/// would otherwise block the open, with SIGTERM blocked.
#[test]
fn fifos_are_refused_not_waited_for() {
    let dir = TestDir::new("fifo");
    let fifo = dir.path("pipe");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "pipe",
        "-F",
        "raw",
        s(&top),
        "1M",
    ]);
    let sock = dir.path("sock");
    let e = refused(&["--socket", s(&sock), "--image", s(&top)]);
    assert!(e.contains("not a regular file or block device"), "{e}");
    for format in ["auto", "raw"] {
        let e = refused(&[
            "--socket",
            s(&sock),
            "--image",
            s(&fifo),
            "--format",
            format,
        ]);
        assert!(
            e.contains("not a regular file or block device"),
            "{format}: {e}"
        );
    }
}

//! The control socket driven by QMP clients nobody here wrote: the
//! `qemu.qmp` Python library (async client, legacy API) and `qmp-shell`.
//! scripts/test installs them into target/qmp-venv.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

fn venv_bin(tool: &str) -> PathBuf {
    let venv = std::env::var("RINGBLK_QMP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/qmp-venv"));
    let p = venv.join("bin").join(tool);
    assert!(
        p.exists(),
        "{} is missing: run scripts/test, which installs qemu.qmp into {}",
        p.display(),
        venv.display()
    );
    p
}

#[test]
fn qemu_qmp_library_and_qmp_shell_work() {
    let dir = TestDir::new("qmp-python");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 << 20);
    let qmp = dir.path("qmp");
    let d = Daemon::with_control(&dir, &img, &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/qemu_qmp_client.py");
    let out = Command::new(venv_bin("python"))
        .arg(&script)
        .arg(&qmp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu.qmp client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut shell = Command::new(venv_bin("qmp-shell"))
        .arg(&qmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-block-exports\nblock_resize export=vda size=33554432\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"id\": \"vda\""), "{text}");
    assert!(!text.contains("error"), "{text}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
    assert!(d.stop().success());
}

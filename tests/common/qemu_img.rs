//! qemu-img and qemu-io, the reference tools for image interoperability.

use std::path::Path;
use std::process::{Command, Output};

fn run(tool: &str, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required (scripts/test installs it): {e}"));
    out
}

/// qemu-img with `args`; panics with its output unless it succeeds.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run("qemu-img", args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `qemu-img check`: (exit code, output). 0 clean, 2 corrupt, 3 leaks.
pub fn check(img: &Path) -> (i32, String) {
    let out = run("qemu-img", &["check", img.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn assert_clean(img: &Path) {
    let (code, out) = check(img);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", img.display());
    assert!(
        !out.contains("leaked"),
        "leaks in {}:\n{out}",
        img.display()
    );
}

/// What a reader of `img` sees, written as a raw file at `out` by
/// `qemu-img convert`, and opened.
pub fn flatten(img: &Path, out: &Path) -> std::fs::File {
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::File::open(out).unwrap()
}

/// qemu-io command on an image of format `fmt`.
pub fn qemu_io(fmt: &str, img: &Path, cmd: &str) {
    let out = run("qemu-io", &["-f", fmt, "-c", cmd, img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True if `qemu-img compare` finds the two images identical.
pub fn identical(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> (bool, String) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            a_fmt,
            "-F",
            b_fmt,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    (
        out.status.code() == Some(0),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

//! scripts/package: the .deb builds, holds the binary, the man pages and
//! completions generated from the command line, and systemd units that
//! `systemd-analyze verify` accepts.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_holds_binary_docs_completions_and_valid_units() {
    let dir = TestDir::new("package");
    let out = dir.path("out");
    let deb = run(Command::new("scripts/package")
        .arg(&out)
        .env("RINGBLK_BIN", env!("CARGO_BIN_EXE_ringblk")));
    let deb = deb.trim();
    assert!(
        deb.ends_with("_amd64.deb") || deb.ends_with(".deb"),
        "{deb}"
    );

    let info = run(Command::new("dpkg-deb").args(["-I", deb]));
    assert!(info.contains("Package: ringblk"), "{info}");
    assert!(
        info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    assert!(info.contains("Depends: libc6"), "{info}");

    let root = dir.path("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    for f in [
        "usr/bin/ringblk",
        "usr/share/man/man1/ringblk.1.gz",
        "usr/share/man/man1/ringblk-serve.1.gz",
        "usr/share/man/man1/ringblk-ctl.1.gz",
        "usr/share/bash-completion/completions/ringblk",
        "usr/share/zsh/vendor-completions/_ringblk",
        "usr/share/fish/vendor_completions.d/ringblk.fish",
        "lib/systemd/system/ringblk@.service",
        "lib/systemd/system/ringblk@.socket",
        "usr/share/doc/ringblk/examples/instance.conf",
        "usr/share/doc/ringblk/reference.md",
    ] {
        assert!(root.join(f).exists(), "{f} is not in the package");
    }

    // The man page renders, with both command-line forms and QMP.
    let page = plain(&run(Command::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man1/ringblk.1.gz"))
        .env("MANWIDTH", "100")));
    for needle in [
        "QEMU-STORAGE-DAEMON FORM",
        "--blockdev",
        "--metrics",
        "QMP COMMANDS",
        "block-export-add",
        "qom-set",
        "ringblk-serve(1)",
    ] {
        assert!(page.contains(needle), "man ringblk lacks {needle}:\n{page}");
    }
    let serve = plain(&run(Command::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man1/ringblk-serve.1.gz"))
        .env("MANWIDTH", "100")));
    assert!(serve.contains("--control-max-clients"), "{serve}");

    // bash takes the completion script and completes `ringblk`.
    let bash = root.join("usr/share/bash-completion/completions/ringblk");
    let complete = run(Command::new("bash")
        .arg("-c")
        .arg(format!("source {}; complete -p ringblk", bash.display())));
    assert!(complete.contains("ringblk"), "{complete}");
    let zsh =
        std::fs::read_to_string(root.join("usr/share/zsh/vendor-completions/_ringblk")).unwrap();
    assert!(zsh.starts_with("#compdef ringblk"), "{}", &zsh[..40]);

    // The units, with ExecStart pointing at the unpacked binary (the
    // package is not installed here) and man finding the unpacked pages.
    let units = dir.path("units");
    std::fs::create_dir_all(&units).unwrap();
    let service = std::fs::read_to_string(root.join("lib/systemd/system/ringblk@.service"))
        .unwrap()
        .replace(
            "/usr/bin/ringblk",
            root.join("usr/bin/ringblk").to_str().unwrap(),
        );
    std::fs::write(units.join("ringblk@.service"), service).unwrap();
    std::fs::copy(
        root.join("lib/systemd/system/ringblk@.socket"),
        units.join("ringblk@.socket"),
    )
    .unwrap();
    verify_units(&units, &root.join("usr/share/man"));
}

/// man's output without its overstrike (bold: `c\bc`, underline: `_\bc`).
fn plain(s: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in s.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out.into_iter().collect()
}

fn verify_units(units: &Path, man: &Path) {
    run(Command::new("systemd-analyze")
        .current_dir(units)
        .args(["verify", "./ringblk@.service", "./ringblk@.socket"])
        .env("MANPATH", man));
}

#[test]
fn generated_docs_refuse_an_unwritable_folder() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(["generate-docs", "/proc/ringblk-docs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/proc/ringblk-docs"), "{err}");
}

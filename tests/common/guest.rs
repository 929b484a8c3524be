//! Booting a Linux guest under QEMU (TCG) attached to a ringblk socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a guest may run before the test fails.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);

pub fn kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot is missing: run scripts/test, which installs linux-image-amd64")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("no /boot/vmlinuz-*: run scripts/test, which installs linux-image-amd64")
}

/// The initramfs, built once per test binary by scripts/mkinitramfs.
pub fn initramfs() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("guest-{}.cpio", std::process::id()));
        let kver = kernel()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("vmlinuz-")
            .to_string();
        let st = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mkinitramfs"))
            .arg(&out)
            .arg(&kver)
            .status()
            .expect("run scripts/mkinitramfs");
        assert!(st.success(), "scripts/mkinitramfs failed");
        out
    })
}

pub struct GuestRun {
    pub console: String,
}

impl GuestRun {
    pub fn passed(&self) -> bool {
        self.console.contains("RINGBLK-TEST-PASS")
    }
}

/// Boot a guest whose /init runs tests/guest/`test`.sh against /dev/vda,
/// served over `sock` with `num_queues` queues. Fails the test if QEMU is
/// missing: guest tests never pass silently.
pub fn run_guest(sock: &Path, test: &str, num_queues: u16) -> GuestRun {
    run_guest_with(sock, test, num_queues, |_| {})
}

/// Like `run_guest`, calling `on_line` with each console line as it
/// arrives (to act on the host while the guest waits for it).
pub fn run_guest_with(
    sock: &Path,
    test: &str,
    num_queues: u16,
    mut on_line: impl FnMut(&str),
) -> GuestRun {
    run_guest_inner(
        sock,
        test,
        num_queues,
        false,
        "",
        |line, _| on_line(line),
        || None,
    )
}

/// Like `run_guest_with`, with `,reconnect=1` on the chardev: QEMU
/// reconnects to a daemon that went away, as a restart needs.
pub fn run_guest_reconnecting(
    sock: &Path,
    test: &str,
    num_queues: u16,
    on_line: impl FnMut(&str),
) -> GuestRun {
    run_guest_reconnecting_unless(sock, test, num_queues, on_line, || None)
}

/// Like `run_guest_reconnecting`; `give_up` is asked about once a second
/// while the guest runs, and when it gives a reason QEMU is killed and the
/// test fails with it. For a host side that may fail while the guest runs
/// (a daemon that is not restarted leaves the guest's I/O waiting for a
/// reconnection until the guest timeout).
pub fn run_guest_reconnecting_unless(
    sock: &Path,
    test: &str,
    num_queues: u16,
    mut on_line: impl FnMut(&str),
    give_up: impl FnMut() -> Option<String>,
) -> GuestRun {
    run_guest_inner(
        sock,
        test,
        num_queues,
        false,
        ",reconnect=1",
        |line, _| on_line(line),
        give_up,
    )
}

/// Like `run_guest_with`; `on_line` may also answer the guest: what it
/// writes to `input` arrives on the guest's serial console (/dev/ttyS0,
/// echoed there as typed input is), one line at a time.
pub fn run_guest_talking(
    sock: &Path,
    test: &str,
    num_queues: u16,
    on_line: impl FnMut(&str, &mut dyn Write),
) -> GuestRun {
    run_guest_inner(sock, test, num_queues, true, "", on_line, || None)
}

fn run_guest_inner(
    sock: &Path,
    test: &str,
    num_queues: u16,
    talking: bool,
    chardev_opts: &str,
    mut on_line: impl FnMut(&str, &mut dyn Write),
    mut give_up: impl FnMut() -> Option<String>,
) -> GuestRun {
    let qemu = "qemu-system-x86_64";
    let found = Command::new(qemu).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{qemu} not found: run scripts/test, which installs qemu-system-x86"
    );
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "1G",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-net",
            "none",
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=1G,share=on",
            "-machine",
            "memory-backend=mem",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={}{chardev_opts}",
            sock.display()
        ))
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"
        ))
        .arg("-kernel")
        .arg(kernel())
        .arg("-initrd")
        .arg(initramfs())
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 rbtest={test}"))
        .stdin(if talking {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut input: Box<dyn Write> = match child.stdin.take() {
        Some(i) => Box::new(i),
        None => Box::new(std::io::sink()),
    };
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
        }
        let mut e = String::new();
        let _ = err.read_to_string(&mut e);
        let _ = tx.send(Some(format!("--- qemu stderr ---\n{e}")));
        let _ = tx.send(None);
    });
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut console = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(Some(line)) => {
                on_line(&line, &mut *input);
                console.push_str(&line);
                console.push('\n');
            }
            Ok(None) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                if let Some(why) = give_up() {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("guest stopped: {why}; console so far:\n{console}");
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("guest did not finish within {GUEST_TIMEOUT:?}; console so far:\n{console}");
            }
        }
    }
    let _ = child.wait();
    eprintln!("--- guest console ({test}) ---\n{console}");
    GuestRun { console }
}

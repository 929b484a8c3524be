//! Booting a Linux guest under QEMU (TCG) attached to a ringblk socket.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

/// How long a guest may run before the test fails.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);

fn kernel() -> PathBuf {
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
fn initramfs() -> &'static Path {
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
        .arg(format!("socket,id=c0,path={}", sock.display()))
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
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let mut e = String::new();
        let _ = err.read_to_string(&mut e);
        let _ = tx.send(format!("{s}\n--- qemu stderr ---\n{e}"));
    });
    let console = match rx.recv_timeout(GUEST_TIMEOUT) {
        Ok(c) => c,
        Err(_) => {
            let _ = child.kill();
            panic!("guest did not finish within {GUEST_TIMEOUT:?}");
        }
    };
    let _ = child.wait();
    eprintln!("--- guest console ({test}) ---\n{console}");
    GuestRun { console }
}

//! systemd, as far as a `Type=notify` service with an fd store
//! (`FileDescriptorStoreMax=`) that restarts sees it: the test owns
//! `NOTIFY_SOCKET`, keeps the descriptors stored there (`FDSTORE=1` with
//! `FDNAME=`), drops those it is told to (`FDSTOREREMOVE=1`), and starts
//! the next process with them (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID`). No systemd runs as PID 1 on the test machines.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::Daemon;

/// systemd, as far as a notify service with an fd store sees it.
pub struct FakeSystemd {
    path: PathBuf,
    sock: UnixDatagram,
    pub store: Vec<(String, OwnedFd)>,
}

impl FakeSystemd {
    pub fn bind(path: PathBuf) -> FakeSystemd {
        let sock = UnixDatagram::bind(&path).unwrap();
        FakeSystemd {
            path,
            sock,
            store: Vec::new(),
        }
    }

    /// The next notification within `limit`, applied to the store.
    pub fn next(&mut self, limit: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(limit.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut fds: [RawFd; 8] = [-1; 8];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, alive for the call.
        let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }.ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        // SAFETY: descriptors the kernel just gave us, made close-on-exec
        // (recvmsg did not): a daemon another test spawns meanwhile must
        // not inherit, say, a connection this test expects to close.
        let got: Vec<OwnedFd> = fds[..nfds]
            .iter()
            .map(|&fd| unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                OwnedFd::from_raw_fd(fd)
            })
            .collect();
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::to_string)
        };
        if text.lines().any(|l| l == "FDSTORE=1") {
            let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
            for fd in got {
                self.store.push((name.clone(), fd));
            }
        } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            let name = field("FDNAME=").expect("FDSTOREREMOVE without FDNAME");
            self.store.retain(|(n, _)| *n != name);
        }
        Some(text)
    }

    pub fn until(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(m) = self.next(deadline - Instant::now()) {
                if m.lines().any(|l| l == want) {
                    return;
                }
            }
        }
        panic!("no {want} within 30 s");
    }

    /// SIGUSR1 to `d`: its sessions go to the store; it exits cleanly.
    pub fn upgrade_away(&mut self, d: Daemon) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(d.pid(), libc::SIGUSR1) };
        let st = d.wait_exit(Duration::from_secs(30));
        assert!(st.success(), "exit after SIGUSR1: {st:?}");
        self.drain();
    }

    /// Everything the exited daemon still had to say.
    pub fn drain(&mut self) {
        while self.next(Duration::from_millis(1)).is_some() {}
    }

    pub fn names(&self) -> Vec<String> {
        self.store.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Start the service's (next) process: ringblk with `args`, the store
    /// passed as systemd passes it.
    pub fn start(&self, sock: &Path, args: &[String]) -> Daemon {
        let n = self.store.len();
        // Copies above the range they go to, so no dup2 overwrites one.
        let high: Vec<RawFd> = self
            .store
            .iter()
            // SAFETY: fcntl on our own descriptors.
            .map(|(_, fd)| unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) })
            .collect();
        assert!(high.iter().all(|&fd| fd >= 100));
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_ringblk"))
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .env("LISTEN_FDS", n.to_string())
            .env("LISTEN_FDNAMES", self.names().join(":"));
        let targets = high.clone();
        // SAFETY: only dup2, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, &fd) in targets.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let d = Daemon::start_command(cmd, sock);
        for fd in high {
            // SAFETY: the copies made above, ours alone.
            unsafe { libc::close(fd) };
        }
        d
    }
}

//! A recording proxy between a real vhost-user frontend and the daemon:
//! it relays both directions (fds included) and keeps every frame the
//! frontend sent, as fuzz seeds for the message decoder.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// One frontend frame: fds attached, header and payload bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    pub nfds: usize,
    pub bytes: Vec<u8>,
}

impl Frame {
    /// The fuzz target's input format: fd count byte, then the frame.
    pub fn seed(&self) -> Vec<u8> {
        let mut s = vec![self.nfds as u8];
        s.extend_from_slice(&self.bytes);
        s
    }

    pub fn request(&self) -> u32 {
        u32::from_le_bytes(self.bytes[0..4].try_into().unwrap())
    }
}

pub struct Recorder {
    pub path: PathBuf,
    frames: Arc<Mutex<Vec<Frame>>>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Listen on `path` and relay one connection to the daemon at `daemon`.
    pub fn start(path: &Path, daemon: &Path) -> Recorder {
        let listener = UnixListener::bind(path).unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = frames.clone();
        let daemon = daemon.to_path_buf();
        let thread = std::thread::spawn(move || {
            let (front, _) = listener.accept().unwrap();
            let back = UnixStream::connect(&daemon).unwrap();
            let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
            let replies = std::thread::spawn(move || copy_plain(back2, front2));
            relay_frames(&front, &back, &sink);
            let _ = back.shutdown(std::net::Shutdown::Both);
            let _ = replies.join();
        });
        Recorder {
            path: path.to_path_buf(),
            frames,
            thread: Some(thread),
        }
    }

    /// Wait for the frontend to leave and return what it sent.
    pub fn finish(mut self) -> Vec<Frame> {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.frames.lock().unwrap().clone()
    }
}

fn copy_plain(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Relay frontend bytes and fds to the daemon, cutting the byte stream into
/// frames; fds are attributed to the first frame starting in their chunk.
fn relay_frames(front: &UnixStream, back: &UnixStream, frames: &Mutex<Vec<Frame>>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_fds = 0usize;
    loop {
        let mut buf = [0u8; 8192];
        let mut raw: [RawFd; 64] = [-1; 64];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, valid for its length.
        let Ok((n, nfds)) = (unsafe { front.recv_with_fds(&mut iov, &mut raw) }) else {
            return;
        };
        if n == 0 {
            return;
        }
        // SAFETY: recv_with_fds handed us `nfds` new descriptors.
        let fds: Vec<OwnedFd> = raw[..nfds]
            .iter()
            .map(|&f| unsafe { OwnedFd::from_raw_fd(f) })
            .collect();
        let raw_fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = if raw_fds.is_empty() {
            (&*back).write_all(&buf[..n]).map(|_| n).ok()
        } else {
            back.send_with_fds(&[&buf[..n]], &raw_fds).ok()
        };
        match sent {
            Some(k) if k == n => {}
            Some(k) => (&*back).write_all(&buf[k..n]).unwrap(),
            None => return,
        }
        pending_fds += nfds;
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= 12 {
            let size = u32::from_le_bytes(pending[8..12].try_into().unwrap()) as usize;
            if pending.len() < 12 + size {
                break;
            }
            let bytes: Vec<u8> = pending.drain(..12 + size).collect();
            frames.lock().unwrap().push(Frame {
                nfds: std::mem::take(&mut pending_fds),
                bytes,
            });
        }
    }
}

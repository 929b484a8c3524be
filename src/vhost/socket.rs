//! vhost-user framing: a 12-byte header, a payload, and file descriptors
//! passed as SCM_RIGHTS ancillary data.

use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::message::{parse_header, BadHeader, Header, HEADER_LEN};
pub(crate) use super::message::{FLAG_REPLY, FLAG_VERSION_1};

/// One frame from the frontend: a checked header, its payload (at most
/// [`super::message::max_payload`] bytes) and the fds that came with it.
pub(crate) struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub(crate) fn need_reply(&self) -> bool {
        self.header.need_reply()
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frontend closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    BadHeader(#[from] BadHeader),
    #[error("the frontend stalled: a message or our reply did not get through in time")]
    Stalled,
    #[error("the daemon is shutting down")]
    Stopped,
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> io::Error {
        match e {
            FrameError::Io(e) => e,
            FrameError::Stalled => io::ErrorKind::TimedOut.into(),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// When a frame (or reply) that has started must be done, and the fd whose
/// signal abandons it at once (the daemon's shutdown).
#[derive(Clone, Copy)]
pub(crate) struct Bound {
    pub deadline: Instant,
    pub stop_fd: RawFd,
}

impl Bound {
    /// Sleep until `fd` has `events` (or an error or hang-up, which the
    /// next call reports). Never past the deadline, never after a stop.
    fn wait(&self, fd: RawFd, events: i16) -> Result<(), FrameError> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrameError::Stalled);
            }
            let mut fds = [
                libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // Round up so a sub-millisecond rest does not spin.
            let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
            // SAFETY: poll on two valid pollfd entries.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if fds[1].revents != 0 {
                return Err(FrameError::Stopped);
            }
            if fds[0].revents != 0 {
                return Ok(());
            }
        }
    }
}

fn read_exact(stream: &UnixStream, buf: &mut [u8], bound: Bound) -> Result<(), FrameError> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let mut done = 0;
    while done < buf.len() {
        bound.wait(fd, libc::POLLIN)?;
        // SAFETY: recv into the unfilled tail of a valid buffer.
        let n = unsafe {
            libc::recv(
                fd,
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return Err(FrameError::Closed),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                return Err(e.into());
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

/// Receive one message; call it once the socket is readable. Descriptors
/// arrive with the header. The rest of the frame must arrive within
/// `bound` (a frontend cannot hold us, nor the daemon's shutdown, with
/// half a message).
pub(crate) fn recv_message(stream: &UnixStream, bound: Bound) -> Result<Message, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: HEADER_LEN,
    }];
    // The socket was readable: this first read does not wait.
    // SAFETY: the iovec points at our header buffer, valid for HEADER_LEN bytes.
    let (n, nfds) = loop {
        match unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) } {
            Ok(r) => break r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    // SAFETY: recv_with_fds reports `nfds` fresh descriptors that we now own.
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(FrameError::Closed);
    }
    if n < HEADER_LEN {
        read_exact(stream, &mut header[n..], bound)?;
    }
    let header = parse_header(&header)?;
    // parse_header bounded the size by the request's largest payload.
    let mut payload = vec![0u8; header.size as usize];
    read_exact(stream, &mut payload, bound)?;
    Ok(Message {
        header,
        payload,
        fds,
    })
}

fn frame(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

/// Send a reply to `request` with `payload`, all of it within `bound`: a
/// frontend that stops reading its replies fails the send.
pub(crate) fn send_reply(
    stream: &UnixStream,
    request: u32,
    payload: &[u8],
    bound: Bound,
) -> Result<(), FrameError> {
    send_reply_with_fds(stream, request, payload, &[], bound)
}

/// [`send_reply`] with file descriptors, which go with the first bytes.
pub(crate) fn send_reply_with_fds(
    stream: &UnixStream,
    request: u32,
    payload: &[u8],
    fds: &[RawFd],
    bound: Bound,
) -> Result<(), FrameError> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let buf = frame(request, FLAG_VERSION_1 | FLAG_REPLY, payload);
    let mut done = 0;
    if !fds.is_empty() {
        // A reply is a few dozen bytes: once the socket is writable the
        // first send takes at least its first byte, and the fds with it.
        loop {
            bound.wait(fd, libc::POLLOUT)?;
            match stream.send_with_fds(&[&buf[..]], fds) {
                Ok(n) => {
                    done = n;
                    break;
                }
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
            }
        }
    }
    while done < buf.len() {
        bound.wait(fd, libc::POLLOUT)?;
        // SAFETY: send from the unsent tail of a valid buffer.
        let n = unsafe {
            libc::send(
                fd,
                buf[done..].as_ptr() as *const libc::c_void,
                buf.len() - done,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(e.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// Send one message without file descriptors, in one go: for the backend
/// channel, which is non-blocking (`ExportState::set_backend_channel`), so
/// a frontend that does not read it fails the send instead of holding us.
pub(crate) fn send_message(
    mut stream: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
) -> io::Result<()> {
    stream.write_all(&frame(request, flags, payload))
}

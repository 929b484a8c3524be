//! Hostile vhost-user frontends against the real daemon: each malformed or
//! out-of-order message is refused (a NACK, or a disconnect where the
//! stream cannot be trusted), and a well-behaved libblkio client is served
//! right after. No descriptor the frontends sent stays open in the daemon.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use vhost::vhost_user::message::{
    FrontendReq as R, VhostUserMemoryRegion, VhostUserProtocolFeatures,
};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const MEM: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// REPLY_ACK with a non-zero status; the connection keeps working.
    Nack,
    /// The daemon closes the connection.
    Disconnect,
    /// GET_CONFIG answered with size 0 (the protocol's failure).
    ConfigFailed,
}

/// What a row sets up before its hostile message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Nothing: a fresh connection.
    None,
    /// Protocol features (REPLY_ACK) but no SET_FEATURES.
    Protocol,
    /// Features negotiated, no memory.
    Features,
    /// Features and one memory region.
    Memory,
    /// Queue 0 running.
    Running,
    /// Features negotiated with INFLIGHT_SHMFD, no memory.
    Inflight,
    /// Features negotiated with LOG_SHMFD, memory and queue 0 running.
    Log,
}

/// The frontend's state for one row; `fd` hands out eventfds to attach.
struct Ctx {
    fe: Frontend,
    mem: GuestMem,
    spare: Vec<EventFd>,
}

impl Ctx {
    fn fds(&mut self, n: usize) -> Vec<RawFd> {
        while self.spare.len() < n {
            self.spare.push(EventFd::new(libc::EFD_CLOEXEC).unwrap());
        }
        self.spare[..n].iter().map(|e| e.as_raw_fd()).collect()
    }

    fn memfd(&self) -> RawFd {
        self.mem.fd.as_raw_fd()
    }
}

type Send = fn(&mut Ctx);

fn msg(c: &Ctx, req: R, payload: &[u8], fds: &[RawFd]) {
    c.fe.send(req as u32, VERSION_1 | NEED_REPLY, payload, fds);
}

fn region(gpa: u64, size: u64, va: u64, off: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(gpa, size, va, off)
}

fn single(r: VhostUserMemoryRegion) -> Vec<u8> {
    // VhostUserSingleMemoryRegion: 8 bytes of padding, then the region.
    let mut p = vec![0u8; 8];
    p.extend_from_slice(&mem_table(&[r])[8..]);
    p
}

/// VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size.
fn inflight(size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

/// Region bytes for one queue of 64 (16-byte header, 16-byte entries,
/// rounded to 64).
const REGION_64: u64 = 16 + 16 * 64 + 48;

/// A memfd of `len` bytes sealed against shrinking, like the daemon's.
fn sealed_memfd(len: u64) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: NUL-terminated name; checked.
    let raw = unsafe {
        libc::memfd_create(
            c"hostile-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(raw >= 0);
    // SAFETY: a fresh fd we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: sizing and sealing our own memfd.
    unsafe {
        assert_eq!(libc::ftruncate(raw, len as i64), 0);
        assert_eq!(libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK), 0);
    }
    fd
}

fn set_inflight_with(c: &Ctx, fd_len: u64, payload: &[u8]) {
    let fd = sealed_memfd(fd_len);
    msg(c, R::SET_INFLIGHT_FD, payload, &[fd.as_raw_fd()]);
}

fn inflight_rows() -> Vec<(&'static str, Setup, Send, Expect)> {
    use Expect::*;
    use Setup::*;
    vec![
        (
            "GET_INFLIGHT_FD without INFLIGHT_SHMFD",
            Features,
            |c| msg(c, R::GET_INFLIGHT_FD, &inflight(0, 0, 1, 64), &[]),
            Disconnect,
        ),
        (
            "GET_INFLIGHT_FD for 0 queues",
            Inflight,
            |c| msg(c, R::GET_INFLIGHT_FD, &inflight(0, 0, 0, 64), &[]),
            Disconnect,
        ),
        (
            "GET_INFLIGHT_FD for more queues than the device has",
            Inflight,
            |c| msg(c, R::GET_INFLIGHT_FD, &inflight(0, 0, 200, 64), &[]),
            Disconnect,
        ),
        (
            "GET_INFLIGHT_FD queue size 100",
            Inflight,
            |c| msg(c, R::GET_INFLIGHT_FD, &inflight(0, 0, 1, 100), &[]),
            Disconnect,
        ),
        (
            "GET_INFLIGHT_FD with a 4 KiB payload",
            Inflight,
            |c| {
                c.fe.send_raw(&header(R::GET_INFLIGHT_FD as u32, VERSION_1, 4096), &[])
            },
            Disconnect,
        ),
        (
            "SET_INFLIGHT_FD without INFLIGHT_SHMFD",
            Features,
            |c| set_inflight_with(c, 4096, &inflight(REGION_64, 0, 1, 64)),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD without an fd",
            Inflight,
            |c| msg(c, R::SET_INFLIGHT_FD, &inflight(REGION_64, 0, 1, 64), &[]),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD with an eventfd",
            Inflight,
            |c| {
                let fds = c.fds(1);
                msg(c, R::SET_INFLIGHT_FD, &inflight(REGION_64, 0, 1, 64), &fds)
            },
            Nack,
        ),
        (
            "SET_INFLIGHT_FD with an unsealed memfd (it could shrink under us)",
            Inflight,
            |c| {
                let fd = c.memfd();
                msg(c, R::SET_INFLIGHT_FD, &inflight(REGION_64, 0, 1, 64), &[fd])
            },
            Nack,
        ),
        (
            "SET_INFLIGHT_FD mmap_size below the layout",
            Inflight,
            |c| set_inflight_with(c, 4096, &inflight(REGION_64 - 1, 0, 1, 64)),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD region past the end of its file",
            Inflight,
            |c| set_inflight_with(c, 4096, &inflight(REGION_64, 4096, 1, 64)),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD offset not page-aligned",
            Inflight,
            |c| set_inflight_with(c, 8192, &inflight(REGION_64, 100, 1, 64)),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD offset + size overflows",
            Inflight,
            |c| set_inflight_with(c, 4096, &inflight(u64::MAX - 4095, 4096, 1, 64)),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD queue size 0",
            Inflight,
            |c| set_inflight_with(c, 4096, &inflight(REGION_64, 0, 1, 0)),
            Nack,
        ),
        (
            "SET_INFLIGHT_FD for more queues than the device has",
            Inflight,
            |c| set_inflight_with(c, 1 << 20, &inflight(REGION_64 * 9, 0, 9, 64)),
            Nack,
        ),
    ]
}

/// VhostUserLog: mmap_size, mmap_offset.
fn log_base(size: u64, offset: u64) -> Vec<u8> {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&offset.to_le_bytes());
    p
}

/// SET_LOG_BASE with a memfd of `fd_len` bytes (unsealed: QEMU seals its
/// log, but the daemon does not rely on it).
fn set_log_with(c: &Ctx, fd_len: u64, payload: &[u8]) {
    let m = GuestMem::new(fd_len as usize);
    msg(c, R::SET_LOG_BASE, payload, &[m.fd.as_raw_fd()]);
}

/// With LOG_SHMFD a refused SET_LOG_BASE closes the connection: its reply
/// carries no status, so any reply would say the log is in place.
fn log_rows() -> Vec<(&'static str, Setup, Send, Expect)> {
    use Expect::*;
    use Setup::*;
    vec![
        (
            "SET_LOG_BASE without LOG_SHMFD",
            Running,
            |c| set_log_with(c, 4096, &log_base(4096, 0)),
            Nack,
        ),
        (
            "SET_LOG_BASE without an fd",
            Log,
            |c| msg(c, R::SET_LOG_BASE, &log_base(4096, 0), &[]),
            Disconnect,
        ),
        (
            "SET_LOG_BASE with two fds",
            Log,
            |c| {
                let (a, b) = (GuestMem::new(4096), GuestMem::new(4096));
                msg(
                    c,
                    R::SET_LOG_BASE,
                    &log_base(4096, 0),
                    &[a.fd.as_raw_fd(), b.fd.as_raw_fd()],
                )
            },
            Disconnect,
        ),
        (
            "SET_LOG_BASE with an eventfd",
            Log,
            |c| {
                let fds = c.fds(1);
                msg(c, R::SET_LOG_BASE, &log_base(4096, 0), &fds)
            },
            Disconnect,
        ),
        (
            "SET_LOG_BASE with a pipe",
            Log,
            |c| {
                let mut p = [0; 2];
                // SAFETY: pipe2 into a local array.
                assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                msg(c, R::SET_LOG_BASE, &log_base(4096, 0), &[p[0]]);
                // SAFETY: our own fds, sent already.
                unsafe { libc::close(p[0]) };
                // SAFETY: as above.
                unsafe { libc::close(p[1]) };
            },
            Disconnect,
        ),
        (
            "SET_LOG_BASE of size 0",
            Log,
            |c| set_log_with(c, 4096, &log_base(0, 0)),
            Disconnect,
        ),
        (
            "SET_LOG_BASE of 2 GiB (over the cap)",
            Log,
            |c| set_log_with(c, 4096, &log_base(2 << 30, 0)),
            Disconnect,
        ),
        (
            "SET_LOG_BASE past the end of its file",
            Log,
            |c| set_log_with(c, 8192, &log_base(8192, 4096)),
            Disconnect,
        ),
        (
            "SET_LOG_BASE offset not page-aligned",
            Log,
            |c| set_log_with(c, 8192, &log_base(4096, 100)),
            Disconnect,
        ),
        (
            "SET_LOG_BASE offset + size overflows",
            Log,
            |c| set_log_with(c, 8192, &log_base(4096, u64::MAX - 4095)),
            Disconnect,
        ),
        (
            "SET_LOG_BASE with the old u64 payload",
            Log,
            |c| set_log_with(c, 4096, &4096u64.to_le_bytes()),
            Disconnect,
        ),
        (
            "SET_LOG_BASE with a 4 KiB payload",
            Log,
            |c| {
                let m = GuestMem::new(4096);
                c.fe.send_raw(
                    &header(R::SET_LOG_BASE as u32, VERSION_1, 4096),
                    &[m.fd.as_raw_fd()],
                )
            },
            Disconnect,
        ),
    ]
}

fn rows() -> Vec<(&'static str, Setup, Send, Expect)> {
    let mut rows = base_rows();
    rows.extend(inflight_rows());
    rows.extend(log_rows());
    rows
}

fn base_rows() -> Vec<(&'static str, Setup, Send, Expect)> {
    use Expect::*;
    use Setup::*;
    vec![
        (
            "header claims 4 GiB payload",
            None,
            |c| {
                c.fe.send_raw(
                    &header(R::SET_FEATURES as u32, VERSION_1, u32::MAX as usize),
                    &[],
                )
            },
            Disconnect,
        ),
        (
            "header claims 4 KiB for SET_FEATURES",
            None,
            |c| {
                c.fe.send_raw(&header(R::SET_FEATURES as u32, VERSION_1, 4096), &[])
            },
            Disconnect,
        ),
        (
            "version 0 flags",
            None,
            |c| c.fe.send(R::GET_FEATURES as u32, 0, &[], &[]),
            Disconnect,
        ),
        (
            "version 2 flags",
            None,
            |c| c.fe.send(R::GET_FEATURES as u32, 2, &[], &[]),
            Disconnect,
        ),
        (
            "truncated payload then EOF",
            None,
            |c| {
                let mut m = header(R::SET_FEATURES as u32, VERSION_1, 8);
                m.extend_from_slice(&[0; 3]);
                c.fe.send_raw(&m, &[]);
                c.fe.sock.shutdown(std::net::Shutdown::Write).unwrap();
            },
            Disconnect,
        ),
        (
            "SET_MEM_TABLE of 9 regions (over the frame bound)",
            Protocol,
            |c| {
                let r: Vec<_> = (0..9)
                    .map(|k| region(k * MIB, MIB, 0x1000_0000 + k * MIB, 0))
                    .collect();
                let fds = c.fds(9);
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &fds)
            },
            Disconnect,
        ),
        (
            "GET_VRING_BASE of queue 9",
            Protocol,
            |c| {
                c.fe.send(R::GET_VRING_BASE as u32, VERSION_1, &vring_state(9, 0), &[])
            },
            Disconnect,
        ),
        (
            "GET_FEATURES with an fd attached",
            Protocol,
            |c| {
                let fds = c.fds(1);
                c.fe.send(R::GET_FEATURES as u32, VERSION_1, &[], &fds)
            },
            Disconnect,
        ),
        (
            "SET_FEATURES payload of 4 bytes",
            Protocol,
            |c| msg(c, R::SET_FEATURES, &[0; 4], &[]),
            Nack,
        ),
        (
            "unknown request 999",
            Protocol,
            |c| msg_code(c, 999, &[0; 16]),
            Nack,
        ),
        (
            "reply flag set on a request",
            Protocol,
            |c| {
                c.fe.send(R::SET_OWNER as u32, VERSION_1 | 0x4 | NEED_REPLY, &[], &[])
            },
            Nack,
        ),
        (
            "SET_FEATURES with bits not offered",
            Protocol,
            |c| msg(c, R::SET_FEATURES, &(1u64 << 63).to_le_bytes(), &[]),
            Nack,
        ),
        (
            "SET_PROTOCOL_FEATURES with bits not offered",
            Protocol,
            |c| {
                msg(
                    c,
                    R::SET_PROTOCOL_FEATURES,
                    &(1u64 << 40 | 1 << 3).to_le_bytes(),
                    &[],
                )
            },
            Nack,
        ),
        (
            "SET_OWNER with 3 extra fds",
            Protocol,
            |c| {
                let fds = c.fds(3);
                msg(c, R::SET_OWNER, &[], &fds)
            },
            Nack,
        ),
        // Stalling inside a frame must not hold the daemon forever.
        (
            "half a header, then silence",
            Protocol,
            |c| {
                c.fe.send_raw(&header(R::GET_FEATURES as u32, VERSION_1, 0)[..6], &[])
            },
            Disconnect,
        ),
        (
            "header, half the payload, then silence",
            Protocol,
            |c| {
                let mut m = header(R::SET_FEATURES as u32, VERSION_1 | NEED_REPLY, 8);
                m.extend_from_slice(&[0; 4]);
                c.fe.send_raw(&m, &[])
            },
            Disconnect,
        ),
        // More than the 32 fds a message may carry: the kernel drops the
        // excess and the daemon cannot trust the frame.
        (
            "SET_OWNER with 40 fds",
            Protocol,
            |c| {
                let fds = c.fds(40);
                msg(c, R::SET_OWNER, &[], &fds)
            },
            Disconnect,
        ),
        (
            "SET_VRING_NUM of queue 7",
            Features,
            |c| msg(c, R::SET_VRING_NUM, &vring_state(7, 256), &[]),
            Nack,
        ),
        (
            "SET_VRING_NUM size 0",
            Features,
            |c| msg(c, R::SET_VRING_NUM, &vring_state(0, 0), &[]),
            Nack,
        ),
        (
            "SET_VRING_NUM size 100",
            Features,
            |c| msg(c, R::SET_VRING_NUM, &vring_state(0, 100), &[]),
            Nack,
        ),
        (
            "SET_VRING_NUM size 65536",
            Features,
            |c| msg(c, R::SET_VRING_NUM, &vring_state(0, 65536), &[]),
            Nack,
        ),
        (
            "SET_VRING_BASE 70000",
            Features,
            |c| msg(c, R::SET_VRING_BASE, &vring_state(0, 70000), &[]),
            Nack,
        ),
        (
            "SET_VRING_ADDR before memory",
            Features,
            |c| {
                msg(
                    c,
                    R::SET_VRING_ADDR,
                    &vring_addr(0, 0x10000, 0x20000, 0x30000),
                    &[],
                )
            },
            Nack,
        ),
        (
            "SET_VRING_ADDR outside memory",
            Memory,
            |c| {
                let far = c.mem.va(0) + (1 << 40);
                msg(c, R::SET_VRING_ADDR, &vring_addr(0, far, far, far), &[])
            },
            Nack,
        ),
        (
            "SET_VRING_ADDR misaligned",
            Memory,
            |c| {
                let va = c.mem.va(8);
                msg(c, R::SET_VRING_ADDR, &vring_addr(0, va, va, va), &[])
            },
            Nack,
        ),
        (
            "SET_VRING_ADDR with an unknown flag",
            Memory,
            |c| {
                let mut p = vring_addr(0, c.mem.va(0), c.mem.va(0x2000), c.mem.va(0x1000));
                p[4] = 2;
                msg(c, R::SET_VRING_ADDR, &p, &[])
            },
            Nack,
        ),
        (
            "SET_VRING_ADDR logging the used ring at a misaligned address",
            Memory,
            |c| {
                let mut p = vring_addr(0, c.mem.va(0), c.mem.va(0x2000), c.mem.va(0x1000));
                p[4] = 1;
                p[32] = 2;
                msg(c, R::SET_VRING_ADDR, &p, &[])
            },
            Nack,
        ),
        (
            "SET_VRING_ADDR moving a running ring under the cover of logging",
            Running,
            |c| {
                let mut p = vring_addr(0, c.mem.va(0), c.mem.va(0x2000), c.mem.va(0x1000));
                p[4] = 1;
                msg(c, R::SET_VRING_ADDR, &p, &[])
            },
            Nack,
        ),
        (
            "ring running past the end of memory",
            Memory,
            |c| {
                // Descriptor table starts inside memory, but 256 entries do not fit.
                let end = MEM as u64;
                let ok = |r, p: &[u8], fds: &[RawFd]| assert_eq!(c.fe.ack(r, p, fds), 0);
                ok(R::SET_VRING_NUM, &vring_state(0, 256), &[]);
                ok(
                    R::SET_VRING_ADDR,
                    &vring_addr(0, c.mem.va(end - 1024), c.mem.va(0x2000), c.mem.va(0x1000)),
                    &[],
                );
                ok(R::SET_VRING_ENABLE, &vring_state(0, 1), &[]);
                let fds = c.fds(1);
                msg(c, R::SET_VRING_KICK, &0u64.to_le_bytes(), &fds)
            },
            Nack,
        ),
        (
            "SET_VRING_KICK before SET_FEATURES",
            Protocol,
            |c| {
                let fds = c.fds(1);
                msg(c, R::SET_VRING_KICK, &0u64.to_le_bytes(), &fds)
            },
            Nack,
        ),
        (
            "SET_VRING_KICK no-fd bit with an fd",
            Features,
            |c| {
                let fds = c.fds(1);
                msg(c, R::SET_VRING_KICK, &NOFD.to_le_bytes(), &fds)
            },
            Nack,
        ),
        (
            "SET_VRING_CALL without its fd",
            Features,
            |c| msg(c, R::SET_VRING_CALL, &0u64.to_le_bytes(), &[]),
            Nack,
        ),
        (
            "SET_VRING_CALL with 2 fds",
            Features,
            |c| {
                let fds = c.fds(2);
                msg(c, R::SET_VRING_CALL, &0u64.to_le_bytes(), &fds)
            },
            Nack,
        ),
        (
            "SET_VRING_ENABLE 2",
            Features,
            |c| msg(c, R::SET_VRING_ENABLE, &vring_state(0, 2), &[]),
            Nack,
        ),
        (
            "SET_MEM_TABLE zero-size region",
            Features,
            |c| {
                let r = [region(0, 0, c.mem.va(0), 0)];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE regions overlap in guest-physical space",
            Features,
            |c| {
                let r = [
                    region(0, 2 * MIB, c.mem.va(0), 0),
                    region(MIB, MIB, c.mem.va(0) + 8 * MIB, 0),
                ];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd(), c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE regions overlap in frontend-virtual space",
            Features,
            |c| {
                let r = [
                    region(0, 2 * MIB, c.mem.va(0), 0),
                    region(8 * MIB, MIB, c.mem.va(0) + MIB, 0),
                ];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd(), c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE offset + size past the memfd",
            Features,
            |c| {
                let r = [region(0, MEM as u64, c.mem.va(0), MIB)];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE offset overflows",
            Features,
            |c| {
                let r = [region(0, MIB, c.mem.va(0), u64::MAX - 4095)];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE region wraps guest-physical space",
            Features,
            |c| {
                let r = [region(u64::MAX - 4095, MIB, c.mem.va(0), 0)];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE claims 3 regions, carries 2",
            Features,
            |c| {
                let r = [
                    region(0, MIB, c.mem.va(0), 0),
                    region(MIB, MIB, c.mem.va(0) + MIB, MIB),
                ];
                let mut p = mem_table(&r);
                p[0] = 3;
                msg(c, R::SET_MEM_TABLE, &p, &[c.memfd(), c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE one fd for two regions",
            Features,
            |c| {
                let r = [
                    region(0, MIB, c.mem.va(0), 0),
                    region(MIB, MIB, c.mem.va(0) + MIB, MIB),
                ];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd()])
            },
            Nack,
        ),
        (
            "SET_MEM_TABLE with an eventfd as memory",
            Features,
            |c| {
                let fds = c.fds(1);
                msg(
                    c,
                    R::SET_MEM_TABLE,
                    &mem_table(&[region(0, MIB, c.mem.va(0), 0)]),
                    &fds,
                )
            },
            Nack,
        ),
        (
            "ADD_MEM_REG without an fd",
            Memory,
            |c| {
                msg(
                    c,
                    R::ADD_MEM_REG,
                    &single(region(16 * MIB, MIB, c.mem.va(0) + 16 * MIB, 0)),
                    &[],
                )
            },
            Nack,
        ),
        (
            "ADD_MEM_REG overlapping the existing region",
            Memory,
            |c| {
                msg(
                    c,
                    R::ADD_MEM_REG,
                    &single(region(MIB, MIB, c.mem.va(0) + 32 * MIB, 0)),
                    &[c.memfd()],
                )
            },
            Nack,
        ),
        (
            "REM_MEM_REG of a region never added",
            Memory,
            |c| {
                msg(
                    c,
                    R::REM_MEM_REG,
                    &single(region(64 * MIB, MIB, 0x1000, 0)),
                    &[],
                )
            },
            Nack,
        ),
        (
            "REM_MEM_REG of the region a running queue uses",
            Running,
            |c| msg(c, R::REM_MEM_REG, &single(c.mem.region()), &[]),
            Nack,
        ),
        (
            "SET_MEM_TABLE moving a running queue's memory",
            Running,
            |c| {
                let r = [region(64 * MIB, MEM as u64, c.mem.va(0), 0)];
                msg(c, R::SET_MEM_TABLE, &mem_table(&r), &[c.memfd()])
            },
            Nack,
        ),
        (
            "SET_VRING_NUM on a running queue",
            Running,
            |c| msg(c, R::SET_VRING_NUM, &vring_state(0, 128), &[]),
            Nack,
        ),
        (
            "SET_VRING_ADDR on a running queue",
            Running,
            |c| {
                msg(
                    c,
                    R::SET_VRING_ADDR,
                    &vring_addr(0, c.mem.va(0), c.mem.va(0x2000), c.mem.va(0x1000)),
                    &[],
                )
            },
            Nack,
        ),
        (
            "SET_FEATURES changing features of a running device",
            Running,
            |c| {
                let f = c.fe.get_u64(R::GET_FEATURES);
                msg(c, R::SET_FEATURES, &f.to_le_bytes(), &[])
            },
            Nack,
        ),
        (
            "SET_BACKEND_REQ_FD without BACKEND_REQ",
            Protocol,
            |c| {
                let fds = c.fds(1);
                msg(c, R::SET_BACKEND_REQ_FD, &[], &fds)
            },
            Nack,
        ),
        (
            "GET_CONFIG past the config space",
            Protocol,
            |c| {
                let mut p = 200u32.to_le_bytes().to_vec();
                p.extend_from_slice(&100u32.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend(std::iter::repeat_n(0u8, 100));
                c.fe.send(R::GET_CONFIG as u32, VERSION_1, &p, &[])
            },
            ConfigFailed,
        ),
        (
            "SET_CONFIG size larger than its data",
            Protocol,
            |c| {
                let mut p = 32u32.to_le_bytes().to_vec();
                p.extend_from_slice(&16u32.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.push(1);
                msg(c, R::SET_CONFIG, &p, &[])
            },
            Nack,
        ),
    ]
}

fn msg_code(c: &Ctx, code: u32, payload: &[u8]) {
    c.fe.send(code, VERSION_1 | NEED_REPLY, payload, &[]);
}

fn prepare(sock: &std::path::Path, setup: Setup) -> Ctx {
    let mut c = Ctx {
        fe: Frontend::connect(sock),
        mem: GuestMem::new(MEM),
        spare: Vec::new(),
    };
    if setup == Setup::None {
        return c;
    }
    if setup == Setup::Inflight {
        c.fe.handshake_with(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        return c;
    }
    if setup == Setup::Log {
        c.fe.handshake_with(VhostUserProtocolFeatures::LOG_SHMFD);
        let fd = c.memfd();
        assert_eq!(c.fe.set_mem_table(&[c.mem.region()], &[fd]), 0);
        Virtqueue::start(&c.fe, &c.mem, 64);
        return c;
    }
    c.fe.negotiate_protocol();
    if setup == Setup::Protocol {
        return c;
    }
    c.fe.handshake();
    if setup == Setup::Features {
        return c;
    }
    let fd = c.memfd();
    assert_eq!(c.fe.set_mem_table(&[c.mem.region()], &[fd]), 0);
    if setup == Setup::Running {
        Virtqueue::start(&c.fe, &c.mem, 64);
    }
    c.spare.clear();
    c
}

fn outcome(c: &Ctx) -> Expect {
    match c.fe.recv(Duration::from_secs(10)) {
        Answer::Closed => Expect::Disconnect,
        Answer::Timeout => panic!("no answer within 10 s"),
        Answer::Reply(r, p) if r == R::GET_CONFIG as u32 => {
            assert_eq!(p.len(), 12, "a failed GET_CONFIG carries no data");
            assert_eq!(&p[4..8], &[0; 4], "size 0");
            Expect::ConfigFailed
        }
        Answer::Reply(_, p) => {
            assert_eq!(p.len(), 8, "an ack is a u64");
            let status = u64::from_le_bytes(p.try_into().unwrap());
            assert_ne!(status, 0, "the daemon accepted it");
            Expect::Nack
        }
    }
}

/// The daemon's open fds while it serves a probe connection. It serves one
/// frontend at a time, so once a probe is answered the earlier connections
/// are gone; their queues' fds are released by the iothreads just after,
/// so wait (bounded) for the count to come down to `base`.
fn probe_fds(pid: i32, sock: &std::path::Path, base: usize) -> usize {
    let mut n = 0;
    poll_every(Duration::from_millis(10), Duration::from_secs(10), || {
        let fe = Frontend::connect(sock);
        assert!(fe.alive(), "the daemon does not answer a new frontend");
        n = fd_count(pid);
        (n <= base).then_some(())
    });
    n
}

fn write_read(sock: &std::path::Path, round: u64) {
    let mut c = connect(sock, 1).expect("libblkio connects after a hostile frontend");
    let len = 64 * 1024;
    pattern(&mut c.buf()[..len], round, 7);
    assert_eq!(c.run(0, Req::Write(round * len as u64, 0, len)), 0);
    c.buf()[len..2 * len].fill(0);
    assert_eq!(c.run(0, Req::Read(round * len as u64, len, len)), 0);
    let (a, b) = c.buf().split_at(len);
    assert!(a == &b[..len], "data read back differs (round {round})");
}

#[test]
fn malformed_messages_are_refused_and_the_next_frontend_is_served() {
    let dir = TestDir::new("hostile-frontend");
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let mut d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let pid = d.pid();
    let base = probe_fds(pid, &d.sock, usize::MAX);
    write_read(&d.sock, 0);
    assert!(
        probe_fds(pid, &d.sock, base) <= base,
        "a valid client leaves fds behind"
    );
    let mut report = Vec::new();
    for (k, (name, setup, send, want)) in rows().into_iter().enumerate() {
        let mut c = prepare(&d.sock, setup);
        send(&mut c);
        let got = outcome(&c);
        assert_eq!(got, want, "{name}");
        if got == Expect::Nack || got == Expect::ConfigFailed {
            assert!(c.fe.alive(), "{name}: the connection should still work");
        }
        drop(c);
        write_read(&d.sock, k as u64 + 1);
        let fds = probe_fds(pid, &d.sock, base);
        assert!(
            fds <= base,
            "{name}: daemon has {fds} fds open, {base} before"
        );
        report.push(format!("{name}: {got:?}"));
    }
    assert!(d.is_running());
    eprintln!("hostile frontend table:\n  {}", report.join("\n  "));
    assert!(d.stop().success());
}

#[test]
fn a_frontend_that_stops_reading_replies_is_disconnected() {
    let dir = TestDir::new("hostile-flood");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let mut d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let fe = Frontend::connect(&d.sock);
    // Requests that each get a reply, never read, until both directions'
    // buffers are full and our writes would block.
    fe.sock.set_nonblocking(true).unwrap();
    let frame = header(R::GET_FEATURES as u32, VERSION_1, 0);
    let mut pending: &[u8] = &frame;
    let mut sent = 0u64;
    loop {
        match (&fe.sock).write(pending) {
            Ok(n) if n == pending.len() => {
                sent += 1;
                pending = &frame;
            }
            Ok(n) => pending = &pending[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Full for now; the daemon is stuck once it stays full.
                let mut pfd = libc::pollfd {
                    fd: fe.sock.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll on one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 1000) } == 0 {
                    break;
                }
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    // Without reading anything, wait for the daemon to give up on us and
    // hang up (reading would unblock it).
    let mut pfd = libc::pollfd {
        fd: fe.sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    assert_eq!(ready, 1, "the daemon kept the stalled connection for 30 s");
    // Its replies up to the hang-up are still there to read.
    fe.sock.set_nonblocking(false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut replies = 0u64;
    loop {
        match fe.recv(deadline.saturating_duration_since(Instant::now())) {
            Answer::Reply(..) => replies += 1,
            Answer::Closed => break,
            Answer::Timeout => panic!("still connected after {replies} of {sent} replies"),
        }
    }
    assert!(replies < sent, "the daemon answered everything ({sent})");
    write_read(&d.sock, 1);
    assert!(d.is_running());
    assert!(d.stop().success());
}

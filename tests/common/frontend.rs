//! A minimal raw vhost-user frontend for hostile tests: it frames messages
//! itself (so it can send malformed ones), shares memfd guest memory, and
//! drives one split virtqueue with whatever descriptors a test writes.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const VERSION_1: u32 = 0x1;
pub const NEED_REPLY: u32 = 0x8;
pub const NOFD: u64 = 0x100;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

const RING_INDIRECT: u64 = 1 << 28;
const RING_EVENT_IDX: u64 = 1 << 29;
/// VHOST_F_LOG_ALL: only the migration tests turn it on.
pub const LOG_ALL: u64 = 1 << 26;

/// Shared guest memory: a memfd mapped here, guest-physical address 0.
pub struct GuestMem {
    pub fd: OwnedFd,
    ptr: *mut u8,
    pub len: usize,
}

impl GuestMem {
    pub fn new(len: usize) -> GuestMem {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"ringblk-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our memfd.
        assert_eq!(unsafe { libc::ftruncate(raw, len as i64) }, 0);
        // SAFETY: a new shared mapping of the whole memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        GuestMem {
            fd,
            ptr: ptr as *mut u8,
            len,
        }
    }

    /// The frontend-virtual address of `gpa`.
    pub fn va(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }

    /// The whole memfd as one region at guest-physical 0.
    pub fn region(&self) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(0, self.len as u64, self.ptr as u64, 0)
    }

    /// Guest memory is shared with the daemon, like a guest's RAM: handing
    /// out mutable views from `&self` is what the memory is.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes(&self, gpa: u64, len: usize) -> &mut [u8] {
        assert!(
            gpa as usize + len <= self.len,
            "test wrote outside guest memory"
        );
        // SAFETY: inside the mapping (asserted); tests are single-threaded
        // writers and the daemon only touches buffers we handed it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(gpa as usize), len) }
    }

    fn volatile_u16(&self, gpa: u64) -> *mut u16 {
        assert!(gpa as usize + 2 <= self.len && gpa.is_multiple_of(2));
        // SAFETY: aligned, inside the mapping.
        unsafe { self.ptr.add(gpa as usize) as *mut u16 }
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        // SAFETY: see volatile_u16; the daemon writes this concurrently.
        u16::from_le(unsafe { std::ptr::read_volatile(self.volatile_u16(gpa)) })
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: see volatile_u16.
        unsafe { std::ptr::write_volatile(self.volatile_u16(gpa), v.to_le()) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// What came back for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Reply(u32, Vec<u8>),
    Closed,
    Timeout,
}

pub struct Frontend {
    pub sock: UnixStream,
}

pub fn header(request: u32, flags: u32, size: usize) -> Vec<u8> {
    let mut h = request.to_le_bytes().to_vec();
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&(size as u32).to_le_bytes());
    h
}

impl Frontend {
    pub fn connect(path: &Path) -> Frontend {
        let sock = UnixStream::connect(path).expect("connect to the daemon");
        Frontend { sock }
    }

    /// Send `bytes` as they are, with `fds` attached to the first byte.
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) {
        if fds.is_empty() {
            (&self.sock).write_all(bytes).expect("send");
        } else {
            let n = self.sock.send_with_fds(&[bytes], fds).expect("sendmsg");
            (&self.sock).write_all(&bytes[n..]).expect("send");
        }
    }

    pub fn send(&self, req: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        let mut msg = header(req, flags, payload.len());
        msg.extend_from_slice(payload);
        self.send_raw(&msg, fds);
    }

    /// Read one reply, waiting at most `limit`.
    pub fn recv(&self, limit: Duration) -> Answer {
        let deadline = Instant::now() + limit;
        let mut hdr = [0u8; 12];
        if let Err(a) = self.read_full(&mut hdr, deadline) {
            return a;
        }
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        if let Err(a) = self.read_full(&mut payload, deadline) {
            return a;
        }
        Answer::Reply(word(0), payload)
    }

    fn read_full(&self, buf: &mut [u8], deadline: Instant) -> Result<(), Answer> {
        let mut done = 0;
        while done < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Answer::Timeout);
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match (&self.sock).read(&mut buf[done..]) {
                Ok(0) => return Err(Answer::Closed),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(Answer::Timeout)
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(Answer::Timeout),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Answer::Closed)
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        Ok(())
    }

    /// Send with NEED_REPLY and return the REPLY_ACK status.
    pub fn ack(&self, req: FrontendReq, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(req as u32, VERSION_1 | NEED_REPLY, payload, fds);
        match self.recv(Duration::from_secs(10)) {
            Answer::Reply(r, p) if r == req as u32 && p.len() == 8 => {
                u64::from_le_bytes(p.try_into().unwrap())
            }
            other => panic!("{req:?}: expected an ack, got {other:?}"),
        }
    }

    /// A request answered with a u64.
    pub fn get_u64(&self, req: FrontendReq) -> u64 {
        self.send(req as u32, VERSION_1, &[], &[]);
        match self.recv(Duration::from_secs(10)) {
            Answer::Reply(r, p) if r == req as u32 && p.len() == 8 => {
                u64::from_le_bytes(p.try_into().unwrap())
            }
            other => panic!("{req:?}: expected a u64 reply, got {other:?}"),
        }
    }

    /// Negotiate protocol features (REPLY_ACK, CONFIG, MQ) only.
    pub fn negotiate_protocol(&self) {
        self.negotiate_protocol_with(VhostUserProtocolFeatures::empty());
    }

    /// [`Self::negotiate_protocol`] plus `extra` (which must be offered).
    pub fn negotiate_protocol_with(&self, extra: VhostUserProtocolFeatures) {
        let f = self.get_u64(FrontendReq::GET_FEATURES);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = self.get_u64(FrontendReq::GET_PROTOCOL_FEATURES);
        let want = (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | extra)
            .bits();
        assert_eq!(p & want, want);
        self.send(
            FrontendReq::SET_PROTOCOL_FEATURES as u32,
            VERSION_1,
            &want.to_le_bytes(),
            &[],
        );
    }

    /// Protocol features plus the device features we use (indirect
    /// descriptors, no event index).
    pub fn handshake(&self) {
        self.handshake_with(VhostUserProtocolFeatures::empty());
    }

    /// [`Self::handshake`] with `extra` protocol features.
    pub fn handshake_with(&self, extra: VhostUserProtocolFeatures) {
        self.negotiate_protocol_with(extra);
        let offered = self.get_u64(FrontendReq::GET_FEATURES);
        let f = (offered & !RING_EVENT_IDX & !LOG_ALL) | RING_INDIRECT;
        assert_eq!(
            self.ack(FrontendReq::SET_FEATURES, &f.to_le_bytes(), &[]),
            0
        );
    }

    pub fn set_mem_table(&self, regions: &[VhostUserMemoryRegion], fds: &[RawFd]) -> u64 {
        self.ack(FrontendReq::SET_MEM_TABLE, &mem_table(regions), fds)
    }

    /// GET_INFLIGHT_FD for `num_queues` of `queue_size`: the reply's
    /// payload (VhostUserInflight) and the region's fd.
    pub fn get_inflight_fd(&self, num_queues: u16, queue_size: u16) -> (Vec<u8>, OwnedFd) {
        let mut p = [0u8; 24];
        p[16..18].copy_from_slice(&num_queues.to_le_bytes());
        p[18..20].copy_from_slice(&queue_size.to_le_bytes());
        self.send(FrontendReq::GET_INFLIGHT_FD as u32, VERSION_1, &p, &[]);
        let mut hdr = [0u8; 12];
        let mut fds = [-1; 1];
        self.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (n, nfds) = {
            let mut iov = [libc::iovec {
                iov_base: hdr.as_mut_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            }];
            // SAFETY: the iovec points at `hdr`, alive for the call.
            unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }.expect("recvmsg")
        };
        assert_eq!(nfds, 1, "GET_INFLIGHT_FD reply without an fd");
        // SAFETY: a descriptor the kernel just gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        self.read_full(&mut hdr[n..], Instant::now() + Duration::from_secs(10))
            .expect("reply header");
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), FrontendReq::GET_INFLIGHT_FD as u32);
        let mut payload = vec![0u8; word(8) as usize];
        self.read_full(&mut payload, Instant::now() + Duration::from_secs(10))
            .expect("reply payload");
        (payload, fd)
    }

    /// SET_LOG_BASE as QEMU sends it with LOG_SHMFD (no NEED_REPLY; the
    /// daemon replies anyway): the answer.
    pub fn set_log_base(&self, fd: RawFd, size: u64, offset: u64) -> Answer {
        let mut p = size.to_le_bytes().to_vec();
        p.extend_from_slice(&offset.to_le_bytes());
        self.send(FrontendReq::SET_LOG_BASE as u32, VERSION_1, &p, &[fd]);
        self.recv(Duration::from_secs(10))
    }

    /// Still serving us: a request with a reply gets one.
    pub fn alive(&self) -> bool {
        self.send(FrontendReq::GET_QUEUE_NUM as u32, VERSION_1, &[], &[]);
        matches!(self.recv(Duration::from_secs(10)), Answer::Reply(r, _) if r == FrontendReq::GET_QUEUE_NUM as u32)
    }
}

/// SET_MEM_TABLE payload for `regions`.
pub fn mem_table(regions: &[VhostUserMemoryRegion]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 4]);
    for r in regions {
        p.extend_from_slice(&r.guest_phys_addr.to_le_bytes());
        p.extend_from_slice(&r.memory_size.to_le_bytes());
        p.extend_from_slice(&r.user_addr.to_le_bytes());
        p.extend_from_slice(&r.mmap_offset.to_le_bytes());
    }
    p
}

pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for a in [desc, used, avail, 0] {
        p.extend_from_slice(&a.to_le_bytes());
    }
    p
}

/// One split virtqueue (queue 0) in guest memory: descriptor table at 0,
/// avail ring after it, used ring on the next page.
pub struct Virtqueue {
    pub size: u16,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

/// One descriptor: guest-physical address, length, flags (NEXT is added
/// by `push_chain` where needed).
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

pub fn desc(addr: u64, len: u32, flags: u16) -> Desc {
    Desc { addr, len, flags }
}

/// Where tests may put data: everything below is ring space.
pub const DATA_BASE: u64 = 1 << 20;

impl Virtqueue {
    /// Set up and start queue 0 of `size` entries (memory already set).
    pub fn start(fe: &Frontend, mem: &GuestMem, size: u16) -> Virtqueue {
        let n = size as u64;
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4096);
        assert!(used + 6 + 8 * n <= DATA_BASE);
        let q = Virtqueue {
            size,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_CLOEXEC).unwrap(),
            call: EventFd::new(libc::EFD_CLOEXEC).unwrap(),
        };
        mem.bytes(0, DATA_BASE as usize).fill(0);
        q.attach(fe, mem, 0);
        q
    }

    /// Set up queue 0 on `fe` with the rings already in memory, starting
    /// at avail index `base` (a reconnecting frontend gives the used index,
    /// as QEMU does when the backend died).
    pub fn attach(&self, fe: &Frontend, mem: &GuestMem, base: u16) {
        let (q, size, avail, used) = (self, self.size, self.avail, self.used);
        let ok =
            |r: FrontendReq, p: &[u8], fds: &[RawFd]| assert_eq!(fe.ack(r, p, fds), 0, "{r:?}");
        ok(
            FrontendReq::SET_VRING_NUM,
            &vring_state(0, size as u32),
            &[],
        );
        ok(
            FrontendReq::SET_VRING_BASE,
            &vring_state(0, base as u32),
            &[],
        );
        let addr = vring_addr(0, mem.va(0), mem.va(used), mem.va(avail));
        ok(FrontendReq::SET_VRING_ADDR, &addr, &[]);
        ok(
            FrontendReq::SET_VRING_CALL,
            &0u64.to_le_bytes(),
            &[q.call.as_raw_fd()],
        );
        ok(
            FrontendReq::SET_VRING_KICK,
            &0u64.to_le_bytes(),
            &[q.kick.as_raw_fd()],
        );
        ok(FrontendReq::SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    }

    /// Put a new call eventfd in place of the current one (sent with the
    /// next `attach`, as a frontend that starts the device again makes a
    /// new one) and return the old one.
    pub fn new_call(&mut self) -> EventFd {
        std::mem::replace(&mut self.call, EventFd::new(libc::EFD_CLOEXEC).unwrap())
    }

    /// Replace the call eventfd of the queue `fe` runs: a new one, sent at
    /// once with SET_VRING_CALL (acked). Returns the old one.
    pub fn replace_call(&mut self, fe: &Frontend) -> EventFd {
        let old = self.new_call();
        assert_eq!(
            fe.ack(
                FrontendReq::SET_VRING_CALL,
                &0u64.to_le_bytes(),
                &[self.call.as_raw_fd()]
            ),
            0,
            "SET_VRING_CALL"
        );
        old
    }

    /// Chains the driver has taken from the used ring (`wait_used`).
    pub fn consumed(&self) -> u16 {
        self.last_used
    }

    /// The used ring's guest-physical address.
    pub fn used_gpa(&self) -> u64 {
        self.used
    }

    /// Resend queue 0's addresses, as QEMU does on a running ring when a
    /// migration starts (`log`: VHOST_VRING_F_LOG with the used ring's
    /// guest-physical address) or ends (None). Returns the ack status.
    pub fn set_used_log(&self, fe: &Frontend, mem: &GuestMem, log: Option<u64>) -> u64 {
        let mut p = vring_addr(0, mem.va(0), mem.va(self.used), mem.va(self.avail));
        if let Some(gpa) = log {
            p[4..8].copy_from_slice(&1u32.to_le_bytes());
            p[32..40].copy_from_slice(&gpa.to_le_bytes());
        }
        fe.ack(FrontendReq::SET_VRING_ADDR, &p, &[])
    }

    /// The guest-physical ranges of the rings, for tests that move memory.
    pub fn ring_end(&self) -> u64 {
        self.used + 6 + 8 * self.size as u64
    }

    /// Write `chain` into the descriptor table starting at slot `head`
    /// (linked with NEXT), make it available and return its head. The
    /// caller does not kick: see `kick`.
    pub fn push_chain(&mut self, mem: &GuestMem, head: u16, chain: &[Desc]) -> u16 {
        assert!(head as usize + chain.len() <= self.size as usize);
        write_table(mem, head as u64 * 16, chain, head);
        self.publish(mem, head)
    }

    /// Make one head available (the descriptors are already written).
    pub fn publish(&mut self, mem: &GuestMem, head: u16) -> u16 {
        let slot = self.next_avail % self.size;
        mem.write_u16(self.avail + 4 + 2 * slot as u64, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_u16(self.avail + 2, self.next_avail);
        head
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// The used ring's index as the daemon last wrote it (no call fd read).
    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        mem.read_u16(self.used + 2)
    }

    /// Wait until `n` more chains were used; returns (head, len) of each.
    pub fn wait_used(&mut self, mem: &GuestMem, n: usize, limit: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < n {
            let idx = mem.read_u16(self.used + 2);
            while self.last_used != idx {
                let slot = self.last_used % self.size;
                let e = mem.bytes(self.used + 4 + 8 * slot as u64, 8);
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                out.push((id as u16, len));
                self.last_used = self.last_used.wrapping_add(1);
            }
            if out.len() >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} chains completed within {limit:?}",
                out.len()
            );
            // Block on the call eventfd (with a short poll timeout so an
            // interrupt suppressed by the device cannot hang us).
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
                let _ = self.call.read();
            }
        }
        out
    }
}

/// Wait up to `limit` for `call` to be signalled, polling it and nothing
/// else (no look at the used ring, no kick): the count read from it, or
/// None if nobody signalled it in time.
pub fn signalled_within(call: &EventFd, limit: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
        if n > 0 {
            // The daemon makes the eventfd non-blocking; readable means a
            // count is there.
            return Some(call.read().expect("read the call eventfd"));
        }
        let interrupted =
            n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        assert!(
            n == 0 || interrupted,
            "poll: {}",
            std::io::Error::last_os_error()
        );
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// SET_INFLIGHT_FD payload (VhostUserInflight) for a region of `size`
/// bytes at offset 0 of its memfd.
pub fn inflight_payload(size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

/// Write descriptors at `table` (guest-physical), chaining each to the
/// next slot; `first` is the index of the first slot in its table.
pub fn write_table(mem: &GuestMem, table: u64, chain: &[Desc], first: u16) {
    for (k, d) in chain.iter().enumerate() {
        let last = k + 1 == chain.len();
        let flags = if last { d.flags } else { d.flags | DESC_F_NEXT };
        let next = if last { 0 } else { first + k as u16 + 1 };
        let raw = mem.bytes(table + 16 * k as u64, 16);
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
    }
}

/// A virtio-blk request header at `gpa`.
pub fn blk_header(mem: &GuestMem, gpa: u64, kind: u32, sector: u64) {
    let h = mem.bytes(gpa, 16);
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].fill(0);
    h[8..16].copy_from_slice(&sector.to_le_bytes());
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of process `pid`.
pub fn task_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Bytes we sent that the peer has not read yet (SIOCOUTQ on a Unix
/// stream socket): zero once the daemon consumed everything.
pub fn unread_by_peer(sock: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through a valid pointer.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n as usize
}

/// A field of /proc/PID/status in KiB (VmHWM, VmRSS).
pub fn status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

//! Hostile virtio-blk requests through a raw frontend's real virtqueue:
//! each is refused with IOERR, or done correctly where splitting it is the
//! right behaviour, and the daemon's peak memory stays bounded under a full
//! queue of maximal requests, on O_DIRECT real disk and on /dev/shm.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::frontend::*;
use common::*;
use vhost::vhost_user::message::FrontendReq;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const MEM: usize = 64 << 20;
const QUEUE: u16 = 64;
/// Requests in flight during the load: the whole queue (one descriptor
/// each, through indirect tables).
const LOAD: u16 = QUEUE;
/// Peak RSS growth (VmHWM) allowed over the whole hostile load.
const HWM_BOUND_KIB: u64 = 32 * 1024;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

// Guest memory layout above the rings.
const HDR: u64 = DATA_BASE; // request headers, 16 bytes each
const STATUS: u64 = DATA_BASE + 64 * KIB; // status bytes
const TABLES: u64 = DATA_BASE + 128 * KIB; // indirect tables, 64 KiB each
const DATA: u64 = 32 * MIB; // data buffers (up to 32 MiB)

struct Rig {
    d: Daemon,
    fe: Frontend,
    mem: GuestMem,
    q: Virtqueue,
    size_max: u32,
    seg_max: u32,
}

impl Rig {
    fn start(sock: &Path, img: &Path, direct: bool) -> Rig {
        let cache = if direct { "none" } else { "writeback" };
        let d = Daemon::start(sock, &["--image", img.to_str().unwrap(), "--cache", cache]);
        let fe = Frontend::connect(sock);
        fe.handshake();
        let mem = GuestMem::new(MEM);
        assert_eq!(fe.set_mem_table(&[mem.region()], &[mem.fd.as_raw_fd()]), 0);
        let (size_max, seg_max) = config_limits(&fe);
        let q = Virtqueue::start(&fe, &mem, QUEUE);
        Rig {
            d,
            fe,
            mem,
            q,
            size_max,
            seg_max,
        }
    }

    fn hwm(&self) -> u64 {
        status_kib(self.d.pid(), "VmHWM")
    }

    /// Submit one chain (slot = head = its index in the table; slot 0 if
    /// only one is in flight) and return its status byte.
    fn one(&mut self, chain: &[Desc]) -> u8 {
        let status_at = chain.last().unwrap().addr;
        self.mem.bytes(status_at, 1)[0] = 0xff;
        let head = self.q.push_chain(&self.mem, 0, chain);
        self.q.kick();
        let used = self.q.wait_used(&self.mem, 1, Duration::from_secs(60));
        assert_eq!(used[0].0, head);
        self.mem.bytes(status_at, 1)[0]
    }

    /// A request through an indirect table at `table` (its own 64 KiB),
    /// made available at ring slot `slot`.
    fn indirect(&mut self, slot: u16, table: u64, chain: &[Desc]) {
        write_table(&self.mem, table, chain, 0);
        let bytes = (chain.len() * 16) as u32;
        write_table(
            &self.mem,
            slot as u64 * 16,
            &[desc(table, bytes, DESC_F_INDIRECT)],
            slot,
        );
        self.q.publish(&self.mem, slot);
    }
}

/// size_max and seg_max from the device's config space.
fn config_limits(fe: &Frontend) -> (u32, u32) {
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&60u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend(std::iter::repeat_n(0u8, 60));
    fe.send(FrontendReq::GET_CONFIG as u32, VERSION_1, &p, &[]);
    let Answer::Reply(_, r) = fe.recv(Duration::from_secs(10)) else {
        panic!("no GET_CONFIG reply")
    };
    let cfg = &r[12..];
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    (u32_at(8), u32_at(12))
}

fn read_chain(hdr: u64, data: &[(u64, u32)], status: u64) -> Vec<Desc> {
    let mut c = vec![desc(hdr, 16, 0)];
    c.extend(data.iter().map(|&(a, l)| desc(a, l, DESC_F_WRITE)));
    c.push(desc(status, 1, DESC_F_WRITE));
    c
}

fn write_chain(hdr: u64, data: &[(u64, u32)], status: u64) -> Vec<Desc> {
    let mut c = vec![desc(hdr, 16, 0)];
    c.extend(data.iter().map(|&(a, l)| desc(a, l, 0)));
    c.push(desc(status, 1, DESC_F_WRITE));
    c
}

/// The hostile cases on one image; returns (VmHWM before, after) in KiB.
fn hostile_load(dir: &Path, direct: bool) -> (u64, u64) {
    let img = dir.join("disk.raw");
    // Sparse, larger than any request below, so no request fails for
    // being past the end rather than for what it is.
    make_raw(&img, 8 << 30);
    let mut r = Rig::start(&dir.join("sock"), &img, direct);
    let (size_max, seg_max) = (r.size_max, r.seg_max);
    assert!(
        size_max >= 4096 && seg_max >= 2,
        "config {size_max} {seg_max}"
    );

    // A valid request first, so the baseline includes a served request.
    blk_header(&r.mem, HDR, T_IN, 0);
    assert_eq!(r.one(&read_chain(HDR, &[(DATA, 4096)], STATUS)), S_OK);
    let before = r.hwm();

    // A data segment larger than size_max.
    blk_header(&r.mem, HDR, T_IN, 0);
    let big = (size_max as u64 * 2).min(16 * MIB) as u32;
    assert_eq!(
        r.one(&read_chain(HDR, &[(DATA, big)], STATUS)),
        S_IOERR,
        "segment over size_max"
    );

    // ~4 GiB: 1023 descriptors of 4 MiB, all over the same guest memory.
    blk_header(&r.mem, HDR, T_IN, 0);
    let data: Vec<_> = (0..1023).map(|_| (DATA, 4 << 20)).collect();
    r.indirect(0, TABLES, &read_chain(HDR, &data, STATUS));
    r.q.kick();
    r.q.wait_used(&r.mem, 1, Duration::from_secs(120));
    assert_eq!(r.mem.bytes(STATUS, 1)[0], S_IOERR, "~4 GiB chain");

    // ~4 GiB in no more than seg_max descriptors (so the descriptor count
    // alone does not refuse it): 16 MiB each, over the same guest memory.
    blk_header(&r.mem, HDR, T_IN, 0);
    let n = seg_max.min(255) as u64;
    let each = ((4u64 << 30) - MIB) / n;
    let each = (each.min(u32::MAX as u64) & !4095).min(16 * MIB) as u32;
    let data: Vec<_> = (0..n).map(|_| (DATA, each)).collect();
    r.indirect(0, TABLES, &read_chain(HDR, &data, STATUS));
    r.q.kick();
    r.q.wait_used(&r.mem, 1, Duration::from_secs(120));
    assert_eq!(
        r.mem.bytes(STATUS, 1)[0],
        S_IOERR,
        "~4 GiB in large segments"
    );

    // 2,000 descriptors through one indirect table.
    blk_header(&r.mem, HDR, T_IN, 0);
    let data: Vec<_> = (0..1998).map(|k| (DATA + 512 * k, 512)).collect();
    r.indirect(0, TABLES, &read_chain(HDR, &data, STATUS));
    r.q.kick();
    r.q.wait_used(&r.mem, 1, Duration::from_secs(60));
    assert_eq!(r.mem.bytes(STATUS, 1)[0], S_IOERR, "2,000-descriptor chain");

    // Wrong directions: a read whose data the device may only read, a
    // write whose data the device may only write.
    blk_header(&r.mem, HDR, T_IN, 0);
    let wrong_in = [
        desc(HDR, 16, 0),
        desc(DATA, 4096, 0),
        desc(STATUS, 1, DESC_F_WRITE),
    ];
    assert_eq!(r.one(&wrong_in), S_IOERR, "T_IN with device-readable data");
    blk_header(&r.mem, HDR, T_OUT, 0);
    let wrong_out = [
        desc(HDR, 16, 0),
        desc(DATA, 4096, DESC_F_WRITE),
        desc(STATUS, 1, DESC_F_WRITE),
    ];
    assert_eq!(
        r.one(&wrong_out),
        S_IOERR,
        "T_OUT with device-writable data"
    );

    // Misaligned buffers (odd guest addresses) must work, bounced or not,
    // with the right data: write 3 pieces from odd addresses, read back
    // into other odd addresses, compare.
    let len = 192 * KIB as usize;
    pattern(r.mem.bytes(DATA + 1, len), 42, 1);
    blk_header(&r.mem, HDR, T_OUT, 2048);
    let pieces = [
        (DATA + 1, 64 * KIB as u32),
        (DATA + 1 + 64 * KIB, 128 * KIB as u32),
    ];
    assert_eq!(
        r.one(&write_chain(HDR, &pieces, STATUS)),
        S_OK,
        "misaligned write"
    );
    let back = DATA + 8 * MIB + 3;
    r.mem.bytes(back, len).fill(0);
    blk_header(&r.mem, HDR, T_IN, 2048);
    let pieces = [(back, 4096 + 512), (back + 4608, len as u32 - 4608)];
    assert_eq!(
        r.one(&read_chain(HDR, &pieces, STATUS)),
        S_OK,
        "misaligned read"
    );
    let mut expect = vec![0u8; len];
    pattern(&mut expect, 42, 1);
    assert!(
        r.mem.bytes(back, len) == &expect[..],
        "misaligned data came back wrong"
    );

    // The load: the whole queue of maximal reads (seg_max segments of
    // size_max, all over the same misaligned guest memory), in flight at once.
    let seg = size_max.min(16 << 20);
    let data: Vec<_> = (0..seg_max).map(|_| (DATA + 1, seg)).collect();
    for k in 0..LOAD {
        let hdr = HDR + 16 * k as u64;
        blk_header(&r.mem, hdr, T_IN, 0);
        let status = STATUS + k as u64;
        r.mem.bytes(status, 1)[0] = 0xff;
        let table = TABLES + 64 * KIB * k as u64;
        assert!(table + 64 * KIB <= DATA);
        r.indirect(k, table, &read_chain(hdr, &data, status));
    }
    r.q.kick();
    let used =
        r.q.wait_used(&r.mem, LOAD as usize, Duration::from_secs(600));
    assert_eq!(used.len(), LOAD as usize);
    for k in 0..LOAD {
        assert_eq!(
            r.mem.bytes(STATUS + k as u64, 1)[0],
            S_OK,
            "maximal read {k}"
        );
    }
    let after = r.hwm();

    // The daemon still serves a fresh, valid client.
    drop(r.q);
    drop(r.fe);
    let mut c = connect(&r.d.sock, 1).expect("libblkio after the hostile load");
    c.buf()[..4096].fill(0x77);
    assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
    assert_eq!(c.run(0, Req::Read(0, 4096, 4096)), 0);
    assert!(c.buf()[4096..8192].iter().all(|&b| b == 0x77));
    drop(c);
    assert!(r.d.stop().success());
    (before, after)
}

fn check(what: &str, (before, after): (u64, u64)) {
    eprintln!(
        "{what}: VmHWM {before} KiB before, {after} KiB after the hostile load (+{} KiB, bound {HWM_BOUND_KIB} KiB)",
        after.saturating_sub(before)
    );
    assert!(
        after.saturating_sub(before) <= HWM_BOUND_KIB,
        "{what}: peak RSS grew by {} KiB",
        after - before
    );
}

#[test]
fn hostile_requests_on_o_direct_real_disk() {
    let dir = TestDir::new("hostile-req-disk");
    check(
        "O_DIRECT on the work tree's disk",
        hostile_load(&dir.0, true),
    );
}

struct ShmDir(PathBuf);

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn hostile_requests_on_dev_shm() {
    let dir = ShmDir(PathBuf::from(format!(
        "/dev/shm/ringblk-hostile-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    check("/dev/shm", hostile_load(&dir.0, true));
}

//! Crash consistency: every write, write-zeroes and discard that ringblk
//! reported complete is in the image when ringblk dies by SIGKILL, on qcow2
//! (64 KiB and 4 KiB clusters, and over a backing file) as on raw.
//!
//! Each test serves one image through 20 rounds. A round runs a daemon
//! (2 queues, 2 iothreads), keeps 16 requests in flight from a libblkio
//! client (4 KiB writes of patterns naming their sector and the request,
//! write-zeroes and discards, cluster-aligned and not; never a flush), and
//! kills the daemon with SIGKILL after a random number of completions. The
//! disk is then read, and every 512-byte sector must hold a version the
//! rules below allow:
//! - after even rounds by qemu-img, once the kernel has closed the killed
//!   daemon's image (`check` must find no corruption, leaked clusters are
//!   allowed; `convert` gives the disk's contents); the next daemon starts
//!   on the closed image;
//! - after odd rounds by a new daemon started at once, which must wait for
//!   the killed one's image lock by itself (no retry here) and read what it
//!   left; that daemon serves the next round.
//!
//! Every round runs on the same image, damage and all. At the end the
//! last daemon stops cleanly (SIGTERM), qemu-img must read the same disk
//! and find no corruption, and so must a daemon started on the cleanly
//! closed image.
//!
//! What a sector may hold, per request that touched it:
//! - a write that completed: its data; a write-zeroes that completed:
//!   zeros (virtio requires it);
//! - a discard that completed: virtio lets a discard leave old data, but
//!   ringblk's are deterministic, and the rules follow them so that a
//!   discard the crash undid is seen: on raw a punched hole (zeros; where
//!   the filesystem cannot punch holes, old data or zeros); on qcow2, a
//!   cluster the discard covers whole is deallocated, reading zeros without
//!   a backing file and zeros or the backing file's data over one (a zero
//!   flag or an unallocated entry: both are ways to deallocate), while a
//!   cluster it covers in part keeps its data (ringblk leaves it) or reads
//!   zeros (what another implementation may do). So a lost discard of whole
//!   clusters, or on raw, shows as old data where zeros were due;
//! - a request still in flight when the daemon died (submitted, no
//!   completion seen, even after the kill): what the sector held before, or
//!   what the request would have left had it completed; sector by sector,
//!   so a write may be torn at 512-byte granularity (one sector old, the
//!   next new) but never within a sector.
//!
//! No two requests in flight touch the same sector, so "before" is the
//! state the last completed request left. After each check, the model takes
//! the versions the disk showed: the next round starts from them.
//!
//! The workload and the kill points come from a seed printed at the start;
//! `RINGBLK_CRASH_SEED=<seed>` runs the same ones again.

mod common;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blkio::{Blkioq, Completion, ReqFlags};
use common::qemu_img::{check, qemu_img};
use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const SECTOR: u64 = 512;
const SECTORS: u64 = SIZE / SECTOR;
/// Writes are 4 KiB: 8 sectors.
const WRITE_SECTORS: u64 = 8;
const WRITE_LEN: usize = (WRITE_SECTORS * SECTOR) as usize;
const QUEUES: usize = 2;
/// 8 requests in flight on each queue, 16 in all.
const DEPTH: usize = 8;
/// Rounds (kills) per image: the even ones are checked by qemu-img, the odd
/// ones, whose restart is immediate, through the restarted ringblk. Even.
const ROUNDS: usize = 20;

/// qcow2, 64 KiB clusters: writes and partial discards inside clusters.
#[test]
fn qcow2_64k_clusters_keep_completed_requests_across_sigkill() {
    crash_rounds(
        "crash-qcow2-64k",
        Image::Qcow2 {
            cluster: 64 << 10,
            backing: false,
        },
    );
}

/// qcow2, 4 KiB clusters: every aligned write allocates a cluster of its
/// own, and 64 MiB need 32 L2 tables.
#[test]
fn qcow2_4k_clusters_keep_completed_requests_across_sigkill() {
    crash_rounds(
        "crash-qcow2-4k",
        Image::Qcow2 {
            cluster: 4 << 10,
            backing: false,
        },
    );
}

/// The same on tmpfs, where ringblk writes its tables with plain system
/// calls instead of through the ring.
#[test]
fn qcow2_4k_clusters_on_tmpfs_keep_completed_requests_across_sigkill() {
    crash_rounds_in(
        TestDir::in_memory("crash-qcow2-4k-tmpfs"),
        Image::Qcow2 {
            cluster: 4 << 10,
            backing: false,
        },
    );
}

/// qcow2, 16 KiB clusters over a raw backing file holding a pattern in
/// every sector: writes copy the rest of their cluster from it.
#[test]
fn qcow2_over_backing_file_keeps_completed_requests_across_sigkill() {
    crash_rounds(
        "crash-qcow2-backing",
        Image::Qcow2 {
            cluster: 16 << 10,
            backing: true,
        },
    );
}

/// Raw: data goes straight to the file (the default `--cache none`), and
/// discards punch holes.
#[test]
fn raw_keeps_completed_requests_across_sigkill() {
    crash_rounds("crash-raw", Image::Raw);
}

#[derive(Clone, Copy, Debug)]
enum Image {
    Raw,
    Qcow2 { cluster: u64, backing: bool },
}

impl Image {
    fn format(self) -> &'static str {
        match self {
            Image::Raw => "raw",
            Image::Qcow2 { .. } => "qcow2",
        }
    }

    /// Sectors in a cluster; for raw, the unit aligned requests use.
    fn cluster_sectors(self) -> u64 {
        match self {
            Image::Raw => (64 << 10) / SECTOR,
            Image::Qcow2 { cluster, .. } => cluster / SECTOR,
        }
    }

    fn has_backing(self) -> bool {
        matches!(self, Image::Qcow2 { backing: true, .. })
    }
}

// ---------------------------------------------------------------------------
// Data patterns: every 8 bytes of a sector name the sector, the request that
// wrote it (its sequence number; 0 is the backing file) and their place in
// the sector, so a sector read back says exactly which version it is.

const MAGIC: u64 = 0xc5;
const SEQ_BITS: u32 = 28;
const SECTOR_BITS: u32 = 22;
const _: () = assert!(SECTORS <= 1 << SECTOR_BITS);

fn word(sector: u64, seq: u32, i: u64) -> u64 {
    MAGIC << 56 | i << (SECTOR_BITS + SEQ_BITS) | sector << SEQ_BITS | u64::from(seq)
}

/// The data of request `seq` for the sectors from `first` on.
fn fill(buf: &mut [u8], first: u64, seq: u32) {
    for (k, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
        for (i, w) in sector.chunks_mut(8).enumerate() {
            w.copy_from_slice(&word(first + k as u64, seq, i as u64).to_le_bytes());
        }
    }
}

/// One version of a sector's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ver {
    Zero,
    /// The backing file's data (sequence number 0).
    Backing,
    /// The data of write request `seq`.
    Data(u32),
}

/// Which version sector `s`, holding `bytes`, is; or what else it holds.
fn classify(s: u64, bytes: &[u8]) -> Result<Ver, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(Ver::Zero);
    }
    let w0 = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if w0 >> 56 == MAGIC {
        let sector = (w0 >> SEQ_BITS) & ((1 << SECTOR_BITS) - 1);
        let seq = (w0 & ((1 << SEQ_BITS) - 1)) as u32;
        let whole = bytes
            .chunks(8)
            .enumerate()
            .all(|(i, w)| u64::from_le_bytes(w.try_into().unwrap()) == word(sector, seq, i as u64));
        if whole && sector == s {
            return Ok(if seq == 0 {
                Ver::Backing
            } else {
                Ver::Data(seq)
            });
        }
        if whole {
            return Err(format!("the data request #{seq} wrote to sector {sector}"));
        }
    }
    Err(format!("unrecognised bytes {:02x?}...", &bytes[..16]))
}

// ---------------------------------------------------------------------------
// The model.

/// A set of versions a sector may hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Allowed {
    data: Option<u32>,
    zero: bool,
    backing: bool,
}

impl Allowed {
    fn just(v: Ver) -> Allowed {
        Allowed::default().with(v)
    }

    fn with(mut self, v: Ver) -> Allowed {
        match v {
            Ver::Zero => self.zero = true,
            Ver::Backing => self.backing = true,
            Ver::Data(seq) => {
                assert!(self.data.is_none_or(|d| d == seq), "two data versions");
                self.data = Some(seq);
            }
        }
        self
    }

    fn has(self, v: Ver) -> bool {
        match v {
            Ver::Zero => self.zero,
            Ver::Backing => self.backing,
            Ver::Data(seq) => self.data == Some(seq),
        }
    }

    fn versions(self) -> impl Iterator<Item = Ver> {
        let data = self.data.map(Ver::Data);
        let zero = self.zero.then_some(Ver::Zero);
        let backing = self.backing.then_some(Ver::Backing);
        data.into_iter().chain(zero).chain(backing)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zeroes { unmap: bool },
    Discard,
}

/// A request, in sectors.
#[derive(Clone, Copy, Debug)]
struct Op {
    kind: Kind,
    start: u64,
    len: u64,
    round: usize,
}

struct Model {
    image: Image,
    /// raw only: the filesystem punches holes, so a discard leaves zeros.
    punches_holes: bool,
    /// Per sector: what the last completed request left (or, after a
    /// check, what the disk showed).
    settled: Vec<Allowed>,
    /// Per sector: the request in flight on it (its sequence number), or 0.
    in_flight: Vec<u32>,
    /// Per sector: the last request that completed on it since the last
    /// check (for messages), or 0.
    last: Vec<u32>,
    /// Every request, by sequence number (0 stands for the backing file).
    ops: Vec<Op>,
}

impl Model {
    fn new(image: Image, punches_holes: bool) -> Model {
        let start = if image.has_backing() {
            Ver::Backing
        } else {
            Ver::Zero
        };
        Model {
            image,
            punches_holes,
            settled: vec![Allowed::just(start); SECTORS as usize],
            in_flight: vec![0; SECTORS as usize],
            last: vec![0; SECTORS as usize],
            ops: vec![Op {
                kind: Kind::Write,
                start: 0,
                len: SECTORS,
                round: 0,
            }],
        }
    }

    fn is_free(&self, start: u64, len: u64) -> bool {
        self.in_flight[start as usize..(start + len) as usize]
            .iter()
            .all(|&id| id == 0)
    }

    fn submit(&mut self, op: Op) -> u32 {
        assert!(self.is_free(op.start, op.len));
        let id = self.ops.len() as u32;
        assert!(id < 1 << SEQ_BITS, "too many requests for the pattern");
        self.ops.push(op);
        self.in_flight[op.start as usize..(op.start + op.len) as usize].fill(id);
        id
    }

    fn complete(&mut self, id: u32) {
        let op = self.ops[id as usize];
        for s in op.start..op.start + op.len {
            assert_eq!(self.in_flight[s as usize], id);
            self.settled[s as usize] = self.after(id, s);
            self.in_flight[s as usize] = 0;
            self.last[s as usize] = id;
        }
    }

    /// What sector `s` may hold once request `id` completed on it.
    fn after(&self, id: u32, s: u64) -> Allowed {
        let op = self.ops[id as usize];
        let before = self.settled[s as usize];
        match op.kind {
            Kind::Write => Allowed::just(Ver::Data(id)),
            Kind::Zeroes { .. } => Allowed::just(Ver::Zero),
            Kind::Discard => match self.image {
                Image::Raw if self.punches_holes => Allowed::just(Ver::Zero),
                Image::Raw => before.with(Ver::Zero),
                Image::Qcow2 { backing, .. } => {
                    let cs = self.image.cluster_sectors();
                    let cluster = s / cs * cs;
                    let whole = op.start <= cluster && cluster + cs <= op.start + op.len;
                    match (whole, backing) {
                        (true, false) => Allowed::just(Ver::Zero),
                        (true, true) => Allowed::just(Ver::Zero).with(Ver::Backing),
                        (false, _) => before.with(Ver::Zero),
                    }
                }
            },
        }
    }

    /// Whether sector `s` may hold `v` now.
    fn allows(&self, s: u64, v: Ver) -> bool {
        let id = self.in_flight[s as usize];
        self.settled[s as usize].has(v) || (id != 0 && self.after(id, s).has(v))
    }

    fn describe(&self, v: Ver) -> String {
        match v {
            Ver::Zero => "zeros".into(),
            Ver::Backing => "the backing file's data".into(),
            Ver::Data(id) => self.describe_op(id),
        }
    }

    fn describe_op(&self, id: u32) -> String {
        let op = self.ops[id as usize];
        let what = match op.kind {
            Kind::Write => "write",
            Kind::Zeroes { unmap: true } => "write-zeroes (may unmap)",
            Kind::Zeroes { unmap: false } => "write-zeroes (no unmap)",
            Kind::Discard => "discard",
        };
        format!(
            "{what} #{id} (round {}, sectors {}..{})",
            op.round,
            op.start,
            op.start + op.len
        )
    }

    fn describe_allowed(&self, s: u64) -> String {
        let settled = self.settled[s as usize];
        let versions: Vec<String> = settled.versions().map(|v| self.describe(v)).collect();
        let by = match self.last[s as usize] {
            0 => " (untouched this round)".to_string(),
            id if settled == Allowed::just(Ver::Data(id)) => String::new(),
            id => format!(" (left by {})", self.describe_op(id)),
        };
        let mut out = format!("completed: {}{by}", versions.join(" or "));
        let id = self.in_flight[s as usize];
        if id != 0 {
            out += &format!("; in flight: {}", self.describe_op(id));
        }
        out
    }
}

/// Check `disk` (the whole disk as `reader` saw it) against the model.
/// Returns the version of every sector, and how many sectors showed a
/// request that was in flight; or a report of the sectors that hold what
/// they may not.
fn verify(model: &Model, disk: &[u8], reader: &str) -> Result<(Vec<Ver>, usize), String> {
    assert_eq!(disk.len() as u64, SIZE, "{reader}: disk size");
    let mut seen = Vec::with_capacity(SECTORS as usize);
    let mut from_in_flight = 0;
    let mut bad = 0;
    let mut report = String::new();
    let mut last_bad_block = u64::MAX;
    let mut lines = 0;
    for (s, bytes) in disk.chunks(SECTOR as usize).enumerate() {
        let s = s as u64;
        let got = classify(s, bytes);
        match got {
            Ok(v) if model.allows(s, v) => {
                seen.push(v);
                from_in_flight += !model.settled[s as usize].has(v) as usize;
                continue;
            }
            _ => {}
        }
        bad += 1;
        // One line per 4 KiB block, for the first few.
        if s / 8 != last_bad_block && lines < 16 {
            last_bad_block = s / 8;
            lines += 1;
            let got = match got {
                Ok(v) => model.describe(v),
                Err(e) => e,
            };
            report += &format!(
                "  sector {s} (offset {}): holds {got}; allowed: {}\n",
                s * SECTOR,
                model.describe_allowed(s)
            );
        }
        seen.push(Ver::Zero);
    }
    if bad > 0 {
        return Err(format!(
            "{bad} sectors as {reader} reads them hold what they may not:\n{report}"
        ));
    }
    Ok((seen, from_in_flight))
}

/// The model learns what the disk holds: the next round starts from it.
fn settle(model: &mut Model, seen: &[Ver]) {
    for (s, &v) in seen.iter().enumerate() {
        model.settled[s] = Allowed::just(v);
        model.in_flight[s] = 0;
        model.last[s] = 0;
    }
}

// ---------------------------------------------------------------------------
// The workload.

/// Deterministic pseudo-random numbers (xorshift64*, seeded by splitmix64).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seed: `RINGBLK_CRASH_SEED` (decimal or 0x-hex), else the clock.
fn seed() -> u64 {
    match std::env::var("RINGBLK_CRASH_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("RINGBLK_CRASH_SEED={s}: {e}"))
        }
        Err(_) => {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// A request on sectors no request in flight touches: mostly 4 KiB writes
/// (3 in 4 aligned to 4 KiB, the rest to a sector), else write-zeroes or
/// discards of one or two whole clusters, or of 1 sector to 2 clusters
/// anywhere.
fn next_op(model: &Model, rng: &mut Rng, round: usize) -> Op {
    let cs = model.image.cluster_sectors();
    loop {
        let r = rng.below(100);
        let (kind, start, len) = if r < 80 {
            let start = if rng.below(4) == 0 {
                rng.below(SECTORS - WRITE_SECTORS + 1)
            } else {
                rng.below(SECTORS / WRITE_SECTORS) * WRITE_SECTORS
            };
            (Kind::Write, start, WRITE_SECTORS)
        } else {
            let kind = if r < 90 {
                Kind::Zeroes {
                    unmap: rng.below(2) == 0,
                }
            } else {
                Kind::Discard
            };
            let (start, len) = if rng.below(2) == 0 {
                (rng.below(SECTORS / cs) * cs, cs * (1 + rng.below(2)))
            } else {
                (rng.below(SECTORS), 1 + rng.below(2 * cs))
            };
            (kind, start, len.min(SECTORS - start))
        };
        if model.is_free(start, len) {
            return Op {
                kind,
                start,
                len,
                round,
            };
        }
    }
}

/// Completions `q` has (at least `min`; waiting at most 30 s for them).
fn reap(q: &mut Blkioq, min: usize) -> Result<Vec<Completion>, blkio::Error> {
    let mut c: Vec<_> = (0..QUEUES * DEPTH)
        .map(|_| std::mem::MaybeUninit::<Completion>::uninit())
        .collect();
    let mut timeout = Duration::from_secs(30);
    let got = q.do_io(&mut c, min, Some(&mut timeout), None)?;
    // SAFETY: do_io initialised the first `got` entries.
    Ok(c[..got]
        .iter()
        .map(|x| unsafe { x.assume_init_read() })
        .collect())
}

struct RoundStats {
    completed: usize,
    /// Requests without a completion when SIGKILL was sent.
    at_kill: usize,
    /// Of those, requests whose completion did not turn up after the kill.
    in_flight: usize,
}

/// Run requests at depth 16 on `d` until `kill_at` have completed, kill it
/// with SIGKILL (requests in flight) and wait for the process to be gone.
/// Give every free slot a new request (queued in libblkio; the next reap
/// submits them).
fn refill(
    c: &mut Client,
    base: usize,
    slot_op: &mut [u32],
    model: &mut Model,
    rng: &mut Rng,
    round: usize,
) {
    for (slot, op_id) in slot_op.iter_mut().enumerate() {
        if *op_id != 0 {
            continue;
        }
        let op = next_op(model, rng, round);
        let id = model.submit(op);
        *op_id = id;
        let q = &mut c.queues[slot / DEPTH];
        let (off, len) = (op.start * SECTOR, op.len * SECTOR);
        match op.kind {
            Kind::Write => {
                // SAFETY: the slot's buffer is ours until its request completes.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut((base + slot * WRITE_LEN) as *mut u8, WRITE_LEN)
                };
                fill(buf, op.start, id);
                submit(q, base, Req::Write(off, slot * WRITE_LEN, WRITE_LEN), slot);
            }
            Kind::Zeroes { unmap } => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                submit(q, base, Req::WriteZeroes(off, len, flags), slot);
            }
            Kind::Discard => submit(q, base, Req::Discard(off, len), slot),
        }
    }
}

fn run_round(
    d: Daemon,
    model: &mut Model,
    rng: &mut Rng,
    round: usize,
    kill_at: usize,
) -> RoundStats {
    let mut c = connect_with(&d.sock, QUEUES as i32, QUEUES * DEPTH * WRITE_LEN).unwrap();
    let base = c.region.addr;
    // Slot k (buffer k) belongs to queue k / DEPTH; `slot_op[k]` is the
    // request using it, 0 when free.
    let mut slot_op = vec![0u32; QUEUES * DEPTH];
    let mut completed = 0;
    let mut turn = 0;
    let apply = |model: &mut Model, slot_op: &mut [u32], comps: Vec<Completion>| {
        for comp in &comps {
            let id = slot_op[comp.user_data];
            assert!(id != 0, "completion for a free slot");
            assert_eq!(
                comp.ret,
                0,
                "round {round}: {} failed",
                model.describe_op(id)
            );
            model.complete(id);
            slot_op[comp.user_data] = 0;
        }
        comps.len()
    };
    loop {
        refill(&mut c, base, &mut slot_op, model, rng, round);
        if completed >= kill_at {
            break;
        }
        // Wait on one queue, take what the other has, alternately.
        let comps = reap(&mut c.queues[turn], 1).unwrap();
        assert!(
            !comps.is_empty(),
            "round {round}: no completion within 30 s"
        );
        completed += apply(model, &mut slot_op, comps);
        let comps = reap(&mut c.queues[1 - turn], 0).unwrap();
        completed += apply(model, &mut slot_op, comps);
        turn = 1 - turn;
    }
    // Hand the requests just queued to the daemon, then kill it. A daemon
    // that polls may finish a whole batch before the submitting call
    // returns: then queue a new one, so that the kill finds requests in
    // flight (bounded: a hundred batches never all finish so fast).
    let mut at_kill = 0;
    for _ in 0..100 {
        for q in 0..QUEUES {
            let comps = reap(&mut c.queues[q], 0).unwrap();
            completed += apply(model, &mut slot_op, comps);
        }
        at_kill = slot_op.iter().filter(|&&id| id != 0).count();
        if at_kill > 0 {
            break;
        }
        refill(&mut c, base, &mut slot_op, model, rng, round);
    }
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
    d.wait_exit(Duration::from_secs(10));
    // Completions the daemon published before it died are completions:
    // whatever they claim must be in the image too.
    for q in 0..QUEUES {
        if let Ok(comps) = reap(&mut c.queues[q], 0) {
            for comp in comps {
                let id = slot_op[comp.user_data];
                if comp.ret == 0 && id != 0 {
                    model.complete(id);
                    slot_op[comp.user_data] = 0;
                    completed += 1;
                }
            }
        }
    }
    let in_flight = slot_op.iter().filter(|&&id| id != 0).count();
    // The connection died with the daemon; libblkio is not asked to tear
    // it down.
    std::mem::forget(c);
    RoundStats {
        completed,
        at_kill,
        in_flight,
    }
}

// ---------------------------------------------------------------------------
// Reading the image.

/// Wait until the killed daemon's image file is closed: until no open file
/// description holds a lock on the bytes QEMU's locking uses (100 and up,
/// 200 and up; see src/formats/lock.rs). The kernel closes the file of a
/// killed process only once the io_uring requests it had submitted are
/// done, which can be after the process was reaped; until then one of its
/// writes may still land, and what a reader sees is not final. This is
/// the kernel's own notice (a blocking F_OFD_SETLKW), not a guess.
fn wait_until_closed(img: &Path) {
    let f = File::options().read(true).write(true).open(img).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: flock is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 100;
        fl.l_len = 200;
        let res = loop {
            // SAFETY: fcntl with a valid fd and an initialised flock.
            if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLKW, &fl) } == 0 {
                break Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break Err(e);
            }
        };
        // Closing the file lets our lock go before anyone is told.
        drop(f);
        let _ = tx.send(res);
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("waiting for the lock on {}: {e}", img.display()),
        Err(_) => panic!(
            "{} still locked 30 s after its daemon was killed",
            img.display()
        ),
    }
}

/// `qemu-img check` of a qcow2 image: no corruption (exit 0, or 3 when
/// clusters leaked, which a crash may leave). Its output, the first lines
/// (one line per leaked cluster follows).
fn check_not_corrupt(img: &Path, what: &str) -> String {
    let (code, out) = check(img);
    let lines: Vec<&str> = out.lines().collect();
    let mut head = lines[..lines.len().min(24)].join("\n");
    if lines.len() > 24 {
        head += &format!("\n... {} more lines", lines.len() - 24);
    }
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}:\n{head}"
    );
    format!("qemu-img check (exit {code}):\n{head}")
}

/// The disk as qemu-img reads it.
fn read_with_qemu_img(image: Image, img: &Path, flat: &Path) -> Vec<u8> {
    qemu_img(&[
        "convert",
        "-f",
        image.format(),
        "-O",
        "raw",
        img.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    std::fs::read(flat).unwrap()
}

/// The disk as ringblk serves it.
fn read_with_ringblk(sock: &Path) -> Vec<u8> {
    let mut c = connect_with(sock, 1, MIB as usize).unwrap();
    assert_eq!(c.capacity(), SIZE);
    let mut disk = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(MIB as usize) {
        assert_eq!(
            c.run(0, Req::Read(off, 0, MIB as usize)),
            0,
            "read at {off}"
        );
        disk.extend_from_slice(&c.buf()[..MIB as usize]);
    }
    disk
}

/// Whether the filesystem under `dir` punches holes (where it does not,
/// ringblk's raw discard does nothing).
fn punches_holes(dir: &TestDir) -> bool {
    let p = dir.path("punch-probe");
    let f = File::create(&p).unwrap();
    f.write_all_at(&[0xff; 8192], 0).unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an fd we own.
    let ok = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4096) } == 0;
    drop(f);
    std::fs::remove_file(&p).unwrap();
    ok
}

/// A raw file holding the backing file's version of every sector.
fn make_backing(path: &Path) {
    let f = File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..SIZE).step_by(MIB as usize) {
        fill(&mut buf, off / SECTOR, 0);
        f.write_all_at(&buf, off).unwrap();
    }
}

fn create_image(dir: &TestDir, image: Image) -> std::path::PathBuf {
    let size = SIZE.to_string();
    match image {
        Image::Raw => {
            let img = dir.path("disk.raw");
            make_raw(&img, SIZE);
            img
        }
        Image::Qcow2 { cluster, backing } => {
            let img = dir.path("disk.qcow2");
            let opts = format!("cluster_size={cluster}");
            let mut args = vec!["create", "-f", "qcow2", "-o", &opts];
            if backing {
                make_backing(&dir.path("base.raw"));
                args.extend(["-b", "base.raw", "-F", "raw"]);
            }
            args.extend([img.to_str().unwrap(), &size]);
            qemu_img(&args);
            img
        }
    }
}

fn crash_rounds(name: &str, image: Image) {
    crash_rounds_in(TestDir::new(name), image)
}

fn crash_rounds_in(dir: TestDir, image: Image) {
    let name = &dir.0.file_name().unwrap().to_string_lossy().into_owned();
    let seed = seed();
    eprintln!("{name}: seed {seed:#x} (RINGBLK_CRASH_SEED={seed:#x} runs this workload again)");
    let mut rng = Rng::new(seed);
    let img = create_image(&dir, image);
    let sock = dir.path("sock");
    let flat = dir.path("flat.raw");
    let img_s = img.to_str().unwrap();
    let args = [
        "--image",
        img_s,
        "--format",
        image.format(),
        "--num-queues",
        "2",
        "--iothreads",
        "2",
    ];
    let start = |what: &str| {
        Daemon::try_start(&sock, &args)
            .unwrap_or_else(|e| panic!("{what}: ringblk did not start: {e}"))
    };
    let mut model = Model::new(image, punches_holes(&dir));
    let mut shown = 0;
    let mut next: Option<Daemon> = None;
    for round in 0..ROUNDS {
        let what = format!("{name} round {round} (seed {seed:#x})");
        let d = next.take().unwrap_or_else(|| start(&what));
        // Mostly 1000 to 3000 completions; one round in four is killed soon
        // after the start (a daemon that has just opened a crashed image).
        let kill_at = if rng.below(4) == 0 {
            16 + rng.below(200)
        } else {
            1000 + rng.below(2000)
        } as usize;
        let stats = run_round(d, &mut model, &mut rng, round, kill_at);
        assert!(
            stats.at_kill > 0,
            "{what}: nothing was in flight at the kill"
        );
        let (disk, reader, check_out) = if round % 2 == 0 {
            // qemu-img reads the image the killed daemon left.
            wait_until_closed(&img);
            let out = match image {
                Image::Qcow2 { .. } => check_not_corrupt(&img, &what),
                Image::Raw => String::new(),
            };
            (read_with_qemu_img(image, &img, &flat), "qemu-img", out)
        } else {
            // A new daemon at once, with no wait here: the killed one's
            // image may still be open in the kernel, and the new one must
            // wait for it (its own bounded lock wait) rather than refuse
            // the image or read it before the last writes landed. It reads
            // the disk, then serves the next round.
            let d = Daemon::try_start(&sock, &args).unwrap_or_else(|e| {
                panic!(
                    "{what}: ringblk started right after the kill (which must wait \
                     for the killed one's image lock by itself) failed: {e}"
                )
            });
            let disk = read_with_ringblk(&sock);
            next = Some(d);
            (disk, "ringblk, restarted at once", String::new())
        };
        let (seen, from_in_flight) = verify(&model, &disk, reader).unwrap_or_else(|report| {
            panic!(
                "{what}: killed after {} completions with {} requests in flight \
                 ({} without a completion even after the kill); {report}{check_out}",
                stats.completed, stats.at_kill, stats.in_flight
            )
        });
        eprintln!(
            "{name} round {round}: killed after {} completions with {} in flight \
             ({} without a completion even after the kill); checked by {reader}; \
             {from_in_flight} sectors show requests that were in flight",
            stats.completed, stats.at_kill, stats.in_flight
        );
        shown += from_in_flight;
        settle(&mut model, &seen);
    }
    eprintln!("{name}: {shown} sectors in all showed requests that were in flight at a kill");

    // The end: the daemon that read the last round's disk stops cleanly
    // and qemu-img sees the same; then a daemon started on the cleanly
    // closed image serves it too, and stops cleanly.
    let what = format!("{name} (seed {seed:#x})");
    let d = next.take().expect("the last round restarts the daemon");
    assert!(d.stop().success(), "{what}: ringblk did not stop cleanly");
    if let Image::Qcow2 { .. } = image {
        check_not_corrupt(&img, &format!("{what}, after the clean stop"));
    }
    let disk = read_with_qemu_img(image, &img, &flat);
    if let Err(report) = verify(&model, &disk, "qemu-img after the clean stop") {
        panic!("{what}: {report}");
    }
    let d = start(&what);
    let disk = read_with_ringblk(&sock);
    if let Err(report) = verify(&model, &disk, "ringblk after a clean start") {
        panic!("{what}: {report}");
    }
    assert!(d.stop().success(), "{what}: ringblk did not stop cleanly");
    if let Image::Qcow2 { .. } = image {
        check_not_corrupt(&img, &format!("{what}, after the second clean stop"));
    }
}

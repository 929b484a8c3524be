//! The inflight region's bookkeeping, crashed at every step.
//!
//! A fake used ring (its idx and the heads put on it) stands in for guest
//! memory; the region is a real sealed memfd. Each test runs a prefix of a
//! sequence of steps, "crashes" (drops the tracker, keeps the region),
//! recovers with a fresh tracker the way a new daemon would, and checks the
//! requests it resubmits against what the fake ring says.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use super::*;

const QSIZE: u16 = 8;

#[derive(Clone, Copy, Debug)]
enum Step {
    /// Pop `head` and mark it in flight.
    Mark(u16),
    /// Submit to the backend, and its completion: no region state changes.
    Submit(u16),
    IoDone(u16),
    /// The completion path, in its four writes.
    PrePut(u16),
    UsedWrite(u16),
    Clear(u16),
    SetUsedIdx,
}

/// What the guest sees: the used ring's idx and the heads on it.
#[derive(Default)]
struct FakeRing {
    idx: u16,
    used: Vec<u16>,
}

fn run(t: &QueueInflight, ring: &mut FakeRing, steps: &[Step]) {
    for s in steps {
        match *s {
            Step::Mark(h) => t.mark(h),
            Step::Submit(h) | Step::IoDone(h) => assert!(h < QSIZE),
            Step::PrePut(h) => t.pre_put(h),
            Step::UsedWrite(h) => {
                ring.used.push(h);
                ring.idx = ring.idx.wrapping_add(1);
            }
            // post_put does both writes; the crash between them is
            // simulated in `crash_between_clear_and_used_idx`.
            Step::Clear(h) => t.inflight(h).store(0, Ordering::Relaxed),
            Step::SetUsedIdx => t
                .header_u16(offset_of!(QueueRegionSplit, used_idx))
                .store(ring.idx, Ordering::Relaxed),
        }
    }
}

fn complete(h: u16) -> [Step; 6] {
    use Step::*;
    [
        Submit(h),
        IoDone(h),
        PrePut(h),
        UsedWrite(h),
        Clear(h),
        SetUsedIdx,
    ]
}

/// Four requests popped in the order 3, 1, 5, 2, completed out of order
/// (1, 5, 3, 2), with a fifth (6) popped in between.
fn scenario() -> Vec<Step> {
    use Step::*;
    let mut s = vec![Mark(3), Mark(1), Mark(5)];
    s.extend(complete(1));
    s.push(Mark(2));
    s.extend(complete(5));
    s.push(Mark(6));
    s.extend(complete(3));
    s.extend(complete(6));
    s.extend(complete(2));
    s
}

fn fresh(queue_size: u16) -> (Arc<InflightMap>, OwnedFd, QueueInflight) {
    let (map, fd) = InflightMap::create(1, queue_size).expect("create region");
    let map = Arc::new(map);
    let t = map.queue(0, queue_size).expect("tracker");
    assert_eq!(t.recover(0), Recovery::default().with_next(None));
    (map, fd, t)
}

impl Recovery {
    fn with_next(mut self, n: Option<u16>) -> Self {
        self.next_avail = n;
        self
    }
}

#[test]
fn every_crash_point_resubmits_exactly_the_requests_without_a_used_entry() {
    let steps = scenario();
    for cut in 0..=steps.len() {
        let (map, _fd, t) = fresh(QSIZE);
        let mut ring = FakeRing::default();
        run(&t, &mut ring, &steps[..cut]);
        drop(t); // the daemon dies here

        // What must be resubmitted: popped (marked) in pop order, minus
        // those with a used entry.
        let popped: Vec<u16> = steps[..cut]
            .iter()
            .filter_map(|s| match s {
                Step::Mark(h) => Some(*h),
                _ => None,
            })
            .collect();
        let want: Vec<u16> = popped
            .iter()
            .copied()
            .filter(|h| !ring.used.contains(h))
            .collect();

        let t = map.queue(0, QSIZE).expect("tracker");
        let rec = t.recover(ring.idx);
        assert_eq!(
            rec.resubmit,
            want,
            "crash after step {cut}: {:?}",
            &steps[..cut]
        );
        assert_eq!(
            rec.next_avail,
            Some(popped.len() as u16),
            "crash after step {cut}: next avail must follow every popped request"
        );
        assert!(rec.repaired.is_empty(), "cut {cut}: {:?}", rec.repaired);

        // Recovery is itself crash-safe: doing it again gives the same.
        let again = map.queue(0, QSIZE).expect("tracker").recover(ring.idx);
        assert_eq!(again.resubmit, want, "second recovery after step {cut}");

        // The new daemon finishes the resubmitted requests, then pops a
        // new one: its counter orders it after all of them.
        let t = map.queue(0, QSIZE).expect("tracker");
        t.recover(ring.idx);
        for &h in &want {
            run(&t, &mut ring, &complete(h));
        }
        let fresh_head = (0..QSIZE)
            .find(|h| !popped.contains(h))
            .expect("a free head");
        t.mark(fresh_head);
        // Only the order among requests in flight matters: completed
        // entries' counters are dead.
        let max_resubmitted = want
            .iter()
            .map(|&h| t.counter_of(h).load(Ordering::Relaxed))
            .max();
        if let Some(m) = max_resubmitted {
            assert!(t.counter_of(fresh_head).load(Ordering::Relaxed) > m);
        }
        let rec = map.queue(0, QSIZE).expect("tracker").recover(ring.idx);
        assert_eq!(rec.resubmit, vec![fresh_head], "cut {cut}");
    }
}

#[test]
fn crash_between_clear_and_used_idx() {
    let (map, _fd, t) = fresh(QSIZE);
    let mut ring = FakeRing::default();
    run(&t, &mut ring, &[Step::Mark(4), Step::Mark(0)]);
    t.pre_put(0);
    ring.idx = 1;
    ring.used.push(0);
    // post_put's first write only.
    t.inflight(0).store(0, Ordering::Relaxed);
    let rec = map.queue(0, QSIZE).expect("tracker").recover(ring.idx);
    assert_eq!(rec.resubmit, vec![4]);
    assert_eq!(rec.next_avail, Some(2));
}

#[test]
fn post_put_is_the_two_final_steps() {
    let (map, _fd, t) = fresh(QSIZE);
    t.mark(2);
    t.pre_put(2);
    t.post_put(2, 1);
    let rec = map.queue(0, QSIZE).expect("tracker").recover(1);
    assert_eq!(rec.resubmit, Vec::<u16>::new());
    assert_eq!(rec.next_avail, Some(1));
    assert!(rec.repaired.is_empty());
}

#[test]
fn used_index_wraps() {
    let (map, _fd, t) = fresh(QSIZE);
    // Start near the wrap of the 16-bit indices.
    let base = u16::MAX - 1;
    t.header_u16(offset_of!(QueueRegionSplit, used_idx))
        .store(base, Ordering::Relaxed);
    let mut ring = FakeRing {
        idx: base,
        used: Vec::new(),
    };
    run(
        &t,
        &mut ring,
        &[Step::Mark(1), Step::Mark(2), Step::Mark(3)],
    );
    for h in [1, 2] {
        run(&t, &mut ring, &complete(h));
    }
    t.pre_put(3);
    ring.idx = ring.idx.wrapping_add(1); // crash after the used write
    let rec = map.queue(0, QSIZE).expect("tracker").recover(ring.idx);
    assert_eq!(rec.resubmit, Vec::<u16>::new());
    assert_eq!(rec.next_avail, Some(base.wrapping_add(3)));
}

fn pwrite(fd: &OwnedFd, off: u64, bytes: &[u8]) {
    // SAFETY: write from a valid buffer into our own memfd.
    let n = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            off as libc::off_t,
        )
    };
    assert_eq!(n, bytes.len() as isize);
}

#[test]
fn a_scribbled_region_never_yields_a_head_outside_the_ring() {
    // The region is for 16 entries, the ring has 8: entries past 8 and
    // flags other than 0/1 are ignored, whatever the frontend wrote.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let (map, _fd) = InflightMap::create(1, 16).expect("create");
        let map = Arc::new(map);
        let len = region_size(1, 16) as usize;
        let mut junk = vec![0u8; len];
        for b in junk.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        if round % 2 == 0 {
            // Half the rounds claim version 1 so the state is used.
            junk[8] = 1;
            junk[9] = 0;
        }
        pwrite(&_fd, 0, &junk);
        let t = map.queue(0, 8).expect("tracker");
        let rec = t.recover(seed as u16);
        assert!(rec.resubmit.iter().all(|&h| h < 8), "round {round}");
        let mut uniq = rec.resubmit.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), rec.resubmit.len(), "round {round}");
        // And it keeps working afterwards.
        t.mark(7);
        t.pre_put(7);
        t.post_put(7, 1);
    }
}

#[test]
fn a_bad_version_resets_the_region() {
    let (map, fd, t) = fresh(QSIZE);
    t.mark(1);
    pwrite(&fd, 8, &7u16.to_le_bytes());
    let rec = map.queue(0, QSIZE).expect("tracker").recover(0);
    assert_eq!(rec.resubmit, Vec::<u16>::new());
    assert_eq!(rec.next_avail, None);
    assert_eq!(rec.repaired.len(), 1);
}

#[test]
fn ring_larger_than_the_region_or_queue_outside_it_is_refused() {
    let (map, _fd) = InflightMap::create(2, 8).expect("create");
    let map = Arc::new(map);
    assert!(map.queue(2, 8).is_err());
    assert!(map.queue(0, 16).is_err());
    assert!(map.queue(1, 4).is_ok());
}

#[test]
fn layout_matches_the_spec() {
    assert_eq!(queue_region_size(128), 2112);
    assert_eq!(queue_region_size(1), 64);
    assert_eq!(queue_region_size(3), 64);
    assert_eq!(queue_region_size(4), 128);
    assert_eq!(region_size(2, 256), 2 * 4160);
}

fn memfd(len: i64, seal: bool) -> OwnedFd {
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: NUL-terminated name; checked.
    let raw = unsafe { libc::memfd_create(c"ringblk-test".as_ptr(), flags) };
    assert!(raw >= 0);
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sizing our own memfd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
    if seal {
        // SAFETY: sealing our own memfd.
        assert_eq!(
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
            0
        );
    }
    fd
}

#[test]
fn open_checks_the_file() {
    let need = region_size(2, 128);
    // Good: sealed, large enough, at an offset.
    let fd = memfd(need as i64 + 4096, true);
    assert!(InflightMap::open(&fd, need, 4096, 2, 128).is_ok());
    // The file ends before offset + size.
    assert!(InflightMap::open(&fd, need, 8192, 2, 128).is_err());
    // mmap_size smaller than the layout.
    assert!(InflightMap::open(&fd, need - 1, 0, 2, 128).is_err());
    // Not sealed: the frontend could shrink it under us.
    let loose = memfd(need as i64, false);
    assert!(InflightMap::open(&loose, need, 0, 2, 128).is_err());
    // Not a memfd at all.
    let mut p = [0; 2];
    // SAFETY: pipe into a local array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds we own.
    let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    assert!(InflightMap::open(&r, need, 0, 2, 128).is_err());
}

#[test]
fn the_region_we_hand_out_can_be_given_back() {
    let (map, fd) = InflightMap::create(2, 128).expect("create");
    let t = Arc::new(map).queue(1, 128).expect("tracker");
    t.recover(0);
    t.mark(9);
    let back = Arc::new(InflightMap::open(&fd, region_size(2, 128), 0, 2, 128).expect("open"));
    let rec = back.queue(1, 128).expect("tracker").recover(0);
    assert_eq!(rec.resubmit, vec![9]);
    assert_eq!(rec.next_avail, Some(1));
}

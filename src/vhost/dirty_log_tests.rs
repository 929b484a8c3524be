use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use super::*;

fn dirty_pages(log: &LogMap) -> Vec<u64> {
    (0..log.bytes() as u64 * 8)
        .filter(|&p| log.is_dirty(p))
        .collect()
}

#[test]
fn a_gpa_sets_the_bit_of_its_4k_page() {
    let log = LogMap::anonymous(16);
    log.mark(0, 1);
    log.mark(0x1fff, 1);
    log.mark(9 * LOG_PAGE + 123, 1);
    assert_eq!(dirty_pages(&log), vec![0, 1, 9]);
    // Page 9 is bit 1 of byte 1, as the frontend's u64 chunks read it on a
    // little-endian host.
    assert!(log.is_dirty(9));
}

#[test]
fn ranges_mark_every_page_they_touch() {
    let log = LogMap::anonymous(16);
    // Two bytes straddling a page boundary.
    log.mark(3 * LOG_PAGE - 1, 2);
    assert_eq!(dirty_pages(&log), vec![2, 3]);
    // A 64 KiB read starting mid-page: 17 pages.
    let log = LogMap::anonymous(16);
    log.mark(20 * LOG_PAGE + 512, 16 * LOG_PAGE);
    assert_eq!(dirty_pages(&log), (20..=36).collect::<Vec<_>>());
    // Empty ranges mark nothing.
    let log = LogMap::anonymous(16);
    log.mark(5 * LOG_PAGE, 0);
    assert!(dirty_pages(&log).is_empty());
}

#[test]
fn a_range_across_two_memory_regions_is_one_gpa_range() {
    // Regions [0, 1 MiB) and [1 MiB, 2 MiB) are adjacent in GPA; a buffer
    // crossing the boundary marks the last page of one and the first of the
    // next, whatever host mappings lie behind them.
    let log = LogMap::anonymous(64);
    let boundary = 1 << 20;
    log.mark(boundary - 100, 200);
    assert_eq!(
        dirty_pages(&log),
        vec![boundary / LOG_PAGE - 1, boundary / LOG_PAGE]
    );
}

#[test]
fn gpas_past_the_log_are_not_written() {
    // 2 bytes: pages 0..16.
    let log = LogMap::anonymous(2);
    log.mark(16 * LOG_PAGE, 1);
    log.mark(u64::MAX - 10, 100);
    log.mark(1 << 40, LOG_PAGE);
    assert!(dirty_pages(&log).is_empty());
    // A range running off the end marks what is inside only.
    log.mark(14 * LOG_PAGE, 10 * LOG_PAGE);
    assert_eq!(dirty_pages(&log), vec![14, 15]);
}

#[test]
fn two_threads_marking_at_once_lose_no_bit() {
    // Interleaved pages: both threads hit every byte of the bitmap.
    let log = Arc::new(LogMap::anonymous(512));
    let pages = log.bytes() as u64 * 8;
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for p in (t..pages).step_by(2) {
                    log.mark(p * LOG_PAGE, 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("marking thread");
    }
    assert_eq!(dirty_pages(&log).len() as u64, pages);
}

#[test]
fn used_ring_marks_cover_idx_the_element_and_avail_event() {
    let log = LogMap::anonymous(16);
    // A 1024-entry used ring at page 4: the header on page 4, element 600
    // at 4 + 4800 (page 5), avail_event at 4 + 8192 (page 6).
    mark_used(&log, 4 * LOG_PAGE, 1024, Some(600), true);
    assert_eq!(dirty_pages(&log), vec![4, 5, 6]);
    let log = LogMap::anonymous(16);
    mark_used(&log, 4 * LOG_PAGE, 1024, None, false);
    assert_eq!(dirty_pages(&log), vec![4]);
}

#[test]
fn logging_is_off_until_log_all_and_a_map() {
    let d = DirtyLog::new(2);
    assert!(d.current().is_none());
    d.set_active(true);
    assert!(d.current().is_none(), "no map yet");
    d.set_map(Some(LogMap::anonymous(8)));
    assert!(d.current().is_some());
    d.set_active(false);
    assert!(d.current().is_none());
    d.set_used_log(1, Some(0x5000));
    assert_eq!(d.used_log(1), Some(0x5000));
    assert_eq!(d.used_log(0), None);
    assert_eq!(d.used_log(7), None);
    d.clear();
    assert_eq!(d.used_log(1), None);
    assert!(!d.has_map());
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: NUL-terminated name; checked below.
    let raw = unsafe { libc::memfd_create(c"log-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let f = std::fs::File::from(fd.try_clone().expect("dup the memfd"));
    f.set_len(len).expect("size the memfd");
    fd
}

#[test]
fn open_checks_the_file_and_the_mark_reaches_the_frontend() {
    let fd = memfd(3 * 4096);
    assert!(
        LogMap::open(&fd, 4096, 3 * 4096, -1).is_err(),
        "past the end"
    );
    assert!(LogMap::open(&fd, 0, 0, -1).is_err(), "empty");
    assert!(LogMap::open(&fd, MAX_LOG_BYTES + 1, 0, -1).is_err());
    assert!(LogMap::open(&fd, 4096, u64::MAX - 4095, -1).is_err());
    // SAFETY: plain syscall; checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    // SAFETY: fresh fd.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    assert!(LogMap::open(&efd, 8, 0, -1).is_err(), "an eventfd");
    let log = LogMap::open(&fd, 4096, 4096, -1).expect("map the log");
    log.mark(3 * LOG_PAGE, 1);
    drop(log);
    // The frontend's view: byte 4096 + 0, bit 3.
    let mut f = std::fs::File::from(fd);
    let mut buf = vec![0u8; 3 * 4096];
    use std::io::{Read, Seek};
    f.rewind().expect("rewind");
    f.read_exact(&mut buf).expect("read the log back");
    assert_eq!(buf[4096], 1 << 3);
    assert!(buf.iter().enumerate().all(|(i, &b)| i == 4096 || b == 0));
    f.flush().expect("flush");
}

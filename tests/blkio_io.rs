//! The data path end to end: a real ringblk process, a real libblkio client.

mod common;

use std::os::unix::fs::FileExt;

use blkio::ReqFlags;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn pattern_writes_read_back_on_two_queues_at_once() {
    two_queues_at_once("2");
}

/// The same with both queues on one iothread (what `serve` picks on a
/// machine with two CPUs): the iothread interleaves the two rings' requests.
#[test]
fn pattern_writes_read_back_on_two_queues_sharing_an_iothread() {
    two_queues_at_once("1");
}

fn two_queues_at_once(iothreads: &str) {
    let dir = TestDir::new(&format!("two-queues-{iothreads}"));
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let d = Daemon::start(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--num-queues",
            "2",
            "--iothreads",
            iothreads,
        ],
    );
    let on = format!("2 queue(s) on {iothreads} iothread(s)");
    assert!(d.stdout.contains(&on), "{}", d.stdout);
    let mut c = connect(&d.sock, 2).unwrap();
    assert_eq!(c.capacity(), 64 * MIB);
    let base = c.region.addr;
    let blk = 64 * 1024usize;
    // Queue k owns blocks k, k+2, k+4, ... of the first 32 MiB; both queues
    // run concurrently from their own threads with 8 requests in flight.
    let mut queues = std::mem::take(&mut c.queues);
    std::thread::scope(|s| {
        for (k, q) in queues.iter_mut().enumerate() {
            s.spawn(move || {
                let half = 2 * MIB as usize * k; // buffer area for this queue
                let blocks: Vec<u64> = (0..256u64).filter(|b| b % 2 == k as u64).collect();
                for chunk in blocks.chunks(8) {
                    for (i, &b) in chunk.iter().enumerate() {
                        let off = half + i * blk;
                        // SAFETY: disjoint areas of the mapped region per queue and slot.
                        let buf =
                            unsafe { std::slice::from_raw_parts_mut((base + off) as *mut u8, blk) };
                        pattern(buf, b, 1);
                        submit(q, base, Req::Write(b * blk as u64, off, blk), i);
                    }
                    for comp in wait(q, chunk.len()) {
                        assert_eq!(comp.ret, 0, "write failed");
                    }
                }
                let mut expect = vec![0u8; blk];
                for chunk in blocks.chunks(8) {
                    for (i, &b) in chunk.iter().enumerate() {
                        submit(q, base, Req::Read(b * blk as u64, half + i * blk, blk), i);
                    }
                    for comp in wait(q, chunk.len()) {
                        assert_eq!(comp.ret, 0, "read failed");
                    }
                    for (i, &b) in chunk.iter().enumerate() {
                        pattern(&mut expect, b, 1);
                        // SAFETY: as above.
                        let got = unsafe {
                            std::slice::from_raw_parts((base + half + i * blk) as *const u8, blk)
                        };
                        assert!(got == &expect[..], "block {b} mismatch on queue {k}");
                    }
                }
            });
        }
    });
    c.queues = queues;
    assert_eq!(c.run(0, Req::Flush), 0);
    drop(c);
    assert!(d.stop().success());
    // The data is in the file, not just somewhere in the daemon.
    let f = std::fs::File::open(&img).unwrap();
    let (mut got, mut expect) = (vec![0u8; blk], vec![0u8; blk]);
    for b in 0..256u64 {
        f.read_exact_at(&mut got, b * blk as u64).unwrap();
        pattern(&mut expect, b, 1);
        assert!(got == expect, "block {b} not in the image file");
    }
}

#[test]
fn flush_and_fua_writes_succeed() {
    let dir = TestDir::new("flush");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    c.buf()[..4096].fill(0xab);
    assert_eq!(c.run(0, Req::WriteFua(8192, 0, 4096)), 0);
    assert_eq!(c.run(0, Req::Flush), 0);
    drop(c);
    assert!(d.stop().success());
    let mut got = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut got, 8192)
        .unwrap();
    assert!(got.iter().all(|&b| b == 0xab));
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let dir = TestDir::new("zeroes");
    let img = dir.path("disk.raw");
    make_raw(&img, 16 * MIB);
    let d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    let len = MIB as usize;
    c.buf()[..len].fill(0x5a);
    for off in [0, MIB, 2 * MIB] {
        assert_eq!(c.run(0, Req::Write(off, 0, len)), 0);
    }
    // Write-zeroes allowed to unmap, write-zeroes that must not, discard.
    assert_eq!(c.run(0, Req::WriteZeroes(0, MIB, ReqFlags::empty())), 0);
    assert_eq!(
        c.run(0, Req::WriteZeroes(MIB + 4096, 8192, ReqFlags::NO_UNMAP)),
        0
    );
    assert_eq!(c.run(0, Req::Discard(2 * MIB, MIB)), 0);
    c.buf()[..2 * len].fill(0xff);
    // One 2 MiB buffer is a segment over the advertised size_max (1 MiB),
    // which libblkio leaves to its user to respect: refused. Read it in two.
    assert_ne!(
        c.run(0, Req::Read(0, 0, 2 * len)),
        0,
        "segment over size_max"
    );
    assert_eq!(c.run(0, Req::Read(0, 0, len)), 0);
    assert_eq!(c.run(0, Req::Read(MIB, len, len)), 0);
    let b = c.buf();
    assert!(
        b[..len].iter().all(|&x| x == 0),
        "write-zeroes (unmap) range not zero"
    );
    assert!(
        b[len..len + 4096].iter().all(|&x| x == 0x5a),
        "data before the zeroed range changed"
    );
    assert!(
        b[len + 4096..len + 12288].iter().all(|&x| x == 0),
        "write-zeroes (no unmap) range not zero"
    );
    assert!(
        b[len + 12288..2 * len].iter().all(|&x| x == 0x5a),
        "data after the zeroed range changed"
    );
    drop(c);
    assert!(d.stop().success());
    // The discarded MiB became a hole on a filesystem that supports it.
    let mut got = vec![0xffu8; len];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut got, 2 * MIB)
        .unwrap();
    assert!(
        got.iter().all(|&x| x == 0),
        "discarded range does not read as zeros in the file"
    );
}

#[test]
fn out_of_range_requests_fail_and_the_daemon_keeps_serving() {
    let dir = TestDir::new("range");
    let img = dir.path("disk.raw");
    make_raw(&img, 4 * MIB);
    let mut d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    // Straddling the end, wholly past the end, and a huge sector number.
    assert!(c.run(0, Req::Read(4 * MIB - 4096, 0, 8192)) < 0);
    assert!(c.run(0, Req::Write(4 * MIB, 0, 4096)) < 0);
    assert!(c.run(0, Req::Read(u64::MAX - 511, 0, 512)) < 0);
    assert!(c.run(0, Req::WriteZeroes(4 * MIB - 512, 1024, ReqFlags::empty())) < 0);
    assert!(c.run(0, Req::Discard(8 * MIB, 4096)) < 0);
    // Still serving on the same connection.
    c.buf()[..4096].fill(7);
    assert_eq!(c.run(0, Req::Write(4 * MIB - 4096, 0, 4096)), 0);
    c.buf()[..4096].fill(0);
    assert_eq!(c.run(0, Req::Read(4 * MIB - 4096, 0, 4096)), 0);
    assert!(c.buf()[..4096].iter().all(|&x| x == 7));
    assert!(d.is_running());
    assert!(
        d.log_shows("past the end"),
        "no log line for the bad request"
    );
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = TestDir::new("ro");
    let img = dir.path("disk.raw");
    make_raw(&img, 4 * MIB);
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[0x11; 4096], 0)
        .unwrap();
    let d = Daemon::start(
        &dir.path("sock"),
        &["--image", img.to_str().unwrap(), "--read-only"],
    );
    // libblkio refuses a writable connection because the device says RO.
    let err = connect(&d.sock, 1)
        .err()
        .expect("writable connection to a read-only export");
    assert_eq!(err.errno().raw_os_error(), libc::EROFS, "{err:?}");
    let mut c = connect_read_only(&d.sock).unwrap();
    assert!(c.blkio.get_bool("read-only").unwrap());
    c.buf()[..4096].fill(0x22);
    assert!(c.run(0, Req::Write(0, 0, 4096)) < 0);
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
    assert!(c.buf()[..4096].iter().all(|&x| x == 0x11));
    drop(c);
    assert!(d.stop().success());
    let mut got = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert!(
        got.iter().all(|&x| x == 0x11),
        "read-only image was modified"
    );
}

#[test]
fn a_second_client_connects_after_the_first_leaves() {
    let dir = TestDir::new("reconnect");
    let img = dir.path("disk.raw");
    make_raw(&img, 4 * MIB);
    let mut d = Daemon::start_two_iothreads(&dir.path("sock"), &img, &[]);
    for round in 0..3u8 {
        let mut c = connect(&d.sock, 2).unwrap();
        if round > 0 {
            assert_eq!(c.run(1, Req::Read(0, 0, 4096)), 0);
            assert!(
                c.buf()[..4096].iter().all(|&x| x == round - 1),
                "round {round}: previous client's data missing"
            );
        }
        c.buf()[..4096].fill(round);
        assert_eq!(c.run(0, Req::Write(0, 0, 4096)), 0);
        drop(c);
    }
    assert!(d.is_running());
    assert!(d.stop().success());
}

#[test]
fn null_device_reads_zeros() {
    let dir = TestDir::new("null");
    let d = Daemon::start(
        &dir.path("sock"),
        &["--null", "1G", "--num-queues", "2", "--iothreads", "2"],
    );
    let mut c = connect(&d.sock, 2).unwrap();
    assert_eq!(c.capacity(), 1 << 30);
    c.buf()[..65536].fill(0xee);
    assert_eq!(c.run(1, Req::Write(0, 0, 65536)), 0);
    assert_eq!(c.run(1, Req::Read(0, 0, 65536)), 0);
    assert!(c.buf()[..65536].iter().all(|&x| x == 0));
    drop(c);
    assert!(d.stop().success());
}

//! qcow2 under stress and abuse: concurrent allocation from many queues,
//! kill -9 in the middle of writes, refcount-table growth, refused features
//! and corrupted metadata.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use blkio::ReqFlags;
use common::qemu_img::*;
use common::*;

const BLK: usize = 4096;

/// Every queue writes its own 4 KiB blocks in random order, QD 8, so that
/// neighbouring blocks of one cluster are allocated by different queues at
/// the same moment. Then every block is read back and checked.
#[test]
fn many_queues_allocating_the_same_clusters_lose_nothing() {
    let dir = TestDir::new("qcow2-concurrent");
    let img = dir.path("disk.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        img.to_str().unwrap(),
        "64M",
    ]);
    let queues = 4usize;
    let d = Daemon::start(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--num-queues",
            "4",
            "--iothreads",
            "4",
        ],
    );
    let mut c = connect_with(&d.sock, queues as i32, queues * 8 * BLK).unwrap();
    let base = c.region.addr;
    let blocks = (16 << 20) / BLK as u64; // 16 MiB: 256 clusters, 16 blocks each
    let mut qs = std::mem::take(&mut c.queues);
    std::thread::scope(|s| {
        for (k, q) in qs.iter_mut().enumerate() {
            s.spawn(move || {
                let mut mine: Vec<u64> =
                    (0..blocks).filter(|b| *b as usize % queues == k).collect();
                let mut x = 0x9e37_79b9u64 * (k as u64 + 1);
                for i in (1..mine.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    mine.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let slot_base = base + k * 8 * BLK;
                for chunk in mine.chunks(8) {
                    for (i, &b) in chunk.iter().enumerate() {
                        // SAFETY: each queue and slot owns its own 4 KiB of the region.
                        let buf = unsafe {
                            std::slice::from_raw_parts_mut((slot_base + i * BLK) as *mut u8, BLK)
                        };
                        pattern(buf, b, 7);
                        submit(
                            q,
                            slot_base - base + base,
                            Req::Write(b * BLK as u64, i * BLK, BLK),
                            i,
                        );
                    }
                    for comp in wait(q, chunk.len()) {
                        assert_eq!(comp.ret, 0);
                    }
                }
            });
        }
    });
    c.queues = qs;
    let mut expect = vec![0u8; BLK];
    for b in 0..blocks {
        assert_eq!(
            c.run((b % 4) as usize, Req::Read(b * BLK as u64, 0, BLK)),
            0
        );
        pattern(&mut expect, b, 7);
        assert!(c.buf()[..BLK] == expect[..], "block {b} lost or mixed up");
    }
    drop(c);
    assert!(d.stop().success());
    assert_clean(&img);
    // And qemu-img sees the same data.
    let f = flatten(&img, &dir.path("out.raw"));
    let mut got = vec![0u8; BLK];
    for b in (0..blocks).step_by(37) {
        f.read_exact_at(&mut got, b * BLK as u64).unwrap();
        pattern(&mut expect, b, 7);
        assert!(got == expect, "block {b} differs when qemu-img reads it");
    }
}

/// Phase A: writes, then a completed flush. Phase B: writes elsewhere,
/// killed with SIGKILL mid-stream. The image may leak clusters but must not
/// be corrupt, and everything from phase A must read back.
#[test]
fn kill_9_during_writes_leaves_no_corruption_and_keeps_flushed_data() {
    for round in 0..3u64 {
        let dir = TestDir::new(&format!("qcow2-kill-{round}"));
        let img = dir.path("disk.qcow2");
        let base = dir.path("base.raw");
        make_raw(&base, 32 << 20);
        qemu_io("raw", &base, "write -P 0x33 0 32M");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            "32M",
        ]);
        let mut d = Daemon::start_two_iothreads(&dir.path("sock"), &img, &[]);
        let mut c = connect_with(&d.sock, 2, 1 << 20).unwrap();
        // Phase A: the first 8 MiB, in 12 KiB pieces (crossing 4 KiB clusters).
        let piece = 12 << 10;
        for i in 0..(8 << 20) / piece {
            let off = (i * piece) as u64;
            pattern(&mut c.buf()[..piece], off, round);
            assert_eq!(c.run(i % 2, Req::Write(off, 0, piece)), 0);
        }
        assert_eq!(c.run(0, Req::Flush), 0);
        // Phase B: keep both queues busy past 16 MiB, then kill -9.
        let mut qs = std::mem::take(&mut c.queues);
        let region = c.region.addr;
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for (k, q) in qs.iter_mut().enumerate() {
                let stop = &stop;
                s.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let off = (16 << 20) + ((n * 2 + k as u64) * 20480) % (16 << 20);
                        submit(q, region, Req::Write(off, k * 65536, 20480), 0);
                        match wait_one_for(q, std::time::Duration::from_secs(1)) {
                            Some(c) if c.ret == 0 => {}
                            _ => break, // the daemon is gone
                        }
                        n += 1;
                    }
                });
            }
            // Let phase B get going, then kill without warning.
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(200 + 150 * round) {
                std::thread::yield_now();
            }
            // SIGKILL: the daemon gets no chance to write anything back.
            unsafe { libc::kill(d.pid(), libc::SIGKILL) };
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        std::mem::forget(qs); // the connection died with the daemon
        std::mem::forget(c);
        while d.is_running() {
            std::thread::yield_now();
        }
        let (code, out) = check(&img);
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check says corrupt:\n{out}"
        );
        // Phase A reads back, through ringblk after a restart.
        let d = Daemon::start(&dir.path("sock2"), &["--image", img.to_str().unwrap()]);
        let mut c = connect_with(&d.sock, 1, 1 << 20).unwrap();
        let mut expect = vec![0u8; piece];
        for i in 0..(8 << 20) / piece {
            let off = (i * piece) as u64;
            assert_eq!(c.run(0, Req::Read(off, 0, piece)), 0);
            pattern(&mut expect, off, round);
            assert!(
                c.buf()[..piece] == expect[..],
                "round {round}: flushed write at {off} lost"
            );
        }
        drop(c);
        assert!(d.stop().success());
    }
}

/// 512-byte clusters with 64-bit refcounts: one refcount block covers
/// 32 KiB and the initial table 2 MiB, so writing 24 MiB grows the table
/// several times.
#[test]
fn refcount_table_grows() {
    let dir = TestDir::new("qcow2-reftable");
    let img = dir.path("disk.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        img.to_str().unwrap(),
        "32M",
    ]);
    let d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect_with(&d.sock, 1, 1 << 20).unwrap();
    for i in 0..24u64 {
        pattern(&mut c.buf()[..1 << 20], i, 3);
        assert_eq!(c.run(0, Req::Write(i << 20, 0, 1 << 20)), 0);
    }
    let mut expect = vec![0u8; 1 << 20];
    for i in 0..24u64 {
        assert_eq!(c.run(0, Req::Read(i << 20, 0, 1 << 20)), 0);
        pattern(&mut expect, i, 3);
        assert!(c.buf()[..1 << 20] == expect[..], "MiB {i}");
    }
    drop(c);
    assert!(d.stop().success());
    assert_clean(&img);
}

fn serve_fails(img: &Path, extra: &[&str], want: &str) {
    let dir = img.parent().unwrap();
    let mut args = vec!["serve", "--socket"];
    let sock = dir.join("refused.sock");
    args.push(sock.to_str().unwrap());
    args.extend(["--image", img.to_str().unwrap()]);
    args.extend(extra);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{} was served", img.display());
    assert!(err.contains(want), "expected '{want}' in: {err}");
    assert!(
        err.contains(img.file_name().unwrap().to_str().unwrap()),
        "error does not name the image: {err}"
    );
}

fn set_bit(img: &Path, byte: u64, mask: u8) {
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, byte).unwrap();
    f.write_all_at(&[b[0] | mask], byte).unwrap();
}

#[test]
fn unsupported_features_are_refused_by_name() {
    let dir = TestDir::new("qcow2-refuse");
    let p = |n: &str| dir.path(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // qemu-img times its LUKS key derivation by CPU time, which fails now
    // and then on a loaded machine ("Unable to get accurate CPU usage"):
    // try again then, and only then.
    let enc = s(&p("enc.qcow2"));
    let create_encrypted = || {
        std::process::Command::new("qemu-img")
            .args([
                "create",
                "--object",
                "secret,id=sec0,data=123456",
                "-f",
                "qcow2",
            ])
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0",
                &enc,
                "16M",
            ])
            .output()
            .expect("qemu-img is required (scripts/test installs it)")
    };
    let mut out = create_encrypted();
    for _ in 0..5 {
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage")
        {
            break;
        }
        out = create_encrypted();
    }
    assert!(
        out.status.success(),
        "qemu-img create (encrypted): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serve_fails(&p("enc.qcow2"), &[], "encryption");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&p("data.raw"))),
        &s(&p("ext.qcow2")),
        "16M",
    ]);
    serve_fails(&p("ext.qcow2"), &[], "external data file");
    // Internal snapshots: refused writable, served read-only.
    qemu_img(&["create", "-f", "qcow2", &s(&p("snap.qcow2")), "16M"]);
    qemu_img(&["snapshot", "-c", "s1", &s(&p("snap.qcow2"))]);
    serve_fails(&p("snap.qcow2"), &[], "snapshot");
    let d = Daemon::start(
        &p("ro.sock"),
        &["--image", &s(&p("snap.qcow2")), "--read-only"],
    );
    assert!(d.stop().success());
    // Header bits: dirty (byte 79 bit 0), corrupt (bit 1), unknown (bit 10).
    for (name, byte, mask, want) in [
        ("dirty.qcow2", 79, 1, "qemu-img check -r all"),
        ("corrupt.qcow2", 79, 2, "corrupt"),
        ("unknown.qcow2", 78, 4, "unknown incompatible"),
    ] {
        qemu_img(&["create", "-f", "qcow2", &s(&p(name)), "16M"]);
        set_bit(&p(name), byte, mask);
        serve_fails(&p(name), &[], want);
    }
    // A backing file without a recorded format: never probed.
    make_raw(&p("base.raw"), 16 << 20);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s(&p("nofmt.qcow2")),
    ]);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(p("nofmt.qcow2"))
        .unwrap();
    let mut hdr = vec![0u8; 4096];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let at = hdr
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    f.write_all_at(&[0x12, 0x34, 0x56, 0x78], at as u64)
        .unwrap(); // now an unknown extension
    serve_fails(&p("nofmt.qcow2"), &[], "never probes");
    // A backing file that is missing.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s(&p("lost.qcow2")),
    ]);
    std::fs::remove_file(p("base.raw")).unwrap();
    serve_fails(&p("lost.qcow2"), &[], "base.raw");
}

/// Metadata pointing at nonsense: an open error, or I/O errors for the
/// requests that touch it, and the daemon keeps serving the rest.
#[test]
fn corrupted_tables_give_errors_not_crashes() {
    let dir = TestDir::new("qcow2-hostile");
    let img = dir.path("disk.qcow2");
    // 64 KiB clusters: one L2 table maps 512 MiB.
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "1G"]);
    qemu_io("qcow2", &img, "write -P 0x44 0 1M");
    qemu_io("qcow2", &img, "write -P 0x45 600M 1M");
    // L1 table at 0x30000 (cluster 3): entry 0 points to an unaligned offset.
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&0x8000_0000_0001_2345u64.to_be_bytes(), 0x30000)
        .unwrap();
    let mut d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    assert!(
        c.run(0, Req::Read(0, 0, 4096)) < 0,
        "read through a corrupt L1 entry succeeded"
    );
    assert!(
        c.run(0, Req::Write(4096, 0, 4096)) < 0,
        "write through a corrupt L1 entry succeeded"
    );
    // The other L2 table is fine.
    assert_eq!(c.run(0, Req::Read(600 << 20, 0, 4096)), 0);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0x45));
    assert!(d.is_running());
    drop(c);
    assert!(d.stop().success());

    // L2 entries with reserved bits, and pointing far beyond the file.
    let img2 = dir.path("disk2.qcow2");
    qemu_img(&["create", "-f", "qcow2", img2.to_str().unwrap(), "64M"]);
    qemu_io("qcow2", &img2, "write -P 0x44 0 1M");
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&img2)
        .unwrap();
    let mut l1 = [0u8; 8];
    f.read_exact_at(&mut l1, 0x30000).unwrap();
    let l2 = u64::from_be_bytes(l1) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&0x8000_0000_0000_0002u64.to_be_bytes(), l2)
        .unwrap(); // reserved bit 1
    f.write_all_at(&0x8000_7fff_ffff_0000u64.to_be_bytes(), l2 + 8)
        .unwrap(); // far away
    let mut d = Daemon::start(&dir.path("sock2"), &["--image", img2.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    assert!(c.run(0, Req::Read(0, 0, 4096)) < 0);
    assert!(c.run(0, Req::Read(65536, 0, 4096)) < 0);
    assert_eq!(c.run(0, Req::Read(131072, 0, 4096)), 0);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0x44));
    assert!(d.is_running());
    drop(c);
    assert!(d.stop().success());
}

/// A "refcount maze": the refcounts claim every cluster of a 2^34-cluster
/// range is in use. The first allocating write must fail, quickly, instead
/// of scanning for hours with its iothread stuck; the daemon serves on and
/// stops promptly.
#[test]
fn refcount_maze_fails_the_write_not_the_daemon() {
    let dir = TestDir::new("qcow2-maze");
    let img = dir.path("maze.qcow2");
    // 64 KiB clusters: header, refcount table, refcount block, L1 at
    // clusters 0-3; 16-bit refcounts, 32768 per block.
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "1T"]);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let cluster = 65536u64;
    let block = 2 * cluster;
    // The refcount block says all of its clusters are in use...
    f.write_all_at(&[0, 1].repeat(32768), block).unwrap();
    // ...and a 64-cluster table at cluster 4 points every entry at it:
    // 2^19 entries x 2^15 clusters each.
    let table_clusters = 64u64;
    let entries = (table_clusters * cluster / 8) as usize;
    f.write_all_at(&block.to_be_bytes().repeat(entries), 4 * cluster)
        .unwrap();
    f.write_all_at(&(4 * cluster).to_be_bytes(), 48).unwrap();
    f.write_all_at(&(table_clusters as u32).to_be_bytes(), 56)
        .unwrap();

    let mut d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    let started = std::time::Instant::now();
    let ret = c.run(0, Req::Write(0, 0, 4096));
    let took = started.elapsed();
    assert!(ret < 0, "an allocation through the maze succeeded");
    assert!(
        took < std::time::Duration::from_secs(5),
        "the failing write took {took:?}"
    );
    assert!(
        d.log_shows("in use, past the end of the image file"),
        "{}",
        d.stderr()
    );
    // Reads of unallocated clusters still work, and the daemon stops.
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
    assert!(d.is_running());
    drop(c);
    let stopping = std::time::Instant::now();
    d.stop();
    assert!(stopping.elapsed() < std::time::Duration::from_secs(5));
}

/// Another process cuts a qcow2 image on tmpfs short under the daemon
/// (there its tables are written through a shared mapping, where a store
/// past the end faults): the request whose table now lies past the end
/// fails, the daemon lives on and stops cleanly.
#[test]
fn a_tmpfs_image_cut_short_under_the_daemon_fails_the_write_not_the_daemon() {
    let dir = TestDir::in_memory("qcow2-cut");
    let img = dir.path("disk.qcow2");
    let cs = 4096u64;
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        img.to_str().unwrap(),
        "1G",
    ]);
    let mut d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    // Two clusters under one L2 table (4 KiB clusters: 2 MiB per table).
    let (a, b) = (8 * cs, 9 * cs);
    assert_eq!(c.run(0, Req::Write(a, 0, BLK)), 0);
    assert_eq!(c.run(0, Req::Write(b, 0, BLK)), 0);
    // Header, refcount table and block, L1: the first four clusters stay.
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4 * cs)
        .unwrap();
    // Zeroing a whole allocated cluster changes only its L2 entry (and a
    // refcount): no data write grows the file back first.
    let ret = c.run(0, Req::WriteZeroes(a, cs, ReqFlags::empty()));
    assert!(ret < 0, "a table store past the end succeeded");
    assert!(
        d.log_shows_within("shrank under us", std::time::Duration::from_secs(5)),
        "{}",
        d.stderr()
    );
    assert!(d.is_running());
    // Reads still answer: one the cut took the data of fails, one of a
    // cluster never written reads zeros.
    assert!(c.run(0, Req::Read(b, 0, BLK)) < 0);
    c.buf()[..BLK].fill(0xff);
    assert_eq!(c.run(0, Req::Read(512 << 20, 0, BLK)), 0);
    assert!(c.buf()[..BLK].iter().all(|&x| x == 0));
    drop(c);
    let stopping = std::time::Instant::now();
    d.stop();
    assert!(stopping.elapsed() < std::time::Duration::from_secs(5));
}

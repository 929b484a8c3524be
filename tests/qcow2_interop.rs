//! qcow2 images made by qemu-img, written through ringblk by a real client,
//! must compare identical to a raw reference and pass `qemu-img check`.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use blkio::ReqFlags;
use common::qemu_img::*;
use common::*;

const SIZE: u64 = 64 << 20;

/// Deterministic pseudo-random numbers for the workload.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random writes (sizes from 512 B to 192 KiB, crossing cluster
/// boundaries), write-zeroes and discards through ringblk; the same writes
/// go to `reference` (a raw file). Discard is only mirrored where its
/// effect is defined (zeros) — on a plain image without backing.
fn exercise(sock: &Path, reference: &Path, seed: u64, discard_reads_zero: bool) {
    let mut c = connect_with(sock, 2, 1 << 20).unwrap();
    let refs = File::options()
        .read(true)
        .write(true)
        .open(reference)
        .unwrap();
    let mut rng = Rng(seed);
    let mut data = vec![0u8; 192 << 10];
    for i in 0..300u64 {
        let len = ((rng.next() % 384) + 1) * 512;
        let off = (rng.next() % ((SIZE - len) / 512)) * 512;
        let q = (i % 2) as usize;
        match rng.next() % 10 {
            0 => {
                let unmap = rng.next().is_multiple_of(2);
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                assert_eq!(
                    c.run(q, Req::WriteZeroes(off, len, flags)),
                    0,
                    "write-zeroes {off}+{len}"
                );
                refs.write_all_at(&vec![0u8; len as usize], off).unwrap();
            }
            1 if discard_reads_zero => {
                // Whole clusters are dropped, partial ones left alone; the
                // reference learns what the image reads back.
                assert_eq!(c.run(q, Req::Discard(off, len)), 0, "discard {off}+{len}");
                assert_eq!(c.run(q, Req::Read(off, 0, len as usize)), 0);
                refs.write_all_at(&c.buf()[..len as usize], off).unwrap();
            }
            _ => {
                pattern(&mut data[..len as usize], off, seed + i);
                c.buf()[..len as usize].copy_from_slice(&data[..len as usize]);
                assert_eq!(
                    c.run(q, Req::Write(off, 0, len as usize)),
                    0,
                    "write {off}+{len}"
                );
                refs.write_all_at(&data[..len as usize], off).unwrap();
            }
        }
    }
    // Spot-check reads through ringblk against the reference.
    let mut expect = vec![0u8; 65536];
    for _ in 0..50 {
        let off = (rng.next() % ((SIZE - 65536) / 512)) * 512;
        assert_eq!(c.run(0, Req::Read(off, 0, 65536)), 0);
        refs.read_exact_at(&mut expect, off).unwrap();
        assert!(
            c.buf()[..65536] == expect[..],
            "read at {off} differs from the reference"
        );
    }
    assert_eq!(c.run(1, Req::Flush), 0);
}

#[derive(Clone, Copy, Debug)]
enum Backing {
    None,
    Raw,
    /// qcow2 over raw: a chain of three.
    Qcow2,
}

fn matrix(compat: &str, cluster: &str) {
    for backing in [Backing::None, Backing::Raw, Backing::Qcow2] {
        let dir = TestDir::new(&format!("interop-{compat}-{cluster}-{backing:?}"));
        let img = dir.path("disk.qcow2");
        let reference = dir.path("reference.raw");
        let opts = format!("compat={compat},cluster_size={cluster}");
        let size = SIZE.to_string();
        match backing {
            Backing::None => {
                qemu_img(&[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    img.to_str().unwrap(),
                    &size,
                ]);
                make_raw(&reference, SIZE);
            }
            Backing::Raw | Backing::Qcow2 => {
                let base = dir.path("base.raw");
                make_raw(&base, SIZE - (1 << 20)); // shorter: the tail reads as zeros
                qemu_io("raw", &base, "write -P 0x5a 0 4M");
                qemu_io("raw", &base, "write -P 0x6b 20M 9M");
                let (name, fmt) = if matches!(backing, Backing::Qcow2) {
                    let mid = dir.path("mid.qcow2");
                    qemu_img(&[
                        "create",
                        "-f",
                        "qcow2",
                        "-o",
                        &opts,
                        "-b",
                        "base.raw",
                        "-F",
                        "raw",
                        mid.to_str().unwrap(),
                        &size,
                    ]);
                    qemu_io("qcow2", &mid, "write -P 0x7c 2M 3M");
                    qemu_io("qcow2", &mid, "write -z 22M 1M");
                    ("mid.qcow2", "qcow2")
                } else {
                    ("base.raw", "raw")
                };
                qemu_img(&[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    "-b",
                    name,
                    "-F",
                    fmt,
                    img.to_str().unwrap(),
                    &size,
                ]);
                flatten(&img, &reference);
            }
        }
        let d = Daemon::start_two_iothreads(&dir.path("sock"), &img, &[]);
        exercise(
            &d.sock,
            &reference,
            0x1234_5678 ^ cluster.len() as u64,
            true,
        );
        assert!(d.stop().success());
        let (same, why) = identical(&img, "qcow2", &reference, "raw");
        assert!(
            same,
            "{compat} {cluster} {backing:?}: image differs from the reference: {why}"
        );
        assert_clean(&img);
    }
}

#[test]
fn v2_4k_clusters() {
    matrix("0.10", "4k");
}

#[test]
fn v2_64k_clusters() {
    matrix("0.10", "64k");
}

#[test]
fn v2_2m_clusters() {
    matrix("0.10", "2M");
}

#[test]
fn v3_4k_clusters() {
    matrix("1.1", "4k");
}

#[test]
fn v3_64k_clusters() {
    matrix("1.1", "64k");
}

#[test]
fn v3_2m_clusters() {
    matrix("1.1", "2M");
}

#[test]
fn images_made_by_ringblk_create_pass_qemu_img() {
    let dir = TestDir::new("create");
    let ringblk = env!("CARGO_BIN_EXE_ringblk");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(ringblk)
            .arg("create")
            .args(args)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ringblk create {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["plain.qcow2", "10G"]);
    run(&["--cluster-size", "4K", "small-clusters.qcow2", "3G"]);
    run(&["-f", "raw", "base.raw", "32M"]);
    run(&["-b", "base.raw", "-F", "raw", "overlay.qcow2"]);
    run(&[
        "-b",
        "overlay.qcow2",
        "-F",
        "qcow2",
        "--cluster-size",
        "2M",
        "top.qcow2",
        "64M",
    ]);
    for (name, size) in [
        ("plain.qcow2", "10 GiB"),
        ("small-clusters.qcow2", "3 GiB"),
        ("overlay.qcow2", "32 MiB"),
        ("top.qcow2", "64 MiB"),
    ] {
        let p = dir.path(name);
        assert_clean(&p);
        let info = qemu_img(&["info", p.to_str().unwrap()]);
        assert!(
            info.contains(&format!("virtual size: {size}")),
            "{name}: {info}"
        );
    }
    let info = qemu_img(&["info", dir.path("top.qcow2").to_str().unwrap()]);
    assert!(
        info.contains("backing file: overlay.qcow2") && info.contains("backing file format: qcow2"),
        "{info}"
    );
    assert!(info.contains("cluster_size: 2097152"), "{info}");
    // Refusals: existing file, raw with a backing file, no size.
    for args in [
        &["plain.qcow2", "1G"][..],
        &["-f", "raw", "-b", "base.raw", "-F", "raw", "x.raw", "1G"],
        &["nosize.qcow2"],
    ] {
        let out = std::process::Command::new(ringblk)
            .arg("create")
            .args(args)
            .current_dir(&dir.0)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
    }
}

/// `qemu-img convert -c` images: compressed clusters read back (also as a
/// backing file under an overlay); writing one is refused with an error.
#[test]
fn compressed_clusters_read_back() {
    let dir = TestDir::new("compressed");
    let src = dir.path("src.raw");
    make_raw(&src, 8 << 20);
    {
        let f = File::options().write(true).open(&src).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..6u64 {
            // Compressible but not trivial: a pattern repeated in 4 KiB runs.
            pattern(&mut buf[..4096], i, 9);
            for k in 1..256 {
                buf.copy_within(0..4096, k * 4096);
            }
            f.write_all_at(&buf, i << 20).unwrap();
        }
    }
    let comp = dir.path("golden.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        comp.to_str().unwrap(),
    ]);
    let (_, report) = check(&comp);
    assert!(
        report.contains("compressed clusters") && !report.contains(" 0.00% compressed"),
        "qemu-img made no compressed clusters: {report}"
    );
    let overlay = dir.path("vm.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "golden.qcow2",
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);

    let expect = std::fs::read(&src).unwrap();
    for (img, writable) in [(&comp, false), (&overlay, true)] {
        let d = Daemon::start(&dir.path("sock"), &["--image", img.to_str().unwrap()]);
        let mut c = connect(&d.sock, 1).unwrap();
        for off in (0..8u64 << 20).step_by(1 << 20) {
            assert_eq!(
                c.run(0, Req::Read(off, 0, 1 << 20)),
                0,
                "{}: read at {off}",
                img.display()
            );
            assert!(
                c.buf()[..1 << 20] == expect[off as usize..(off + (1 << 20)) as usize],
                "{}: data at {off}",
                img.display()
            );
        }
        if writable {
            // A partial write to the overlay copies the rest from the compressed backing.
            c.buf()[..512].fill(0xee);
            assert_eq!(c.run(0, Req::Write(4096 + 512, 0, 512)), 0);
            assert_eq!(c.run(0, Req::Read(0, 0, 65536)), 0);
            let mut want = expect[..65536].to_vec();
            want[4608..5120].fill(0xee);
            assert!(c.buf()[..65536] == want[..]);
        } else {
            assert!(
                c.run(0, Req::Write(0, 0, 4096)) < 0,
                "write into a compressed cluster succeeded"
            );
        }
        drop(c);
        assert!(d.stop().success());
        assert_clean(img);
    }

    // Zeroing and discarding compressed clusters drop their references:
    // no leaks, and the ranges read as zeros.
    let d = Daemon::start(&dir.path("sock"), &["--image", comp.to_str().unwrap()]);
    let mut c = connect(&d.sock, 1).unwrap();
    assert_eq!(c.run(0, Req::WriteZeroes(0, 2 << 20, ReqFlags::empty())), 0);
    assert_eq!(c.run(0, Req::Discard(2 << 20, 1 << 20)), 0);
    assert_eq!(c.run(0, Req::Read(0, 0, 1 << 20)), 0);
    assert!(c.buf()[..1 << 20].iter().all(|&b| b == 0));
    assert_eq!(c.run(0, Req::Read(3 << 20, 0, 1 << 20)), 0);
    assert!(
        c.buf()[..1 << 20] == expect[3 << 20..4 << 20],
        "untouched compressed data changed"
    );
    drop(c);
    assert!(d.stop().success());
    assert_clean(&comp);
}

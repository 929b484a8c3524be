//! Clean shutdown under load: SIGTERM while two queues write to a qcow2
//! image as fast as they can. The daemon must exit 0 promptly, leave an
//! image `qemu-img check` finds clean (no leaks), and keep every write it
//! acknowledged.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::qemu_img::*;
use common::*;

const BLK: usize = 4096;
const QD: usize = 16;
const BLOCKS_PER_QUEUE: usize = 2048;

#[test]
fn sigterm_during_qcow2_writes_exits_clean_and_keeps_acknowledged_data() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        run(signal);
    }
}

fn run(signal: i32) {
    let dir = TestDir::new(&format!("shutdown-{signal}"));
    let img = dir.path("disk.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        img.to_str().unwrap(),
        "32M",
    ]);
    let d = Daemon::start_two_iothreads(&dir.path("sock"), &img, &[]);
    let mut c = connect_with(&d.sock, 2, 2 * QD * BLK).unwrap();
    let base = c.region.addr;
    let mut qs = std::mem::take(&mut c.queues);
    // acked[k][i]: the last round whose write of queue k's block i completed.
    let acked: Vec<Vec<AtomicU64>> = (0..2)
        .map(|_| (0..BLOCKS_PER_QUEUE).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let total = AtomicU64::new(0);
    let gone = AtomicBool::new(false);
    let started = std::thread::scope(|s| {
        for (k, vq) in qs.iter_mut().enumerate() {
            let (acked, total, gone) = (&acked[k], &total, &gone);
            s.spawn(move || {
                let block = |i: usize| (i * 2 + k) as u64;
                for round in 1u64.. {
                    for chunk in (0..BLOCKS_PER_QUEUE).collect::<Vec<_>>().chunks(QD) {
                        for (slot, &i) in chunk.iter().enumerate() {
                            let addr = base + (k * QD + slot) * BLK;
                            // SAFETY: this slot is ours until its write completes.
                            let buf =
                                unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, BLK) };
                            pattern(buf, block(i), round);
                            submit(
                                vq,
                                base,
                                Req::Write(block(i) * BLK as u64, addr - base, BLK),
                                i,
                            );
                        }
                        for _ in chunk {
                            match wait_one_for(vq, Duration::from_secs(2)) {
                                Some(c) if c.ret == 0 => {
                                    acked[c.user_data].store(round, Ordering::SeqCst);
                                    total.fetch_add(1, Ordering::SeqCst);
                                }
                                // The daemon went away: stop here.
                                _ => return gone.store(true, Ordering::SeqCst),
                            }
                        }
                    }
                    submit(vq, base, Req::Flush, 0);
                    if !matches!(wait_one_for(vq, Duration::from_secs(2)), Some(c) if c.ret == 0) {
                        return gone.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
        // Let the load build up (allocation included), then signal.
        while total.load(Ordering::SeqCst) < 6000 {
            assert!(!gone.load(Ordering::SeqCst), "I/O failed before the signal");
            std::thread::yield_now();
        }
        // SAFETY-free: kill(2) through libc on our child's pid.
        unsafe { libc::kill(d.pid(), signal) };
        Instant::now()
    });
    let status = d.wait_exit(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(status.success(), "signal {signal}: exit status {status}");
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
    std::mem::forget(qs); // the connection died with the daemon
    std::mem::forget(c);

    let (code, out) = check(&img);
    assert_eq!(code, 0, "qemu-img check after a clean shutdown:\n{out}");
    let f = flatten(&img, &dir.path("flat.raw"));
    let (mut got, mut want, mut next) = (vec![0u8; BLK], vec![0u8; BLK], vec![0u8; BLK]);
    let mut checked = 0;
    for (k, blocks) in acked.iter().enumerate() {
        for (i, r) in blocks.iter().enumerate() {
            let r = r.load(Ordering::SeqCst);
            let b = (i * 2 + k) as u64;
            f.read_exact_at(&mut got, b * BLK as u64).unwrap();
            // Acknowledged round r; round r + 1 may have been in flight.
            pattern(&mut next, b, r + 1);
            if r == 0 {
                assert!(got.iter().all(|&x| x == 0) || got == next, "block {b}");
                continue;
            }
            pattern(&mut want, b, r);
            assert!(
                got == want || got == next,
                "block {b}: acknowledged round {r} lost"
            );
            checked += 1;
        }
    }
    // 6000 writes were acknowledged before the signal: most blocks hold one.
    assert!(checked >= 3000, "only {checked} blocks were checked");
}

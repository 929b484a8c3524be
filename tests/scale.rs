//! Many exports in one daemon: what each costs once it has been served.

mod common;

use common::*;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// 100 null exports on one iothread (qemu-storage-daemon's command line),
/// each served once by a libblkio client that reads a block: no thread per
/// export, and the daemon's RSS may grow by at most 256 KiB per export.
/// With transparent huge pages for the allocator's per-thread memory it
/// grew by about 720 KiB (a 2 MiB page for each export's thread); with a
/// thread per export but no huge pages, by about 75 KiB; now about 50 KiB.
#[test]
fn an_export_served_once_keeps_little_memory() {
    const N: usize = 100;
    let dir = TestDir::new("scale-rss");
    let mut args = vec!["--object".to_string(), "iothread,id=io0".to_string()];
    for i in 0..N {
        args.push("--blockdev".into());
        args.push(format!("driver=null-co,node-name=n{i},size=1G"));
        args.push("--export".into());
        args.push(format!(
            "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={},writable=on,iothread=io0",
            dir.path(&format!("s{i}.sock")).display()
        ));
    }
    let d = Daemon::start_qsd(&dir.path(&format!("s{}.sock", N - 1)), &args, |_| {});
    // Idle exports share one thread that takes their frontends.
    let (_, threads) = fds_and_threads(d.pid());
    assert!(threads < 10, "{threads} threads for {N} idle exports");
    // The first session sets up what every later one shares.
    let mut c = connect(&dir.path("s0.sock"), 1).unwrap();
    assert_eq!(c.run(0, Req::Read(0, 0, 4096)), 0);
    drop(c);
    let before = rss_kib(d.pid());
    for i in 1..N {
        let mut c = connect(&dir.path(&format!("s{i}.sock")), 1).unwrap();
        assert_eq!(
            c.run(0, Req::Read(4096 * i as u64, 0, 4096)),
            0,
            "export e{i}"
        );
    }
    // Every connection's thread ended with it.
    let (_, threads) = fds_and_threads(d.pid());
    assert!(
        threads < 10,
        "{threads} threads after serving {N} exports once"
    );
    let grown = rss_kib(d.pid()).saturating_sub(before);
    let per_export = grown / (N as u64 - 1);
    eprintln!(
        "RSS grew {grown} KiB for {} exports served: {per_export} KiB each",
        N - 1
    );
    assert!(
        per_export <= 256,
        "RSS grew {grown} KiB for {} exports served: {per_export} KiB each",
        N - 1
    );
    d.stop();
}

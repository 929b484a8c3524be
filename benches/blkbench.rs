//! Benchmark client: drives a vhost-user-blk socket through libblkio (the
//! same client for ringblk and qemu-storage-daemon) and prints one JSON line.
//!
//! blkbench --socket PATH [--queues N] [--iodepth D] [--rw randread|randwrite]
//!          [--bs BYTES] [--seconds S] [--warmup S] [--span BYTES] [--poll]
//!          [--idle S]
//!
//! With `--poll` the N queues are libblkio poll queues (`num-queues=0`,
//! `num-poll-queues=N`): the client busy-polls the used ring and never
//! asks for a notification, so the backend's own per-request cost is what
//! limits the rate.
//!
//! With `--idle S` the client connects, starts its queues, does no I/O for
//! S seconds and exits (for measuring what an idle connection costs).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

struct Opts {
    socket: String,
    queues: usize,
    iodepth: usize,
    write: bool,
    bs: usize,
    seconds: f64,
    warmup: f64,
    span: u64,
    poll: bool,
    idle: Option<f64>,
}

fn parse() -> Opts {
    let mut o = Opts {
        socket: String::new(),
        queues: 1,
        iodepth: 1,
        write: false,
        bs: 4096,
        seconds: 3.0,
        warmup: 0.5,
        span: 1 << 30,
        poll: false,
        idle: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--poll" {
            o.poll = true;
            i += 1;
            continue;
        }
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--socket" => o.socket = v,
            "--queues" => o.queues = v.parse().expect("--queues"),
            "--iodepth" => o.iodepth = v.parse().expect("--iodepth"),
            "--rw" => o.write = v == "randwrite",
            "--bs" => o.bs = v.parse().expect("--bs"),
            "--seconds" => o.seconds = v.parse().expect("--seconds"),
            "--warmup" => o.warmup = v.parse().expect("--warmup"),
            "--span" => o.span = v.parse().expect("--span"),
            "--idle" => o.idle = Some(v.parse().expect("--idle")),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    assert!(!o.socket.is_empty(), "--socket is required");
    o
}

struct QueueResult {
    ios: u64,
    lat_ns: Vec<u32>,
    /// The longest request, unsaturated (`lat_ns` saturates at 4.29 s).
    max_ns: u128,
    errors: u64,
}

fn main() {
    let o = parse();
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", &o.socket).unwrap();
    b.connect().expect("connect");
    if o.poll {
        b.set_i32("num-queues", 0).unwrap();
        b.set_i32("num-poll-queues", o.queues as i32).unwrap();
    } else {
        b.set_i32("num-queues", o.queues as i32).unwrap();
    }
    let started = b.start().expect("start");
    let queues = if o.poll {
        started.poll_queues
    } else {
        started.queues
    };
    if let Some(idle) = o.idle {
        std::thread::sleep(Duration::from_secs_f64(idle));
        drop(queues);
        println!("{{\"iops\": 0, \"ios\": 0, \"errors\": 0, \"avg_us\": 0, \"p99_us\": 0, \"seconds\": {idle}}}");
        return;
    }
    let capacity = b.get_u64("capacity").unwrap();
    let span = o.span.min(capacity) / o.bs as u64;
    let region = b.alloc_mem_region(o.queues * o.iodepth * o.bs).unwrap();
    b.map_mem_region(&region).unwrap();
    let base = region.addr;
    let (iodepth, bs, write) = (o.iodepth, o.bs, o.write);
    let warmup = Duration::from_secs_f64(o.warmup);
    let run = Duration::from_secs_f64(o.seconds);

    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(qi, mut q)| {
                s.spawn(move || {
                    let mut rng: u64 = 0x2545_f491_4f6c_dd1d ^ ((qi as u64 + 1) * 0x9e37_79b9);
                    let mut next = move || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        (rng % span) * bs as u64
                    };
                    let buf = |slot: usize| base + (qi * iodepth + slot) * bs;
                    let mut sent = vec![Instant::now(); iodepth];
                    let issue = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
                        if write {
                            q.write(off, buf(slot) as *const u8, bs, slot, ReqFlags::empty())
                        } else {
                            q.read(off, buf(slot) as *mut u8, bs, slot, ReqFlags::empty())
                        }
                    };
                    for (slot, t) in sent.iter_mut().enumerate() {
                        *t = Instant::now();
                        issue(&mut q, slot, next());
                    }
                    let begin = Instant::now();
                    let mut measuring = false;
                    let mut res = QueueResult {
                        ios: 0,
                        lat_ns: Vec::with_capacity(1 << 20),
                        max_ns: 0,
                        errors: 0,
                    };
                    let mut comps: Vec<MaybeUninit<Completion>> =
                        (0..iodepth).map(|_| MaybeUninit::uninit()).collect();
                    loop {
                        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
                        let now = Instant::now();
                        if !measuring && now - begin >= warmup {
                            measuring = true;
                            res.ios = 0;
                            res.lat_ns.clear();
                            res.max_ns = 0;
                        }
                        let done = measuring && now - begin >= warmup + run;
                        for c in &comps[..n] {
                            // SAFETY: do_io initialised the first n entries.
                            let c = unsafe { c.assume_init_read() };
                            if c.ret != 0 {
                                res.errors += 1;
                            }
                            res.ios += 1;
                            let took = (now - sent[c.user_data]).as_nanos();
                            res.max_ns = res.max_ns.max(took);
                            res.lat_ns.push(took.min(u32::MAX as u128) as u32);
                            if !done {
                                sent[c.user_data] = Instant::now();
                                issue(&mut q, c.user_data, next());
                            }
                        }
                        if done {
                            break;
                        }
                    }
                    // Requests still in flight are abandoned with the connection.
                    res
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let max = results.iter().map(|r| r.max_ns).max().unwrap_or(0);
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.lat_ns).collect();
    lat.sort_unstable();
    let avg = lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len().max(1) as f64;
    let p99 = lat.get(lat.len() * 99 / 100).copied().unwrap_or(0);
    println!(
        "{{\"iops\": {:.0}, \"ios\": {ios}, \"errors\": {errors}, \"avg_us\": {:.2}, \"p99_us\": {:.2}, \"max_us\": {:.2}, \"seconds\": {}}}",
        ios as f64 / o.seconds,
        avg / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0,
        o.seconds
    );
}

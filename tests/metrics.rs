//! `--metrics`: Prometheus text over HTTP, checked by `promtool check
//! metrics` (Prometheus' own linter) and against the I/O a libblkio client
//! did; bad addresses and hostile HTTP clients.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// One HTTP request over the metrics socket; the whole response.
fn http(sock: &Path, request: &str) -> String {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// GET /metrics; the body, after checking the status line.
fn scrape(sock: &Path) -> String {
    let resp = http(sock, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// `promtool check metrics` on `text`: Prometheus' rules for names, types,
/// help and histograms.
fn promtool_accepts(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused the metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `name{labels}` (labels exactly as printed).
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn counters_move_by_the_io_done_and_promtool_accepts_them() {
    let dir = TestDir::new("metrics");
    let img = dir.path("disk.raw");
    make_raw(&img, 64 * MIB);
    let metrics = dir.path("metrics.sock");
    let d = Daemon::start(
        &dir.path("sock"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--metrics",
            &format!("unix:{}", metrics.display()),
        ],
    );
    let before = scrape(&metrics);
    promtool_accepts(&before);
    let reads = r#"ringblk_export_requests_total{export="vda",queue="0",op="read"}"#;
    let writes = r#"ringblk_export_requests_total{export="vda",queue="0",op="write"}"#;
    let wbytes = r#"ringblk_export_bytes_total{export="vda",queue="0",op="write"}"#;
    let count = r#"ringblk_export_request_duration_seconds_count{export="vda",op="write"}"#;
    let (r0, w0, b0, c0) = (
        value(&before, reads),
        value(&before, writes),
        value(&before, wbytes),
        value(&before, count),
    );

    let mut c = connect(&d.sock, 1).unwrap();
    for i in 0..40u64 {
        assert_eq!(c.run(0, Req::Write(i * 4096, 0, 4096)), 0);
    }
    for i in 0..25u64 {
        assert_eq!(c.run(0, Req::Read(i * 4096, 0, 4096)), 0);
    }
    let after = scrape(&metrics);
    promtool_accepts(&after);
    assert_eq!(value(&after, writes) - w0, 40.0);
    assert_eq!(value(&after, wbytes) - b0, 40.0 * 4096.0);
    assert_eq!(value(&after, count) - c0, 40.0);
    assert_eq!(value(&after, reads) - r0, 25.0);
    assert_eq!(
        value(&after, r#"ringblk_export_connected{export="vda"}"#),
        1.0
    );
    assert_eq!(
        value(&after, r#"ringblk_export_in_flight{export="vda"}"#),
        0.0
    );
    assert!(
        value(
            &after,
            r#"ringblk_iothread_cpu_seconds_total{iothread="iothread0"}"#
        ) >= 0.0
    );
    // The histogram's +Inf bucket holds every request.
    assert_eq!(
        value(
            &after,
            r#"ringblk_export_request_duration_seconds_bucket{export="vda",op="write",le="+Inf"}"#
        ),
        value(&after, count)
    );
    d.stop();
}

#[test]
fn throttle_and_node_state_in_the_qsd_form() {
    let dir = TestDir::new("metrics-qsd");
    let sock = dir.path("sock");
    let metrics = dir.path("m.sock");
    let d = Daemon::start_qsd(
        &sock,
        &[
            "--object",
            "throttle-group,id=tg0,limits.iops-total=1000",
            "--blockdev",
            "driver=null-co,node-name=n0,size=16777216",
            "--blockdev",
            "driver=throttle,node-name=t0,throttle-group=tg0,file=n0",
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
            "--metrics",
            &format!("unix:{}", metrics.display()),
        ],
        |_| {},
    );
    let mut c = connect(&d.sock, 1).unwrap();
    for i in 0..10u64 {
        assert_eq!(c.run(0, Req::Read(i * 4096, 0, 4096)), 0);
    }
    let text = scrape(&metrics);
    promtool_accepts(&text);
    assert_eq!(
        value(
            &text,
            r#"ringblk_throttle_queued_requests{node="t0",group="tg0"}"#
        ),
        0.0
    );
    assert_eq!(
        value(
            &text,
            r#"ringblk_node_requests_total{node="n0",driver="null-co"}"#
        ),
        10.0
    );
    assert_eq!(
        value(&text, r#"ringblk_node_size_bytes{node="t0"}"#),
        16777216.0
    );
    d.stop();
}

#[test]
fn bad_addresses_are_refused_by_name() {
    let out = ringblk_refuses(&[
        "serve",
        "--null",
        "1G",
        "--socket",
        "/tmp/x",
        "--metrics",
        "localhost",
    ]);
    assert!(out.contains("--metrics takes IP:PORT"), "{out}");
    let out = ringblk_refuses(&[
        "--blockdev",
        "driver=null-co,node-name=n0",
        "--metrics",
        "unix:",
    ]);
    assert!(out.contains("--metrics unix: needs a path"), "{out}");
}

#[test]
fn hostile_http_clients_get_errors_and_cannot_hold_the_endpoint() {
    let dir = TestDir::new("metrics-hostile");
    let metrics = dir.path("m.sock");
    let mut d = Daemon::start(
        &dir.path("sock"),
        &[
            "--null",
            "1G",
            "--metrics",
            &format!("unix:{}", metrics.display()),
        ],
    );
    let post = http(&metrics, "POST /metrics HTTP/1.1\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let other = http(&metrics, "GET /secret HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    // Headers without end: refused once they pass 8 KiB.
    let mut c = UnixStream::connect(&metrics).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(&vec![b'a'; 9000]);
    let mut resp = String::new();
    let _ = c.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    // A client that connects and says nothing is dropped after its 2 s:
    // the next scrape is answered within a few seconds, not never.
    let _silent = UnixStream::connect(&metrics).unwrap();
    let t = Instant::now();
    let body = scrape(&metrics);
    assert!(body.contains("ringblk_export_requests_total"));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(d.is_running());
    d.stop();
}

//! A minimal QMP client for tests (the `qemu.qmp` library is exercised by
//! tests/control_python.rs; this one can also send malformed input).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub greeting: Value,
    /// Events seen while waiting for responses.
    pub events: Vec<Value>,
    timeout: Duration,
    /// The last command sent (named when a read fails).
    last: String,
}

impl Qmp {
    /// Connect and read the greeting, without negotiating.
    pub fn connect_raw(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).expect("connect to the QMP socket");
        Qmp::over(s)
    }

    /// Connect and negotiate to the monitor of `child` (named `what`),
    /// a QEMU process that is starting: its socket file appears at bind,
    /// and connecting is refused until it listens. Fails if the process
    /// exits or is not listening within `timeout`.
    pub fn connect_starting(path: &Path, child: &mut Child, what: &str, timeout: Duration) -> Qmp {
        let s = super::wait_ready(child, timeout, || match UnixStream::connect(path) {
            Ok(s) => Some(s),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                None
            }
            Err(e) => panic!("{what}: connect to the QMP socket: {e}"),
        })
        .unwrap_or_else(|e| panic!("{what} {e}: its monitor never listened"));
        let mut q = Qmp::over(s);
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn over(s: UnixStream) -> Qmp {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let writer = s.try_clone().unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
            timeout: Duration::from_secs(60),
            last: String::new(),
        };
        q.greeting = q.recv().expect("greeting");
        q
    }

    /// Connect and negotiate capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let mut q = Qmp::connect_raw(path);
        q.ok("qmp_capabilities", json!({}));
        q
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// The next message, or None at end of stream.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read from QMP (after {}): {e}", self.last));
        if n == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).expect("QMP sends JSON lines"))
    }

    /// Whether the daemon has closed the connection (nothing more comes).
    /// A daemon that hangs up with our bytes still unread resets the
    /// connection instead of ending it: closed all the same.
    pub fn closed(&mut self) -> bool {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Ok(_) => false,
            Err(e) => panic!("read from QMP (after {}): {e}", self.last),
        }
    }

    /// The next response (events are kept aside).
    pub fn response(&mut self) -> Value {
        loop {
            let m = self.recv().expect("connection closed before a response");
            if m.get("event").is_some() {
                self.events.push(m);
            } else {
                return m;
            }
        }
    }

    /// The next event (already seen or new).
    pub fn event(&mut self) -> Value {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        loop {
            let m = self.recv().expect("connection closed before an event");
            if m.get("event").is_some() {
                return m;
            }
        }
    }

    /// How long one read may block before the test fails (60 s unless
    /// set): a daemon that hangs fails the test instead of blocking it.
    pub fn set_timeout(&mut self, limit: Duration) {
        self.timeout = limit;
        self.reader.get_ref().set_read_timeout(Some(limit)).unwrap();
    }

    /// The first event (already seen or new) that `want` accepts, within
    /// `limit`; the events before it are returned too, in order, and taken
    /// off the queue.
    pub fn event_where(
        &mut self,
        limit: Duration,
        mut want: impl FnMut(&Value) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = std::time::Instant::now() + limit;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no matching event within {limit:?}; events so far: {before:?}"
            );
            let ev = if self.events.is_empty() {
                self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
                let m = self.recv().expect("connection closed before an event");
                if m.get("event").is_none() {
                    panic!("unexpected reply while waiting for an event: {m}");
                }
                m
            } else {
                self.events.remove(0)
            };
            if want(&ev) {
                let t = self.timeout;
                self.set_timeout(t);
                return (ev, before);
            }
            before.push(ev);
        }
    }

    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let req = json!({"execute": name, "arguments": args});
        self.last = req.to_string();
        self.send_raw(format!("{req}\n").as_bytes());
        self.response()
    }

    /// Run a command that must succeed; its return value.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{name} {args} failed: {r}"),
        }
    }

    /// Run a command that must fail; (class, desc).
    pub fn err(&mut self, name: &str, args: Value) -> (String, String) {
        let r = self.cmd(name, args.clone());
        error_of(&r).unwrap_or_else(|| panic!("{name} {args} should fail: {r}"))
    }

    /// The node called `name` in query-named-block-nodes.
    pub fn node(&mut self, name: &str) -> Value {
        let nodes = self.ok("query-named-block-nodes", json!({}));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name} in {nodes}"))
    }
}

pub fn error_of(r: &Value) -> Option<(String, String)> {
    let e = r.get("error")?;
    Some((
        e["class"].as_str().unwrap().to_string(),
        e["desc"].as_str().unwrap().to_string(),
    ))
}

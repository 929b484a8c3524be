//! `ringblk ctl`: a small QMP client for scripts and operators.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::{Error, ErrorKind};
use crate::size::parse_size;

/// Longest we wait for one answer (a drain waits for in-flight I/O).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// `key=value` → a JSON argument: booleans, integers and sizes (`20G`)
/// become numbers, anything else a string; `key:=JSON` passes JSON as is.
pub fn parse_arg(arg: &str) -> Result<(String, Value), Error> {
    if let Some((k, v)) = arg.split_once(":=") {
        let v =
            serde_json::from_str(v).map_err(|e| Error::invalid(format!("{arg}: not JSON: {e}")))?;
        return Ok((k.to_string(), v));
    }
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| Error::invalid(format!("'{arg}': arguments are key=value")))?;
    if k.is_empty() {
        return Err(Error::invalid(format!("'{arg}': empty argument name")));
    }
    let value = match v {
        "true" => json!(true),
        "false" => json!(false),
        _ => match parse_size(v) {
            Ok(n) if v.starts_with(|c: char| c.is_ascii_digit()) => json!(n),
            _ => json!(v),
        },
    };
    Ok((k.to_string(), value))
}

pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    /// Connect, read the greeting and negotiate capabilities.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let stream =
            UnixStream::connect(path).map_err(|e| Error::from(e).context(path.display()))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut c = Connection {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = c.next_message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::invalid(format!(
                "not a QMP server (greeting: {greeting})"
            )));
        }
        c.execute("qmp_capabilities", Map::new())?
            .map_err(|e| e.context("capabilities negotiation failed"))?;
        Ok(c)
    }

    fn next_message(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::from(e).context("reading from the daemon"))?;
        if n == 0 {
            return Err(Error::io("the daemon closed the connection"));
        }
        serde_json::from_str(&line)
            .map_err(|e| Error::invalid(format!("bad message from the daemon: {e}")))
    }

    /// Run a command. Outer error: the connection failed; inner error: the
    /// daemon answered with a QMP error (`Class: description`).
    pub fn execute(
        &mut self,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Result<Value, Error>, Error> {
        let req = json!({"execute": command, "arguments": args, "id": "ctl"});
        // One write: the daemon acts on the closing brace, and after `quit`
        // it may be gone before a separate newline could follow.
        let line = format!("{req}\n");
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Error::from(e).context("sending to the daemon"))?;
        loop {
            let msg = self.next_message()?;
            if let Some(r) = msg.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = msg.get("error") {
                let class = e["class"].as_str().unwrap_or("Error");
                let desc = e["desc"].as_str().unwrap_or("");
                let kind = match class {
                    "DeviceNotFound" => ErrorKind::NotFound,
                    "CommandNotFound" => ErrorKind::Unsupported,
                    _ => ErrorKind::InvalidInput,
                };
                return Ok(Err(Error::new(kind, format!("{class}: {desc}"))));
            }
            // An event: not ours to print.
        }
    }
}

/// Render a return value for people: objects as `key: value` lines,
/// lists as `-` items, nested values indented.
pub fn human(v: &Value) -> String {
    let mut out = String::new();
    render(v, 0, &mut out);
    if out.is_empty() {
        out.push_str("ok\n");
    }
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("-".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            Some(a.iter().filter_map(scalar).collect::<Vec<_>>().join(", "))
        }
        _ => None,
    }
}

fn render(v: &Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{pad}{k}: {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        render(x, indent + 1, out);
                    }
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if i > 0 && x.is_object() {
                    out.push('\n');
                }
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => render(x, indent, out),
                }
            }
        }
        other => {
            if let Some(s) = scalar(other) {
                out.push_str(&format!("{pad}{s}\n"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_become_json() {
        assert_eq!(
            parse_arg("size=20G").unwrap(),
            ("size".into(), json!(20u64 << 30))
        );
        assert_eq!(parse_arg("export=vda").unwrap().1, json!("vda"));
        assert_eq!(parse_arg("n=12").unwrap().1, json!(12));
        assert_eq!(parse_arg("on=true").unwrap().1, json!(true));
        assert_eq!(parse_arg("export:=\"1\"").unwrap().1, json!("1"));
        assert_eq!(parse_arg("name=G").unwrap().1, json!("G"));
        assert!(parse_arg("novalue").is_err());
        assert!(parse_arg("=x").is_err());
    }

    #[test]
    fn human_output_is_lines() {
        let v = json!([{"id": "vda", "queues": [1, 2], "inner": {"a": null}}]);
        assert_eq!(human(&v), "id: vda\ninner:\n  a: -\nqueues: 1, 2\n");
        assert_eq!(human(&json!({})), "ok\n");
    }
}

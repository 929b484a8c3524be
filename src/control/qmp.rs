//! QMP wire format: greeting, requests, responses, errors and events.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::error::{Error, ErrorKind};

/// Error classes QMP clients know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    /// QEMU's class for a block job that does not exist.
    DeviceNotActive,
}

impl ErrorClass {
    fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

/// A graph operation's failure as QMP reports it. QEMU answers every one
/// of these kinds with GenericError (a node, job or device the command
/// names but cannot find included: DeviceNotFound is for the few commands
/// that look a device up before anything else, and they say so
/// themselves), so the kind decides nothing here yet; this is where it
/// will.
impl From<Error> for QmpError {
    fn from(e: Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidInput
            | ErrorKind::NotFound
            | ErrorKind::Busy
            | ErrorKind::Unsupported
            | ErrorKind::Io => QmpError::generic(e.message()),
        }
    }
}

impl QmpError {
    pub(crate) fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub(crate) fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }

    pub(crate) fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

pub(crate) type CmdResult = Result<Value, QmpError>;

/// A parsed `{"execute": ..., "arguments": ..., "id": ...}`.
pub(crate) struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Validate a request object. On error, the id (if one could be read) is
/// returned too so the error can echo it.
pub(crate) fn parse_request(v: Value) -> Result<Request, (QmpError, Option<Value>)> {
    let Value::Object(mut obj) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String, id: &Option<Value>| Err((QmpError::generic(desc), id.clone()));
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return fail(format!("QMP input member '{k}' is unexpected"), &id);
    }
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => return fail("QMP input lacks member 'execute'".into(), &id),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// The QEMU release whose QMP (commands, arguments, replies) ringblk
/// follows: qemu-storage-daemon 7.2's.
const QMP_OF_QEMU: (u32, u32, u32) = (7, 2, 0);

/// What the greeting and `query-version` report: the QEMU version whose
/// QMP a client may expect, and ringblk's own in `package`.
pub(crate) fn version() -> Value {
    let (major, minor, micro) = QMP_OF_QEMU;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": concat!("ringblk ", env!("CARGO_PKG_VERSION")),
    })
}

pub(crate) fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

pub(crate) fn response(result: CmdResult, id: Option<Value>) -> Value {
    let mut v = match result {
        Ok(r) => json!({ "return": r }),
        Err(e) => json!({"error": {"class": e.class.name(), "desc": e.desc}}),
    };
    if let (Some(id), Value::Object(m)) = (id, &mut v) {
        m.insert("id".into(), id);
    }
    v
}

/// What a command returns: a JSON value, or JSON text written straight
/// from typed data (a reply too large to build as a `Value` first).
pub(crate) enum Return {
    Value(Value),
    Text(String),
}

/// The text of the reply to a command, as `response` would make it, with
/// a text return spliced in as it is.
pub(crate) fn reply_text(result: Result<Return, QmpError>, id: Option<Value>) -> String {
    match result {
        Ok(Return::Text(t)) => {
            let id = id.map(|id| id.to_string());
            let mut s = String::with_capacity(t.len() + 16 + id.as_ref().map_or(0, |i| i.len()));
            s.push_str("{\"return\":");
            s.push_str(&t);
            if let Some(id) = id {
                s.push_str(",\"id\":");
                s.push_str(&id);
            }
            s.push('}');
            s
        }
        Ok(Return::Value(v)) => response(Ok(v), id).to_string(),
        Err(e) => response(Err(e), id).to_string(),
    }
}

pub(crate) fn event(name: &str, data: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_shapes_are_checked_and_ids_survive_errors() {
        let ok = parse_request(json!({"execute": "quit", "id": 7}))
            .ok()
            .unwrap();
        assert_eq!((ok.execute.as_str(), ok.id), ("quit", Some(json!(7))));
        let (e, id) = parse_request(json!({"execute": 1, "id": "x"}))
            .err()
            .unwrap();
        assert_eq!(id, Some(json!("x")));
        assert!(e.desc.contains("must be a string"));
        let (e, _) = parse_request(json!({"arguments": {}})).err().unwrap();
        assert!(e.desc.contains("lacks member 'execute'"));
        let (e, _) = parse_request(json!({"execute": "q", "bogus": 1}))
            .err()
            .unwrap();
        assert!(e.desc.contains("'bogus' is unexpected"));
        let (e, _) = parse_request(json!([1])).err().unwrap();
        assert!(e.desc.contains("must be a JSON object"));
    }

    #[test]
    fn responses_echo_the_id() {
        let r = response(Ok(json!({})), Some(json!("a")));
        assert_eq!(r, json!({"return": {}, "id": "a"}));
        let r = response(Err(QmpError::not_found("no such export")), None);
        assert_eq!(r["error"]["class"], "DeviceNotFound");
    }

    #[test]
    fn a_text_return_is_spliced_in_with_the_id() {
        let parse = |t: String| serde_json::from_str::<Value>(&t).unwrap();
        let text = Return::Text(r#"[{"device":"e0"}]"#.into());
        let r = parse(reply_text(Ok(text), Some(json!({"n": [1, "two"]}))));
        assert_eq!(
            r,
            json!({"return": [{"device": "e0"}], "id": {"n": [1, "two"]}})
        );
        let r = parse(reply_text(Ok(Return::Text("[]".into())), None));
        assert_eq!(r, json!({"return": []}));
        let r = parse(reply_text(Ok(Return::Value(json!(7))), Some(json!(3))));
        assert_eq!(r, json!({"return": 7, "id": 3}));
    }
}

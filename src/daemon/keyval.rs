//! QEMU's dotted `key=value` option syntax, turned into the JSON object
//! the same option would be as JSON: `driver=qcow2,file.driver=file,
//! file.filename=a,,b` is `{"driver": "qcow2", "file": {"driver": "file",
//! "filename": "a,b"}}`. Values stay strings (typed getters convert them);
//! `,,` is a literal comma; an item without `=` is the value of the
//! option's implied key (`iothread,id=io0`: `qom-type=iothread`); keys
//! that are all digits make a list (`iothread.0=a,iothread.1=b`). An
//! argument starting with `{` is parsed as JSON instead.

use crate::error::Error;
use serde_json::{Map, Value};

/// Parse one option argument; `implied` names the key of a leading bare
/// value, if the option has one.
pub(crate) fn parse(arg: &str, implied: Option<&str>) -> Result<Map<String, Value>, Error> {
    if arg.trim_start().starts_with('{') {
        return match serde_json::from_str(arg) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(Error::invalid("expected a JSON object")),
            Err(e) => Err(Error::invalid(format!("invalid JSON: {e}"))),
        };
    }
    let mut root = Map::new();
    for (i, item) in split_items(arg).into_iter().enumerate() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match implied {
                Some(k) if i == 0 => (k.to_string(), item.clone()),
                _ => {
                    return Err(Error::invalid(format!(
                        "Expected '=' after parameter '{item}'"
                    )))
                }
            },
        };
        insert(&mut root, &key, value)?;
    }
    Ok(lists(Value::Object(root))
        .as_object()
        .cloned()
        .unwrap_or_default())
}

/// Split at single commas; `,,` is a comma inside an item.
fn split_items(arg: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() || !items.is_empty() {
        items.push(cur);
    }
    items
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), Error> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::invalid(format!("Invalid parameter '{key}'")));
    }
    let mut level = root;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            if level.contains_key(*part) {
                return Err(Error::invalid(format!(
                    "Parameter '{key}' given more than once"
                )));
            }
            level.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let next = level
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        level = match next {
            Value::Object(m) => m,
            _ => {
                return Err(Error::invalid(format!(
                    "Parameter '{}' used inconsistently",
                    parts[..=i].join(".")
                )))
            }
        };
    }
    Ok(())
}

/// Objects whose keys are 0, 1, 2, ... become arrays.
fn lists(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let is_list = !m.is_empty() && (0..m.len()).all(|i| m.contains_key(&i.to_string()));
            if is_list {
                let mut m = m;
                Value::Array(
                    (0..m.len())
                        .filter_map(|i| m.remove(&i.to_string()))
                        .map(lists)
                        .collect(),
                )
            } else {
                Value::Object(m.into_iter().map(|(k, v)| (k, lists(v))).collect())
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_keys_nest_and_commas_escape() {
        let m = parse(
            "driver=qcow2,node-name=n0,file.driver=file,file.filename=/a,,b",
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver": "qcow2", "node-name": "n0",
                   "file": {"driver": "file", "filename": "/a,b"}})
        );
    }

    #[test]
    fn implied_keys_lists_and_json() {
        let m = parse("iothread,id=io0,poll-max-ns=0", Some("qom-type")).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": "0"})
        );
        let m = parse(
            "type=vhost-user-blk,iothread.0=a,iothread.1=b",
            Some("type"),
        )
        .unwrap();
        assert_eq!(m["iothread"], json!(["a", "b"]));
        let m = parse(r#"{"driver": "null-co", "node-name": "n"}"#, None).unwrap();
        assert_eq!(m["driver"], "null-co");
    }

    #[test]
    fn malformed_options_are_errors() {
        assert!(parse("driver", None).is_err());
        assert!(parse("a=1,a=2", None).is_err());
        assert!(parse("a=1,a.b=2", None).is_err());
        assert!(parse("a..b=1", None).is_err());
        assert!(parse("[1]", None).is_err());
        assert!(parse("{bad", None).is_err());
    }
}

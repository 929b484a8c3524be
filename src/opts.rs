//! Reading QAPI-style options (QEMU's `--blockdev`, `--export`, QMP
//! arguments) from a JSON object: keys are taken as they are used, values
//! may be native JSON or the strings QEMU's dotted `key=value` syntax
//! gives (`on`, `off`, `64K`), and whatever is left at the end is an
//! unexpected parameter, named in the error.

use serde_json::{Map, Value};

use crate::error::Error;
use crate::size::parse_size;

/// One level of options: keys are taken as they are used, and whatever
/// is left at the end is an unexpected parameter.
pub(crate) struct Opts {
    map: Map<String, Value>,
    /// Dotted prefix of this level, for messages ("file.").
    prefix: String,
}

impl Opts {
    pub(crate) fn new(map: Map<String, Value>) -> Opts {
        Opts {
            map,
            prefix: String::new(),
        }
    }

    /// A nested level whose keys print as `prefix` + key.
    pub(crate) fn nested_in(map: Map<String, Value>, prefix: String) -> Opts {
        Opts { map, prefix }
    }

    /// Return a taken value (to be taken again by another getter).
    pub(crate) fn put_back(&mut self, key: &str, v: Value) {
        self.map.insert(key.to_string(), v);
    }

    pub(crate) fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub(crate) fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(crate) fn string(&mut self, key: &str) -> Result<Option<String>, Error> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Error::invalid(format!(
                "Invalid parameter type for '{}', expected: string",
                self.name(key)
            ))),
        }
    }

    pub(crate) fn required_string(&mut self, key: &str) -> Result<String, Error> {
        self.string(key)?.map_or_else(
            || {
                Err(Error::invalid(format!(
                    "Parameter '{}' is missing",
                    self.name(key)
                )))
            },
            Ok,
        )
    }

    pub(crate) fn bool(&mut self, key: &str, default: bool) -> Result<bool, Error> {
        match self.take(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(Value::String(s)) if matches!(s.as_str(), "on" | "true" | "yes") => Ok(true),
            Some(Value::String(s)) if matches!(s.as_str(), "off" | "false" | "no") => Ok(false),
            Some(_) => Err(Error::invalid(format!(
                "Invalid parameter type for '{}', expected: boolean",
                self.name(key)
            ))),
        }
    }

    pub(crate) fn size(&mut self, key: &str) -> Result<Option<u64>, Error> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(Value::String(s)) => parse_size(&s).map(Some).map_err(|_| {
                Error::invalid(format!(
                    "Parameter '{}' expects a non-negative number below 2^64",
                    self.name(key)
                ))
            }),
            Some(_) => Err(Error::invalid(format!(
                "Invalid parameter type for '{}', expected: integer",
                self.name(key)
            ))),
        }
    }

    /// An enum value out of `allowed` (the first is the default).
    pub(crate) fn choice(&mut self, key: &str, allowed: &[&str]) -> Result<String, Error> {
        match self.string(key)? {
            None => Ok(allowed[0].to_string()),
            Some(s) if allowed.contains(&s.as_str()) => Ok(s),
            Some(s) => Err(Error::invalid(format!(
                "Parameter '{}' does not accept value '{s}'",
                self.name(key)
            ))),
        }
    }

    /// A nested object (`cache`), as its own level.
    pub(crate) fn nested(&mut self, key: &str) -> Result<Opts, Error> {
        let prefix = format!("{}.", self.name(key));
        match self.take(key) {
            None => Ok(Opts {
                map: Map::new(),
                prefix,
            }),
            Some(Value::Object(map)) => Ok(Opts { map, prefix }),
            Some(_) => Err(Error::invalid(format!(
                "Invalid parameter type for '{}', expected: object",
                self.name(key)
            ))),
        }
    }

    /// What has not been taken.
    pub(crate) fn into_map(self) -> Map<String, Value> {
        self.map
    }

    pub(crate) fn finish(self) -> Result<(), Error> {
        match self.map.keys().next() {
            Some(k) => Err(Error::invalid(format!(
                "Parameter '{}' is unexpected",
                self.name(k)
            ))),
            None => Ok(()),
        }
    }
}

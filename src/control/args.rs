//! Typed access to a command's arguments, with QMP's error wording for
//! missing, mistyped and unexpected ones (the option reader `--blockdev`
//! uses too, with QMP's strict integers on top).

use serde_json::{Map, Value};

use super::qmp::QmpError;
use crate::opts::Opts;

pub(super) struct Args(Opts);

impl Args {
    pub(super) fn new(map: Map<String, Value>) -> Self {
        Args(Opts::new(map))
    }

    /// An argument of any JSON type.
    pub(super) fn take(&mut self, name: &str) -> Option<Value> {
        self.0.take(name)
    }

    pub(super) fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        self.0.string(name).map_err(QmpError::from)
    }

    pub(super) fn str(&mut self, name: &str) -> Result<String, QmpError> {
        self.0.required_string(name).map_err(QmpError::from)
    }

    /// A boolean, if given (QMP takes JSON booleans only).
    pub(super) fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: boolean"
            ))),
        }
    }

    /// An unsigned integer; QMP takes JSON numbers only ("20G" is a
    /// string, not a size).
    pub(super) fn u64(&mut self, name: &str) -> Result<u64, QmpError> {
        let mistyped = || {
            QmpError::generic(format!(
                "Invalid parameter type for '{name}', expected: size"
            ))
        };
        match self.take(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(mistyped),
            Some(_) => Err(mistyped()),
        }
    }

    /// All arguments, as the object they came in (`blockdev-add` takes
    /// QEMU's BlockdevOptions as its arguments).
    pub(super) fn into_value(self) -> Value {
        Value::Object(self.0.into_map())
    }

    /// Refuse arguments no one asked for (call after taking the known ones).
    pub(super) fn finish(self) -> Result<(), QmpError> {
        self.0.finish().map_err(QmpError::from)
    }
}

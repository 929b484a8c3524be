//! Typed access to a command's arguments, with QMP's error wording for
//! missing, mistyped and unexpected ones.

use serde_json::{Map, Value};

use super::qmp::QmpError;

pub struct Args {
    map: Map<String, Value>,
}

impl Args {
    pub fn new(map: Map<String, Value>) -> Self {
        Args { map }
    }

    /// An argument of any JSON type.
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name)
    }

    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(mistyped(name, "string")),
        }
    }

    pub fn u64(&mut self, name: &str) -> Result<u64, QmpError> {
        match self.take(name) {
            None => Err(missing(name)),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| mistyped(name, "size")),
            Some(_) => Err(mistyped(name, "size")),
        }
    }

    /// Refuse arguments no one asked for (call after taking the known ones).
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

pub fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

fn mistyped(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

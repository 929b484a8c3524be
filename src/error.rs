//! ringblk's error below the control layer: what kind of failure it is
//! (for the caller to act on: QMP maps kinds to QEMU's error classes in one
//! place, `control::qmp`) and the message, in QEMU's words where QEMU has
//! them, prefixed with its context (export, node, path, offset) on the
//! way up.

/// What kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed: a bad name, option, value or combination.
    InvalidInput,
    /// Something the request names does not exist (a node, a job).
    NotFound,
    /// What the request names is in use, or in a state that refuses it.
    Busy,
    /// ringblk, or the driver of the node, does not do this.
    Unsupported,
    /// The storage or the system failed (an image file, a lock, a thread).
    Io,
}

/// A failed operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error, its message prefixed with where it happened
    /// (`export e0`, `node n0`, a path).
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }
}

/// System calls fail as I/O errors, their text kept.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::io(e.to_string())
    }
}

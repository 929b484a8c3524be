//! The error of a graph operation: what kind of failure it is (for the
//! caller to act on: QMP maps kinds to QEMU's error classes in one place,
//! `control::qmp`), and the message, in QEMU's words where QEMU has them.

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

/// A failed graph operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GraphError {
    kind: ErrorKind,
    message: String,
}

impl GraphError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GraphError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub(crate) fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, message)
    }

    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub(crate) fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Option parsing (`Opts`) reports malformed options as text.
impl From<String> for GraphError {
    fn from(message: String) -> Self {
        Self::invalid(message)
    }
}

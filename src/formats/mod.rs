//! Block drivers: protocol drivers that touch storage (`file`, `null`) and
//! format drivers that interpret a child (`raw`). All I/O is async on the
//! calling iothread's ring.

pub(crate) mod bounce;
mod driver;
pub(crate) mod file;
pub(crate) mod lock;
mod mapped;
pub(crate) mod null;
pub mod qcow2;
pub(crate) mod raw;

pub(crate) use driver::failed;
pub(crate) use driver::BlockDriver;
pub use driver::{BlockIo, ChildRef, IoFuture};
pub use file::CacheMode;
pub(crate) use file::FileDriver;
pub(crate) use lock::ImageLock;
pub(crate) use null::NullDriver;
pub(crate) use raw::RawDriver;

use std::path::PathBuf;

/// Why a driver could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// Another process's image locks conflict with ours.
    #[error(
        "{path}: image is locked: {reason}; is another process (QEMU, qemu-img, ringblk) using it?"
    )]
    Locked { path: PathBuf, reason: String },
}

impl From<OpenError> for crate::error::Error {
    fn from(e: OpenError) -> Self {
        use crate::error::{Error, ErrorKind};
        let kind = match e {
            OpenError::Io { .. } => ErrorKind::Io,
            OpenError::Invalid { .. } => ErrorKind::InvalidInput,
            OpenError::Locked { .. } => ErrorKind::Busy,
        };
        Error::new(kind, e.to_string())
    }
}

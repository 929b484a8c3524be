//! BlockBackend: the root parent an export talks to. It checks bounds and
//! read-only, counts its own requests, and survives having its tree ejected.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::node::{InFlight, Node};
use crate::formats::BlockIo;
use crate::uring::IoVec;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{backend}: no medium (the tree was ejected)")]
    Ejected { backend: String },
    #[error("{backend}: request at offset {offset} length {len} is past the end ({size} bytes)")]
    OutOfRange {
        backend: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{backend}: read-only")]
    ReadOnly { backend: String },
    #[error("{backend}: I/O error at offset {offset}: {source}")]
    Io {
        backend: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

pub struct BlockBackend {
    name: String,
    root: RwLock<Option<Arc<Node>>>,
    read_only: bool,
    /// This backend's own requests, counted before they reach the root node.
    in_flight: AtomicU64,
}

enum Access {
    Read,
    Write,
}

impl BlockBackend {
    pub fn new(name: &str, root: Arc<Node>, read_only: bool) -> Arc<Self> {
        Arc::new(BlockBackend {
            name: name.to_string(),
            root: RwLock::new(Some(root)),
            read_only,
            in_flight: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn root(&self) -> Option<Arc<Node>> {
        self.root.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Size of the medium in bytes; 0 after eject.
    pub fn size(&self) -> u64 {
        self.root().map_or(0, |n| n.size())
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Detach the tree. Requests already inside it finish; new ones fail with
    /// `Ejected`. Returns the old root so the caller decides when it closes.
    pub fn eject(&self) -> Option<Arc<Node>> {
        self.root.write().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn check(&self, access: Access, offset: u64, len: u64) -> Result<Arc<Node>, BackendError> {
        let root = self.root().ok_or_else(|| BackendError::Ejected {
            backend: self.name.clone(),
        })?;
        if matches!(access, Access::Write) && self.read_only {
            return Err(BackendError::ReadOnly {
                backend: self.name.clone(),
            });
        }
        let size = root.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BackendError::OutOfRange {
                backend: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(root)
    }

    fn io_error(&self, offset: u64) -> impl FnOnce(io::Error) -> BackendError + '_ {
        move |source| BackendError::Io {
            backend: self.name.clone(),
            offset,
            source,
        }
    }

    pub async fn read(&self, offset: u64, buf: &IoVec) -> Result<(), BackendError> {
        let root = self.check(Access::Read, offset, buf.len() as u64)?;
        let _g = InFlight::begin(&self.in_flight);
        root.read(offset, buf).await.map_err(self.io_error(offset))
    }

    pub async fn write(&self, offset: u64, buf: &IoVec) -> Result<(), BackendError> {
        let root = self.check(Access::Write, offset, buf.len() as u64)?;
        let _g = InFlight::begin(&self.in_flight);
        root.write(offset, buf).await.map_err(self.io_error(offset))
    }

    pub async fn flush(&self) -> Result<(), BackendError> {
        let root = self.check(Access::Read, 0, 0)?;
        let _g = InFlight::begin(&self.in_flight);
        root.flush().await.map_err(self.io_error(0))
    }

    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let root = self.check(Access::Write, offset, len)?;
        let _g = InFlight::begin(&self.in_flight);
        root.discard(offset, len)
            .await
            .map_err(self.io_error(offset))
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BackendError> {
        let root = self.check(Access::Write, offset, len)?;
        let _g = InFlight::begin(&self.in_flight);
        root.write_zeroes(offset, len, may_unmap)
            .await
            .map_err(self.io_error(offset))
    }
}

//! Growing a node: the graph operation behind QMP `block_resize`.

use std::io;
use std::sync::Arc;

use super::node::Node;
use crate::formats::BlockIo;
use crate::uring;

/// Why a node was not resized.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResizeError {
    #[error("Node '{0}' is read-only")]
    ReadOnly(String),
    #[error("Shrinking is not supported: node '{node}' is {old} bytes, {new} requested")]
    Shrink { node: String, old: u64, new: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Grow `node` to `size` bytes inside a drained section on it and tell its
/// parents (an export tells its guest), then, with the section ended,
/// flush (the new size must survive a crash like any acknowledged write;
/// the guest's writes past the old end may go on meanwhile, as any write
/// before a flush). The same size again is nothing to do. Returns the old
/// size.
pub(crate) fn resize(node: &Arc<Node>, size: u64) -> Result<u64, ResizeError> {
    if node.is_read_only() {
        return Err(ResizeError::ReadOnly(node.name().to_string()));
    }
    let old = node.size();
    if size < old {
        return Err(ResizeError::Shrink {
            node: node.name().to_string(),
            old,
            new: size,
        });
    }
    if size == old {
        return Ok(old);
    }
    node.drained_begin();
    let n = node.clone();
    let grown = uring::block_on(move || async move { n.grow(size).await }).and_then(|r| r);
    if grown.is_ok() {
        node.notify_resized();
    }
    // Cannot fail: the section begun above is still open.
    let _ = node.drained_end();
    grown?;
    let n = node.clone();
    uring::block_on(move || async move { n.flush().await }).and_then(|r| r)?;
    Ok(old)
}

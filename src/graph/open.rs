//! Building a node tree for an image from command-line options.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::node::{Child, ChildRole, Node};
use crate::formats::{CacheMode, FileDriver, NullDriver, OpenError, RawDriver};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Decide from the image's first bytes.
    Auto,
    Raw,
}

pub struct ImageOptions {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub read_only: bool,
    pub cache: CacheMode,
    /// The export's logical block size; O_DIRECT is only used if the host
    /// can serve requests aligned to it.
    pub block_size: usize,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

fn probe(path: &Path) -> Result<ImageFormat, OpenError> {
    let mut head = [0u8; 4];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if n == 4 && &head == QCOW2_MAGIC {
        // Serving a qcow2 file as raw would hand the guest its metadata.
        return Err(OpenError::Invalid {
            path: path.to_path_buf(),
            reason: "this is a qcow2 image, which this build cannot serve; convert it with `qemu-img convert -O raw`".into(),
        });
    }
    Ok(ImageFormat::Raw)
}

/// Open `opts.path` as a protocol node (`file0`) under a format node
/// (`fmt0`) and return the format node.
pub fn open_image(opts: &ImageOptions) -> Result<Arc<Node>, OpenError> {
    let format = match opts.format {
        ImageFormat::Auto => probe(&opts.path)?,
        f => f,
    };
    let file = FileDriver::open(&opts.path, opts.read_only, opts.cache, opts.block_size)?;
    let file = Node::new("file0", Box::new(file), Vec::new());
    match format {
        ImageFormat::Raw | ImageFormat::Auto => {
            let raw = RawDriver::new(file.clone(), opts.read_only);
            Ok(Node::new(
                "fmt0",
                Box::new(raw),
                vec![Child {
                    role: ChildRole::File,
                    node: file,
                }],
            ))
        }
    }
}

/// A `null` node of `size` bytes.
pub fn open_null(size: u64) -> Arc<Node> {
    Node::new("null0", Box::new(NullDriver::new(size)), Vec::new())
}

//! Building a node tree for an image: protocol node, format node, and for
//! qcow2 the backing chain below it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::node::{Child, ChildRole, Node};
use super::registry::Graph;
use crate::error::Error;
use crate::formats::file::open_file;
use crate::formats::qcow2::{self, Qcow2Driver, Qcow2Error, Qcow2Options};
use crate::formats::{
    CacheMode, ChildRef, FileDriver, ImageLock, NullDriver, OpenError, RawDriver,
};
use crate::uring;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Decide from the image's first bytes (only for the top image: backing
    /// files take the format their overlay names).
    Auto,
    Raw,
    Qcow2,
}

/// Which backing files an image may name: a qcow2 from an untrusted source
/// can name any host file (`/etc/shadow`, `../other-vm.qcow2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Whatever the image names (QEMU's behaviour).
    Any,
    /// Only files inside the naming image's folder (subfolders included),
    /// after resolving symlinks.
    SameDir,
    /// No backing files at all.
    None,
}

pub struct ImageOptions {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub read_only: bool,
    pub cache: CacheMode,
    /// The export's logical block size; O_DIRECT is only used if the host
    /// can serve requests aligned to it.
    pub block_size: usize,
    pub qcow2: Qcow2Options,
    /// Lock the image files sharing every permission (read-only use only,
    /// as qemu-img's `-U`): others may write while we read.
    pub force_share: bool,
    pub backing: BackingPolicy,
    /// Name the nodes `#blockNNN` (blockdev-add's inline children) instead
    /// of `fileN` / `fmtN` by depth in the chain.
    pub auto_names: bool,
    /// How long to wait for image locks another process holds.
    pub lock_wait: Duration,
}

impl ImageOptions {
    /// A backing image opened to read it: read-only, through the page
    /// cache, any backing file it names followed, no lock wait.
    pub fn read_only(path: PathBuf, format: ImageFormat, auto_names: bool) -> Self {
        ImageOptions {
            path,
            format,
            read_only: true,
            cache: CacheMode::Writeback,
            block_size: 512,
            qcow2: Qcow2Options::default(),
            force_share: false,
            backing: BackingPolicy::Any,
            auto_names,
            lock_wait: Duration::ZERO,
        }
    }
}

/// Deepest backing chain we follow (a loop would be infinitely deep). Each
/// live snapshot adds a layer, so chains of dozens are ordinary.
const MAX_CHAIN_DEPTH: usize = 64;

fn probe(path: &Path) -> Result<ImageFormat, OpenError> {
    let mut head = [0u8; 4];
    let n = open_file(path, true, false)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(if n == 4 && head == qcow2::header::MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Refuse a backing file `name` (at `bpath`) that `policy` forbids `path`
/// to name.
fn allowed_backing(
    path: &Path,
    name: &str,
    bpath: &Path,
    policy: BackingPolicy,
) -> Result<(), OpenError> {
    let refuse = |why: &str| {
        Err(invalid(
            path,
            format!("its backing file '{name}' is refused: {why}"),
        ))
    };
    match policy {
        BackingPolicy::Any => Ok(()),
        BackingPolicy::None => refuse("the backing policy is 'none'"),
        BackingPolicy::SameDir => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let inside = match (dir.canonicalize(), bpath.canonicalize()) {
                (Ok(d), Ok(b)) => b.starts_with(d),
                _ => false,
            };
            if inside {
                Ok(())
            } else {
                refuse("the backing policy is 'same-dir' and it is not inside the image's folder")
            }
        }
    }
}

fn invalid(path: &Path, reason: String) -> OpenError {
    OpenError::Invalid {
        path: path.to_path_buf(),
        reason,
    }
}

fn qcow2_error(path: &Path, e: Qcow2Error) -> OpenError {
    match e {
        Qcow2Error::Io(source) => OpenError::Io {
            path: path.to_path_buf(),
            source,
        },
        e => invalid(path, e.to_string()),
    }
}

/// Open `opts.path` and return its format node (`fmt0`, over `file0`; a
/// backing image is `fmt1` over `file1`, and so on).
pub fn open_image(graph: &Graph, opts: &ImageOptions) -> Result<Arc<Node>, OpenError> {
    open_layer(graph, &opts.path, opts.format, opts.read_only, opts, 0)
}

fn open_layer(
    graph: &Graph,
    path: &Path,
    format: ImageFormat,
    read_only: bool,
    opts: &ImageOptions,
    depth: usize,
) -> Result<Arc<Node>, OpenError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(invalid(
            path,
            format!("backing chain deeper than {MAX_CHAIN_DEPTH} images (a loop?)"),
        ));
    }
    let probed = format == ImageFormat::Auto;
    let format = match format {
        ImageFormat::Auto => probe(path)?,
        f => f,
    };
    // qcow2 metadata is written in 512-byte units at the least.
    let block_size = if format == ImageFormat::Qcow2 {
        512
    } else {
        opts.block_size
    };
    let lock = Some(ImageLock::for_open(read_only, opts.force_share).waiting(opts.lock_wait));
    let (file_name, name) = if opts.auto_names {
        (graph.auto_node_name(), graph.auto_node_name())
    } else {
        (format!("file{depth}"), format!("fmt{depth}"))
    };
    let file = open_file_node(
        graph, &file_name, path, read_only, opts.cache, block_size, lock,
    )?;
    match format {
        ImageFormat::Raw | ImageFormat::Auto => {
            if probed {
                log::warn!(
                    "{}: format probed as raw; guest writes that would make it look like an image format naming other files are refused (give the format explicitly to lift this)",
                    path.display()
                );
            }
            Ok(open_raw_node(&name, file, read_only, probed))
        }
        ImageFormat::Qcow2 => {
            let header = read_qcow2_header(path, &file)?;
            let backing = open_backing(graph, path, &header, opts, depth)?;
            open_qcow2_node(&name, path, file, read_only, backing, opts.qcow2)
        }
    }
}

/// The backing chain the qcow2 header of `path` names (read-only, its
/// format as recorded: backing files are never probed), `depth` layers
/// down from the top image.
fn open_backing(
    graph: &Graph,
    path: &Path,
    header: &qcow2::header::Header,
    opts: &ImageOptions,
    depth: usize,
) -> Result<Option<Arc<Node>>, OpenError> {
    let (b, f) = match (&header.backing_file, &header.backing_format) {
        (None, _) => return Ok(None),
        (Some(b), None) => {
            return Err(invalid(
                path,
                format!(
                    "its backing file '{b}' has no recorded format, and ringblk never probes backing files; record it with `qemu-img rebase -u -b '{b}' -F raw|qcow2 {}`",
                    path.display()
                ),
            ))
        }
        (Some(b), Some(f)) => (b, f),
    };
    let bformat = match f.as_str() {
        "raw" => ImageFormat::Raw,
        "qcow2" => ImageFormat::Qcow2,
        other => {
            return Err(invalid(
                path,
                format!("backing file '{b}' has format '{other}', which is not supported"),
            ))
        }
    };
    // Relative names are relative to the overlay's folder.
    let bpath = path.parent().unwrap_or(Path::new(".")).join(b);
    allowed_backing(path, b, &bpath, opts.backing)?;
    let layer = open_layer(graph, &bpath, bformat, true, opts, depth + 1)
        .map_err(|e| invalid(path, format!("backing file: {e}")))?;
    Ok(Some(layer))
}

/// The backing chain the qcow2 image in `file` (at `path`) names, as
/// `blockdev-add` opens it when `backing` is not given: every layer
/// read-only, nodes named `#blockNNN`.
pub(crate) fn open_backing_named_by(
    path: &Path,
    file: &Arc<Node>,
) -> Result<Option<Arc<Node>>, OpenError> {
    let header = read_qcow2_header(path, file)?;
    let opts = ImageOptions::read_only(path.to_path_buf(), ImageFormat::Qcow2, true);
    open_backing(file.graph(), path, &header, &opts, 0)
}

/// A `file` protocol node named `name` over the host file at `path`,
/// locked as `lock` says (None: no locks, QEMU's `locking=off`).
pub(crate) fn open_file_node(
    graph: &Graph,
    name: &str,
    path: &Path,
    read_only: bool,
    cache: CacheMode,
    block_size: usize,
    lock: Option<ImageLock>,
) -> Result<Arc<Node>, OpenError> {
    let file = FileDriver::open(path, read_only, cache, block_size)?;
    if let Some(lock) = lock {
        file.lock(lock)?;
    }
    Ok(Node::new(graph, name, Box::new(file), Vec::new()))
}

/// A `raw` format node over `file`; `probed` if the format was guessed.
pub(crate) fn open_raw_node(
    name: &str,
    file: Arc<Node>,
    read_only: bool,
    probed: bool,
) -> Arc<Node> {
    let raw = if probed {
        RawDriver::probed(file.clone(), read_only)
    } else {
        RawDriver::new(file.clone(), read_only)
    };
    raw_node(name, file, raw)
}

/// A `raw` node over the bytes `[offset, offset + size)` of `file`.
pub(crate) fn open_raw_window(
    name: &str,
    file: Arc<Node>,
    read_only: bool,
    offset: u64,
    size: Option<u64>,
) -> Result<Arc<Node>, Error> {
    let raw = RawDriver::window(file.clone(), read_only, offset, size)?;
    Ok(raw_node(name, file, raw))
}

fn raw_node(name: &str, file: Arc<Node>, raw: RawDriver) -> Arc<Node> {
    let graph = file.graph().clone();
    let child = Child {
        role: ChildRole::File,
        node: file,
    };
    Node::new(&graph, name, Box::new(raw), vec![child])
}

/// The header of the qcow2 image in `file` (from `path`, for messages).
fn read_qcow2_header(path: &Path, file: &Arc<Node>) -> Result<qcow2::header::Header, OpenError> {
    let file_ref: ChildRef = file.clone();
    let (h, _) = uring::block_on(|| qcow2::read_header(&file_ref))
        .map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .map_err(|e| qcow2_error(path, e))?;
    Ok(h)
}

/// A `qcow2` format node over `file` with `backing` as its backing child.
pub(crate) fn open_qcow2_node(
    name: &str,
    path: &Path,
    file: Arc<Node>,
    read_only: bool,
    backing: Option<Arc<Node>>,
    qopts: Qcow2Options,
) -> Result<Arc<Node>, OpenError> {
    let file_ref: ChildRef = file.clone();
    let backing_ref: Option<ChildRef> = backing.clone().map(|b| b as ChildRef);
    let display = path.display().to_string();
    let driver = uring::block_on(|| {
        Qcow2Driver::open(&display, file_ref.clone(), backing_ref, read_only, qopts)
    })
    .map_err(|source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    })?
    .map_err(|e| qcow2_error(path, e))?;
    let graph = file.graph().clone();
    let mut children = vec![Child {
        role: ChildRole::File,
        node: file,
    }];
    if let Some(b) = backing {
        children.push(Child {
            role: ChildRole::Backing,
            node: b,
        });
    }
    Ok(Node::new(&graph, name, Box::new(driver), children))
}

/// A `null` node of `size` bytes in `graph`.
pub(crate) fn open_null(graph: &Graph, size: u64) -> Arc<Node> {
    Node::new(graph, "null0", Box::new(NullDriver::new(size)), Vec::new())
}

//! `blockdev-add`: building nodes from QEMU's `BlockdevOptions`
//! (qapi/block-core.json) for the drivers ringblk has: `file`, `raw`,
//! `qcow2`, `null-co` and the `throttle` filter, with their children given inline (an object) or
//! by node name (a string).
//!
//! Options arrive as JSON (QMP, `--blockdev '{...}'`) or as QEMU's dotted
//! `key=value` form, where every value is a string: typed getters accept
//! both, as QEMU's input visitors do. Unknown keys are errors naming them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::node::{Child, ChildRole, DetectZeroes, Node};
use super::open::{
    open_backing_named_by, open_file_node, open_qcow2_node, open_raw_node, open_raw_window,
};
use super::registry::Graph;
use super::throttle::ThrottleDriver;
use crate::error::Error;
use crate::formats::qcow2::Qcow2Options;
use crate::formats::{CacheMode, ImageLock, NullDriver};
use crate::opts::Opts;

/// QEMU's size of a `null-co` node when none is given.
const NULL_DEFAULT_SIZE: u64 = 1 << 30;

fn err<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::invalid(msg))
}

/// Options every driver takes (BlockdevOptions' base).
struct Common {
    node_name: String,
    inherit: Inherited,
    detect_zeroes: DetectZeroes,
}

/// What inline children take from their parent unless they say otherwise
/// (as in QEMU: read-only and the cache options).
#[derive(Clone, Copy, Default)]
struct Inherited {
    read_only: bool,
    direct: bool,
    no_flush: bool,
    /// How long image locks wait for another process to let go (not an
    /// option: the command line waits at start-up, QMP never).
    lock_wait: Duration,
}

fn common(g: &Graph, o: &mut Opts, top: bool, parent: Inherited) -> Result<Common, Error> {
    let node_name = match o.string("node-name")? {
        Some(n) => {
            check_new_node_name(g, &n)?;
            n
        }
        None if top => return err("A top-level node needs a node-name"),
        None => g.auto_node_name(),
    };
    let read_only = o.bool("read-only", parent.read_only)?;
    // auto-read-only: we never fall back to read-only on EACCES; accepted.
    o.bool("auto-read-only", false)?;
    let unmap = o.choice("discard", &["ignore", "unmap"])? == "unmap";
    let detect_zeroes = match o.choice("detect-zeroes", &["off", "on", "unmap"])?.as_str() {
        "on" => DetectZeroes::On,
        // QEMU: unmap only where discard=unmap allows it.
        "unmap" if unmap => DetectZeroes::Unmap,
        "unmap" => DetectZeroes::On,
        _ => DetectZeroes::Off,
    };
    let mut cache = o.nested("cache")?;
    let direct = cache.bool("direct", parent.direct)?;
    let no_flush = cache.bool("no-flush", parent.no_flush)?;
    cache.finish()?;
    Ok(Common {
        node_name,
        inherit: Inherited {
            read_only,
            direct,
            no_flush,
            lock_wait: parent.lock_wait,
        },
        detect_zeroes,
    })
}

/// Refuse a name a new node cannot take: malformed, or in use.
pub(super) fn check_new_node_name(g: &Graph, n: &str) -> Result<(), Error> {
    if n.is_empty() || n.starts_with('#') || n.len() > 31 {
        return err(format!("Invalid node-name: '{n}'"));
    }
    if g.find_node(n).is_some() {
        return err(format!("Duplicate nodes with node-name='{n}'"));
    }
    Ok(())
}

impl Graph {
    /// Add the node `options` describe (and its inline children), owned by
    /// the monitor until [`Graph::blockdev_del`].
    pub fn blockdev_add(&self, options: Value) -> Result<Arc<Node>, Error> {
        self.blockdev_add_waiting(options, Duration::ZERO)
    }

    /// [`Graph::blockdev_add`] at start-up (`--blockdev`): image locks another
    /// process holds are waited for, up to `lock_wait`.
    pub fn blockdev_add_waiting(
        &self,
        options: Value,
        lock_wait: Duration,
    ) -> Result<Arc<Node>, Error> {
        let Value::Object(map) = options else {
            return err("Invalid parameter type, expected: object");
        };
        let inherit = Inherited {
            lock_wait,
            ..Inherited::default()
        };
        let node = add(self, Opts::new(map), true, inherit)?;
        self.monitor_owned().push(node.clone());
        Ok(node)
    }

    /// The monitor takes a reference on `node`, as if `blockdev-add` had
    /// made it (an overlay nothing else would hold).
    pub(super) fn monitor_adopt(&self, node: Arc<Node>) {
        self.monitor_owned().push(node);
    }

    /// `blockdev-del`: close a node `blockdev-add` added, unless something
    /// (a parent node, an export) still uses it.
    pub fn blockdev_del(&self, name: &str) -> Result<(), Error> {
        let mut owned = self.monitor_owned();
        let Some(i) = owned.iter().position(|n| n.name() == name) else {
            return match self.find_node(name) {
                Some(_) => err(format!("Node {name} is not owned by the monitor")),
                None => Err(Error::not_found(format!(
                    "Failed to find node with node-name='{name}'"
                ))),
            };
        };
        if let Some(user) = self.user_of(&owned[i]) {
            return Err(Error::busy(format!("Node '{name}' is busy: {user}")));
        }
        let node = owned.remove(i);
        drop(owned);
        // The last reference: the node (and children nobody else holds) close.
        drop(node);
        Ok(())
    }

    /// Who besides the monitor holds `node`, if anyone.
    fn user_of(&self, node: &Arc<Node>) -> Option<String> {
        for b in self.all_backends() {
            if b.root().is_some_and(|r| Arc::ptr_eq(&r, node)) {
                return Some(format!("it is in use by '{}'", b.name()));
            }
        }
        for parent in self.all_nodes() {
            if let Some(c) = parent
                .children()
                .iter()
                .find(|c| Arc::ptr_eq(&c.node, node))
            {
                return Some(format!(
                    "it is the {} child of node '{}'",
                    c.role,
                    parent.name()
                ));
            }
        }
        None
    }

    /// Shutdown: the monitor lets go of every node it holds.
    pub fn release_monitor_nodes(&self) {
        let nodes = std::mem::take(&mut *self.monitor_owned());
        drop(nodes);
    }
}

fn add(g: &Graph, mut o: Opts, top: bool, parent: Inherited) -> Result<Arc<Node>, Error> {
    let driver = o.required_string("driver")?;
    let c = common(g, &mut o, top, parent)?;
    let node = match driver.as_str() {
        "file" => add_file(g, &mut o, &c)?,
        "raw" => {
            let file = child(g, &mut o, "file", c.inherit)?.ok_or_else(|| {
                Error::invalid(format!("Parameter '{}' is missing", o.name("file")))
            })?;
            let offset = o.size("offset")?.unwrap_or(0);
            let size = o.size("size")?;
            if offset == 0 && size.is_none() {
                open_raw_node(&c.node_name, file, c.inherit.read_only, false)
            } else {
                open_raw_window(&c.node_name, file, c.inherit.read_only, offset, size)?
            }
        }
        "qcow2" => add_qcow2(g, &mut o, &c)?,
        "throttle" => add_throttle(g, &mut o, &c)?,
        "null-co" => {
            let size = o.size("size")?.unwrap_or(NULL_DEFAULT_SIZE);
            o.bool("read-zeroes", false)?;
            Node::new(g, &c.node_name, Box::new(NullDriver::new(size)), Vec::new())
        }
        other => return Err(Error::unsupported(format!("Unknown driver '{other}'"))),
    };
    o.finish()?;
    node.set_io_options(c.inherit.no_flush, c.detect_zeroes);
    Ok(node)
}

/// QEMU's `throttle` filter: `throttle-group` names a group that exists.
fn add_throttle(g: &Graph, o: &mut Opts, c: &Common) -> Result<Arc<Node>, Error> {
    let group_name = o
        .string("throttle-group")?
        .ok_or_else(|| Error::invalid("Parameter 'throttle-group' is missing"))?;
    let group = g
        .throttle_groups()
        .find(&group_name)
        .ok_or_else(|| Error::not_found(format!("Throttle group '{group_name}' does not exist")))?;
    let file = child(g, o, "file", c.inherit)?
        .ok_or_else(|| Error::invalid(format!("Parameter '{}' is missing", o.name("file"))))?;
    let driver = ThrottleDriver::new(file.clone(), file.is_read_only(), group);
    Ok(Node::new(
        g,
        &c.node_name,
        Box::new(driver),
        vec![Child {
            role: ChildRole::File,
            node: file,
        }],
    ))
}

fn add_file(g: &Graph, o: &mut Opts, c: &Common) -> Result<Arc<Node>, Error> {
    let filename = PathBuf::from(o.required_string("filename")?);
    // The kernel interface is always io_uring here; the choice is accepted.
    o.choice("aio", &["threads", "native", "io_uring"])?;
    let lock = match o.choice("locking", &["auto", "on", "off"])?.as_str() {
        "off" => None,
        _ => Some(ImageLock::for_open(c.inherit.read_only, false).waiting(c.inherit.lock_wait)),
    };
    o.size("aio-max-batch")?;
    let cache = if c.inherit.direct {
        CacheMode::None
    } else {
        CacheMode::Writeback
    };
    open_file_node(
        g,
        &c.node_name,
        &filename,
        c.inherit.read_only,
        cache,
        512,
        lock,
    )
    .map_err(|e| Error::io(e.to_string()))
}

/// A child given inline (an object: added now, with a generated name) or
/// by reference (a string: an existing node).
fn child(
    g: &Graph,
    o: &mut Opts,
    key: &str,
    inherit: Inherited,
) -> Result<Option<Arc<Node>>, Error> {
    let prefix = format!("{}.", o.name(key));
    match o.take(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) => g.find_node(&name).map(Some).ok_or_else(|| {
            Error::not_found(format!("Cannot find device='' nor node-name='{name}'"))
        }),
        Some(Value::Object(map)) => add(g, Opts::nested_in(map, prefix), false, inherit).map(Some),
        Some(_) => err(format!(
            "Invalid parameter type for '{}', expected: BlockdevRef",
            o.name(key)
        )),
    }
}

fn add_qcow2(g: &Graph, o: &mut Opts, c: &Common) -> Result<Arc<Node>, Error> {
    let file = child(g, o, "file", c.inherit)?
        .ok_or_else(|| Error::invalid(format!("Parameter '{}' is missing", o.name("file"))))?;
    let mut qopts = Qcow2Options::default();
    if let Some(n) = o.size("l2-cache-size")? {
        qopts.l2_cache_bytes = n;
    }
    if let Some(n) = o.size("refcount-cache-size")? {
        qopts.refcount_cache_bytes = n;
    }
    if let Some(total) = o.size("cache-size")? {
        // QEMU splits a total between the caches; give refcounts a quarter.
        qopts.refcount_cache_bytes = total / 4;
        qopts.l2_cache_bytes = total - total / 4;
    }
    let path = PathBuf::from(file.filename().unwrap_or_default());
    let backing = match o.take("backing") {
        // null: no backing file, whatever the image says.
        Some(Value::Null) => None,
        Some(v) => {
            o.put_back("backing", v);
            let backing = Inherited {
                read_only: true,
                ..c.inherit
            };
            child(g, o, "backing", backing)?
        }
        // Absent: the one the image names, opened as ringblk serve would.
        None => open_backing_named_by(&path, &file).map_err(|e| Error::io(e.to_string()))?,
    };
    open_qcow2_node(
        &c.node_name,
        &path,
        file,
        c.inherit.read_only,
        backing,
        qopts,
    )
    .map_err(|e| Error::io(e.to_string()))
}

//! qemu-storage-daemon command lines (`--object`, `--blockdev`,
//! `--export`, a monitor), built option by option: for ringblk
//! ([`super::Daemon::start_qsd`]), qemu-storage-daemon itself, or both
//! ([`super::storage::Storage`]).

use std::ffi::OsStr;
use std::path::Path;

/// A qemu-storage-daemon command line. Options go in the order they are
/// added; an option whose text is the point of a test is passed as it is
/// ([`Self::blockdev`], [`Self::export`], [`Self::object`]).
#[derive(Clone, Default)]
pub struct QsdArgs {
    args: Vec<String>,
}

impl QsdArgs {
    pub fn new() -> Self {
        Self::default()
    }

    /// `NAME VALUE`, two arguments.
    pub fn option(mut self, name: &str, value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref().to_str().expect("UTF-8 argument");
        self.args.push(name.into());
        self.args.push(value.into());
        self
    }

    /// `--object SPEC`.
    pub fn object(self, spec: &str) -> Self {
        self.option("--object", spec)
    }

    /// `--object iothread,id=ID`.
    pub fn iothread(self, id: &str) -> Self {
        self.object(&format!("iothread,id={id}"))
    }

    /// `--blockdev SPEC` (dotted keys or JSON).
    pub fn blockdev(self, spec: &str) -> Self {
        self.option("--blockdev", spec)
    }

    /// A file node `node` on `path` (a protocol node; a format node goes
    /// above it with `file=NODE`).
    pub fn file_node(self, node: &str, path: &Path) -> Self {
        self.blockdev(&format!(
            "driver=file,node-name={node},filename={}",
            path.display()
        ))
    }

    /// A raw image as node `node` (file node inline).
    pub fn raw(self, node: &str, img: &Path) -> Self {
        self.image("raw", node, img)
    }

    /// A qcow2 image as node `node`, its backing chain as its header says.
    pub fn qcow2(self, node: &str, img: &Path) -> Self {
        self.image("qcow2", node, img)
    }

    /// An image in format `driver` as node `node` (file node inline).
    pub fn image(self, driver: &str, node: &str, img: &Path) -> Self {
        self.blockdev(&format!(
            "driver={driver},node-name={node},file.driver=file,file.filename={}",
            img.display()
        ))
    }

    /// `--export SPEC`.
    pub fn export(self, spec: &str) -> Self {
        self.option("--export", spec)
    }

    /// A vhost-user-blk export `id` of `node` listening on `sock`, then
    /// `more` (further `key=value` options, comma-separated; may be empty).
    pub fn vhost_export(self, id: &str, node: &str, sock: &Path, more: &str) -> Self {
        let mut spec = format!(
            "type=vhost-user-blk,id={id},node-name={node},addr.type=unix,addr.path={}",
            sock.display()
        );
        if !more.is_empty() {
            spec.push(',');
            spec.push_str(more);
        }
        self.export(&spec)
    }

    /// A writable vhost-user-blk export of `node` on `sock`, its `queues`
    /// queues on `iothread`.
    pub fn writable_export(
        self,
        id: &str,
        node: &str,
        sock: &Path,
        iothread: &str,
        queues: u16,
    ) -> Self {
        self.vhost_export(
            id,
            node,
            sock,
            &format!("writable=on,iothread={iothread},num-queues={queues}"),
        )
    }

    /// A QMP monitor on `sock`, through a socket chardev named `chardev`.
    pub fn monitor(self, chardev: &str, sock: &Path) -> Self {
        self.option(
            "--chardev",
            format!(
                "socket,id={chardev},path={},server=on,wait=off",
                sock.display()
            ),
        )
        .option("--monitor", format!("chardev={chardev}"))
    }

    /// `--pidfile PATH`.
    pub fn pidfile(self, path: &Path) -> Self {
        self.option("--pidfile", path)
    }

    /// The arguments.
    pub fn build(&self) -> Vec<String> {
        self.args.clone()
    }
}

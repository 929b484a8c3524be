//! Command-line interface. Flag names are a contract with our users.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use ringblk::error::Error;
use ringblk::size::parse_size;

#[derive(Parser, Debug)]
#[command(
    name = "ringblk",
    version,
    about = "vhost-user-blk storage daemon on io_uring"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve a disk image to a VM over a vhost-user-blk socket.
    ///
    /// With neither --image nor --null, an image `ringblk.qcow2` (1 GiB,
    /// qcow2) is created in the current directory, or reused if it exists.
    Serve(ServeArgs),
    /// Create a disk image (qcow2 by default) that qemu-img accepts.
    Create(CreateArgs),
    /// Send one command to a running daemon's control socket.
    ///
    /// Example: `ringblk ctl /run/ringblk.qmp block_resize export=vda size=20G`
    Ctl(CtlArgs),
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write ringblk.1, ringblk-*.1, ringblk.bash, _ringblk, ringblk.fish.
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CreateFormat {
    Qcow2,
    Raw,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_enum, default_value_t = CreateFormat::Qcow2)]
    pub format: CreateFormat,

    /// Backing file (qcow2 only); a relative name is relative to the new
    /// image's folder, and is stored as given.
    #[arg(
        short = 'b',
        long = "backing",
        value_name = "BACKING",
        requires = "backing_format"
    )]
    pub backing: Option<String>,

    /// Format of the backing file (required with -b; never probed).
    #[arg(
        short = 'F',
        long = "backing-format",
        value_enum,
        value_name = "FMT",
        requires = "backing"
    )]
    pub backing_format: Option<CreateFormat>,

    /// qcow2 cluster size (power of two, 512 to 2M).
    #[arg(long, value_name = "N", default_value = "64K", value_parser = parse_size)]
    pub cluster_size: u64,

    /// Path of the new image (must not exist).
    pub path: PathBuf,

    /// Virtual size (K, M, G, T suffixes); defaults to the backing file's.
    #[arg(value_parser = parse_size)]
    pub size: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Detect from the image's contents.
    Auto,
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackingPolicyArg {
    /// Any file a qcow2 image names (QEMU's behaviour).
    Any,
    /// Only files inside the naming image's folder (symlinks resolved).
    SameDir,
    /// No backing files.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// O_DIRECT, bypassing the host page cache (buffered where unsupported).
    None,
    /// Buffered through the host page cache.
    Writeback,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// vhost-user socket path the VM connects to.
    #[arg(long, value_name = "PATH", default_value = "ringblk.sock")]
    pub socket: PathBuf,

    /// Permission bits of the vhost-user socket, in octal; connecting needs
    /// write permission (0660 lets the socket's group, e.g. a qemu user, in).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,

    /// Disk image (file or block device) to serve.
    #[arg(long, value_name = "PATH", conflicts_with = "null")]
    pub image: Option<PathBuf>,

    /// Image format.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto, requires = "image")]
    pub format: FormatArg,

    /// Which backing files a qcow2 image may name; for images from an
    /// untrusted source use same-dir or none.
    #[arg(long, value_enum, default_value_t = BackingPolicyArg::Any)]
    pub backing_policy: BackingPolicyArg,

    /// Serve a disk of SIZE bytes with no storage behind it (reads return
    /// zeros, writes are dropped): a benchmark baseline. Suffixes K, M, G, T.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub null: Option<u64>,

    /// Number of virtqueues.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Iothreads serving the queues, each with its own io_uring (queue k
    /// runs on iothread k mod N). Default: one per queue, but at most one
    /// fewer than the CPUs ringblk may use (and at least one): on a small
    /// machine a second busy iothread only takes turns with the first and
    /// with the guest. A multi-queue export of a real disk with --cache none
    /// at high queue depth does better with one per queue even there: the
    /// kernel's submission of each direct I/O runs on its iothread, so one
    /// iothread serialises every queue's.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub iothreads: Option<u16>,

    /// Virtqueue size the VM should use (power of two, 2..=32768); also sets
    /// the advertised segment limit (queue size - 2).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Export read-only: the guest sees a read-only disk and writes fail.
    #[arg(long)]
    pub read_only: bool,

    /// Open the image even if another process writes it (as qemu-img's
    /// -U): ringblk's image locks then share every permission. Needs
    /// --read-only; what the guest reads may change under it.
    #[arg(long, requires = "read_only")]
    pub force_share: bool,

    /// Host page cache use for the image file.
    #[arg(long, value_enum, default_value_t = CacheArg::None)]
    pub cache: CacheArg,

    /// Seconds to wait at start-up for an image another process has
    /// locked: a daemon killed just before still holds its image until the
    /// kernel has finished its I/O. A real conflict fails after this.
    /// [default: 5]
    #[arg(long, value_name = "SECONDS", value_parser = ringblk::daemon::parse_lock_wait)]
    pub lock_wait: Option<std::time::Duration>,

    /// Serial number the guest sees (up to 20 bytes).
    #[arg(long, value_name = "STR", default_value = "ringblk", value_parser = parse_serial)]
    pub serial: String,

    /// Logical block size the guest sees.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Longest busy-poll (microseconds) an iothread does before sleeping;
    /// adaptive, like QEMU's poll-max-ns. 0 disables polling.
    #[arg(long, value_name = "US", default_value_t = 64)]
    pub poll_max_us: u64,

    /// qcow2 L2 table cache size (metadata bytes; 32M maps 256 GiB of a
    /// 64K-cluster image).
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    pub l2_cache_size: u64,

    /// qcow2 refcount block cache size (metadata bytes).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size)]
    pub refcount_cache_size: u64,

    /// Export name (used in logs and on the control socket).
    #[arg(long, value_name = "NAME", default_value = "vda")]
    pub id: String,

    /// QMP control socket (query, drain, resize, quit); none if omitted.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Most QMP clients connected at once; more are refused with an error.
    #[arg(long, value_name = "N", default_value_t = ringblk::daemon::DEFAULT_CONTROL_CLIENTS as u32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub control_max_clients: u32,

    /// Serve Prometheus metrics at /metrics over HTTP: IP:PORT
    /// (127.0.0.1:9100) or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<ringblk::daemon::metrics::MetricsAddr>,
}

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Print the command's return value as JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The daemon's QMP control socket (`serve --control PATH`).
    #[arg(value_name = "SOCKET")]
    pub socket: PathBuf,

    /// A QMP command, e.g. query-block-exports, block_resize, block-drain.
    #[arg(value_name = "COMMAND")]
    pub command: String,

    /// Arguments as key=value (sizes like 20G become numbers; key:=JSON
    /// passes raw JSON), e.g. `export=vda size=20G`.
    #[arg(value_name = "KEY=VALUE")]
    pub args: Vec<String>,
}

fn parse_queue_size(s: &str) -> Result<u16, Error> {
    let n: u32 = s
        .parse()
        .map_err(|_| Error::invalid(format!("'{s}' is not a number")))?;
    if !(2..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(Error::invalid(format!(
            "queue size must be a power of two from 2 to 32768, not {n}"
        )));
    }
    Ok(n as u16)
}

fn parse_mode(s: &str) -> Result<u32, Error> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(Error::invalid(format!(
            "'{s}' is not an octal permission mode from 0 to 0777"
        ))),
    }
}

fn parse_block_size(s: &str) -> Result<u32, Error> {
    match s {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(Error::invalid(format!(
            "logical block size must be 512 or 4096, not {s}"
        ))),
    }
}

fn parse_serial(s: &str) -> Result<String, Error> {
    if s.len() > 20 {
        return Err(Error::invalid(format!(
            "serial '{s}' is longer than 20 bytes"
        )));
    }
    Ok(s.to_string())
}

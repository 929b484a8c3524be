//! ringblk: start-up, signals, shutdown.

mod cli;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

use cli::{
    BackingPolicyArg, CacheArg, Cli, Command, CreateArgs, CreateFormat, CtlArgs, FormatArg,
    ServeArgs,
};
use ringblk::control::{ctl, ControlServer, Daemon};
use ringblk::formats::qcow2::create::{self as qcreate, CreateOptions};
use ringblk::formats::qcow2::Qcow2Options;
use ringblk::formats::CacheMode;
use ringblk::graph::{
    all_nodes, drain_all_begin, drain_all_end, open_image, open_null, BackingPolicy, BlockBackend,
    ImageFormat, ImageOptions, Node,
};
use ringblk::uring::IoThread;
use ringblk::vhost::blk::config::{seg_max_for, BlkGeometry, SIZE_MAX};
use ringblk::vhost::blk::export::BlkExport;
use ringblk::vhost::blk::request::{Limits, VIRTIO_BLK_ID_BYTES};
use ringblk::vhost::blk::state::ExportState;
use ringblk::vhost::server::VhostServer;

const DEFAULT_IMAGE: &str = "ringblk.qcow2";
const DEFAULT_IMAGE_SIZE: u64 = 1 << 30;
/// Largest discard / write-zeroes request we advertise, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Create(args) => create(args),
        Command::Ctl(args) => ctl_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringblk: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Block SIGINT and SIGTERM in every thread; the main thread takes them
/// with sigwait so shutdown runs in ordinary code.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask with it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Set by QMP `quit` before it raises SIGTERM, to name the reason.
static QUIT_REQUESTED: AtomicBool = AtomicBool::new(false);

fn request_quit() {
    QUIT_REQUESTED.store(true, Ordering::SeqCst);
    // SAFETY: kill on our own pid; the main thread takes it with sigwait.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

fn ctl_command(args: CtlArgs) -> Result<(), String> {
    let mut arguments = serde_json::Map::new();
    for a in &args.args {
        let (k, v) = ctl::parse_arg(a)?;
        arguments.insert(k, v);
    }
    let mut conn = ctl::Connection::open(&args.socket)?;
    let ret = conn.execute(&args.command, arguments)??;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&ret).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", ctl::human(&ret));
    }
    Ok(())
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait with a valid set and out-parameter.
    while unsafe { libc::sigwait(set, &mut sig) } != 0 {}
    sig
}

/// The default image: a qcow2 created on first use, reused afterwards.
fn default_image() -> Result<PathBuf, String> {
    let path = PathBuf::from(DEFAULT_IMAGE);
    if path.exists() {
        println!(
            "ringblk: no --image given; using the existing {}",
            absolute(&path).display()
        );
        return Ok(path);
    }
    let opts = CreateOptions {
        size: DEFAULT_IMAGE_SIZE,
        cluster_size: qcreate::DEFAULT_CLUSTER_SIZE,
        backing: None,
    };
    qcreate::create(&path, &opts).map_err(|e| format!("cannot create {DEFAULT_IMAGE}: {e}"))?;
    println!(
        "ringblk: no --image given; created {} (1 GiB, qcow2)",
        absolute(&path).display()
    );
    Ok(path)
}

fn create(args: CreateArgs) -> Result<(), String> {
    let path = &args.path;
    let backing = match (&args.backing, args.backing_format) {
        (Some(b), Some(f)) => {
            if args.format == CreateFormat::Raw {
                return Err("a raw image cannot have a backing file".into());
            }
            Some((b.as_str(), f))
        }
        _ => None,
    };
    // The backing file must open (read-only, with the format given) and
    // gives the default size.
    let backing_size = match backing {
        Some((b, f)) => {
            let bpath = path.parent().unwrap_or(Path::new(".")).join(b);
            let node = open_image(&ImageOptions {
                path: bpath,
                format: match f {
                    CreateFormat::Raw => ImageFormat::Raw,
                    CreateFormat::Qcow2 => ImageFormat::Qcow2,
                },
                read_only: true,
                cache: CacheMode::Writeback,
                block_size: 512,
                qcow2: Qcow2Options::default(),
                force_share: false,
                backing: BackingPolicy::Any,
            })
            .map_err(|e| format!("backing file: {e}"))?;
            Some(BlockBackend::new("backing", node, true).size())
        }
        None => None,
    };
    let size = args
        .size
        .or(backing_size)
        .ok_or("a size is required (or a backing file to take it from)")?;
    let r = match args.format {
        CreateFormat::Raw => qcreate::create_raw(path, size),
        CreateFormat::Qcow2 => {
            let fmt = |f: CreateFormat| match f {
                CreateFormat::Raw => "raw",
                CreateFormat::Qcow2 => "qcow2",
            };
            qcreate::create(
                path,
                &CreateOptions {
                    size,
                    cluster_size: args.cluster_size,
                    backing: backing.map(|(b, f)| (b, fmt(f))),
                },
            )
        }
    };
    r.map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "Formatting '{}', fmt={:?}, size={size}",
        path.display(),
        args.format
    );
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn open_root(args: &ServeArgs) -> Result<(Arc<Node>, String), String> {
    if let Some(size) = args.null {
        if size % args.logical_block_size as u64 != 0 {
            return Err(format!(
                "--null size must be a multiple of {}",
                args.logical_block_size
            ));
        }
        return Ok((open_null(size), format!("null disk of {size} bytes")));
    }
    let path = match &args.image {
        Some(p) => p.clone(),
        None => default_image()?,
    };
    let opts = ImageOptions {
        path: path.clone(),
        format: match args.format {
            FormatArg::Auto => ImageFormat::Auto,
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
        },
        read_only: args.read_only,
        cache: match args.cache {
            CacheArg::None => CacheMode::None,
            CacheArg::Writeback => CacheMode::Writeback,
        },
        block_size: args.logical_block_size as usize,
        qcow2: Qcow2Options {
            l2_cache_bytes: args.l2_cache_size,
            refcount_cache_bytes: args.refcount_cache_size,
        },
        force_share: args.force_share,
        backing: match args.backing_policy {
            BackingPolicyArg::Any => BackingPolicy::Any,
            BackingPolicyArg::SameDir => BackingPolicy::SameDir,
            BackingPolicyArg::None => BackingPolicy::None,
        },
    };
    let node = open_image(&opts).map_err(|e| e.to_string())?;
    let mut what = absolute(&path).display().to_string();
    if args.format == FormatArg::Auto {
        // The banner says so: a probed format is a guess the guest must not
        // be able to change (see RawDriver::probed).
        let format = node.driver_name();
        what = format!("{what}, format probed as {format}; give --format {format} to pin it");
        if format == "raw" {
            what.push_str(
                "; until then guest writes that make sector 0 look like a qcow2, QED or VMDK header are refused",
            );
        }
    }
    Ok((node, what))
}

fn print_attach_help(sock: &Path, args: &ServeArgs) {
    let sock = absolute(sock);
    let s = sock.display();
    let (n, q) = (args.num_queues, args.queue_size);
    println!("ringblk: attach QEMU with:");
    println!(
        "  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\\n    -chardev socket,id=ringblk0,path={s} -device vhost-user-blk-pci,chardev=ringblk0,num-queues={n},queue-size={q} ..."
    );
    println!("ringblk: or cloud-hypervisor with:");
    println!("  cloud-hypervisor --memory size=1G,shared=on --disk vhost_user=true,socket={s},num_queues={n},queue_size={q} ...");
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let signals = block_shutdown_signals();
    let (root, what) = open_root(&args)?;
    let backend = BlockBackend::new(&args.id, root, args.read_only);
    let bs = args.logical_block_size as u64;
    if backend.size() < bs {
        return Err(format!("{what}: smaller than one {bs}-byte block"));
    }

    let mut iothreads = Vec::new();
    for i in 0..args.num_queues {
        iothreads.push(
            IoThread::start(
                &format!("iothread{i}"),
                std::time::Duration::from_micros(args.poll_max_us),
            )
            .map_err(|e| format!("cannot start iothread: {e}"))?,
        );
    }
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..args.serial.len()].copy_from_slice(args.serial.as_bytes());
    let geometry = BlkGeometry {
        num_queues: args.num_queues,
        queue_size: args.queue_size,
        read_only: args.read_only,
        limits: Limits {
            block_size: args.logical_block_size,
            size_max: SIZE_MAX,
            seg_max: seg_max_for(args.queue_size),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_segments: 1,
            serial,
        },
    };
    let state = ExportState::new(
        &args.id,
        backend.clone(),
        geometry.limits.clone(),
        geometry.seg_max() as usize + 2,
        args.num_queues,
    );
    let export = Arc::new(BlkExport {
        id: args.id.clone(),
        geometry,
        state,
        iothreads: iothreads.iter().map(|t| t.handle()).collect(),
        socket: absolute(&args.socket),
        connected: AtomicBool::new(false),
    });
    let server = VhostServer::bind(&args.socket, args.socket_mode, export.clone())
        .map_err(|e| e.to_string())?;
    let stopper = server.stopper().map_err(|e| e.to_string())?;
    let control = match &args.control {
        Some(path) => Some(
            ControlServer::start(
                path,
                Daemon::new(vec![export.clone()], request_quit),
                args.control_max_clients as usize,
            )
            .map_err(|e| format!("control socket: {e}"))?,
        ),
        None => None,
    };
    drop(export);

    print_attach_help(&args.socket, &args);
    println!("ringblk: serving {what}");
    println!(
        "ringblk: listening on {} (export {}, {} bytes, {} queue(s){})",
        absolute(&args.socket).display(),
        args.id,
        backend.size(),
        args.num_queues,
        if args.read_only { ", read-only" } else { "" }
    );
    if let Some(path) = &args.control {
        println!(
            "ringblk: control socket {} (try: ringblk ctl {} query-block-exports)",
            absolute(path).display(),
            path.display()
        );
    }
    let _ = std::io::stdout().flush();

    let server_thread = std::thread::Builder::new()
        .name("vhost".into())
        .spawn(move || server.serve())
        .map_err(|e| e.to_string())?;

    let sig = wait_for_signal(&signals);
    let quit = QUIT_REQUESTED.load(Ordering::SeqCst);
    if quit {
        log::info!("quit requested on the control socket, shutting down");
    } else {
        log::info!("signal {sig} received, shutting down");
    }
    shutdown(ShutdownParts {
        control,
        reason: if quit { "host-qmp-quit" } else { "host-signal" },
        stopper,
        server_thread,
        backends: vec![backend],
        iothreads,
    })
}

struct ShutdownParts {
    control: Option<ControlServer>,
    reason: &'static str,
    stopper: vmm_sys_util::eventfd::EventFd,
    server_thread: std::thread::JoinHandle<()>,
    backends: Vec<Arc<BlockBackend>>,
    iothreads: Vec<IoThread>,
}

/// The shutdown order: exports stop -> drain_all -> eject -> references
/// dropped -> nodes close (flush) -> nothing left open.
fn shutdown(p: ShutdownParts) -> Result<(), String> {
    let mut failed = Vec::new();
    // Control clients go first: their drained sections end, so the exports
    // can finish what the guest already submitted.
    if let Some(c) = p.control {
        c.shutdown(p.reason);
    }
    // 1. Stop the exports: the frontend is disconnected once its queues have
    //    finished their in-flight requests.
    let _ = p.stopper.write(1);
    if p.server_thread.join().is_err() {
        failed.push("the vhost thread panicked".to_string());
    }
    // 2. Quiesce everything and wait for every request in the graph.
    drain_all_begin();
    // 3. Flush what the guest wrote, then detach every tree.
    let mut roots = Vec::new();
    for b in &p.backends {
        let bb = b.clone();
        match p.iothreads[0]
            .handle()
            .block_on(move || async move { bb.flush().await })
        {
            Err(ringblk::graph::BackendError::Ejected { .. }) | Ok(()) => {}
            Err(e) => failed.push(format!("final flush failed: {e}")),
        }
        roots.extend(b.eject());
    }
    drain_all_end();
    // 4. Our references go; each node closes (qcow2 writes back its caches
    //    and marks itself clean, files sync) as its refcount reaches zero.
    drop(roots);
    drop(p.backends);
    for t in p.iothreads {
        t.stop();
    }
    // 5. Nothing may stay open.
    let left: Vec<String> = all_nodes().iter().map(|n| n.name().to_string()).collect();
    if !left.is_empty() {
        failed.push(format!(
            "nodes still open after shutdown: {}",
            left.join(", ")
        ));
    }
    if failed.is_empty() {
        log::info!("shut down cleanly");
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

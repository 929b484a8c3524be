//! qemu-storage-daemon's command line: `--blockdev`, `--export`,
//! `--object iothread`, `--chardev socket` + `--monitor`, `--pidfile`, so a
//! QSD command line runs with the binary's name changed. Options are
//! applied in order, as QSD does: a node or iothread must come before the
//! export that uses it.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::keyval;
use super::StorageDaemon;
use super::{parse_lock_wait, DEFAULT_LOCK_WAIT};
use crate::error::Error;
use crate::opts::Opts;
use crate::os::activation::PassedFds;
use crate::vhost::exports::ExportOptions;

/// The QSD options ringblk takes (each with a value but `--daemonize`),
/// with what each does (for `--help`-like listings and the man page).
pub const OPTIONS: [(&str, &str); 10] = [
    (
        "--blockdev",
        "a block node, dotted key=value or JSON (QEMU's BlockdevOptions)",
    ),
    (
        "--export",
        "type=vhost-user-blk,id=,node-name=,addr.type=unix,addr.path=,...: serve a node",
    ),
    (
        "--object",
        "iothread,id=ID or throttle-group,id=ID,limits.*=N",
    ),
    (
        "--chardev",
        "socket,id=ID,path=PATH,server=on,wait=off: a socket for --monitor",
    ),
    (
        "--monitor",
        "chardev=ID: the QMP control socket on that chardev",
    ),
    (
        "--pidfile",
        "PATH: written once everything is set up, removed at exit",
    ),
    (
        "--daemonize",
        "refused: run ringblk under a service manager",
    ),
    (
        "--nbd-server",
        "refused: ringblk serves vhost-user-blk exports",
    ),
    // ringblk's own.
    (
        "--lock-wait",
        "SECONDS: how long start-up waits for images another process locked (5)",
    ),
    (
        "--metrics",
        "IP:PORT or unix:PATH: Prometheus metrics at /metrics",
    ),
];

/// Whether `name` is one of [`OPTIONS`].
pub fn is_option(name: &str) -> bool {
    OPTIONS.iter().any(|(n, _)| *n == name)
}

/// A QSD command line, split into options and values.
pub struct QsdArgs {
    pub options: Vec<(String, String)>,
}

impl QsdArgs {
    /// Split `args` (without the program name): `--opt value` or
    /// `--opt=value`. Unknown options are errors naming them.
    pub fn parse(args: &[String]) -> Result<QsdArgs, Error> {
        let mut options = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (a.clone(), None),
            };
            if !is_option(&name) {
                return Err(Error::invalid(format!("{name}: unrecognized option")));
            }
            if name == "--daemonize" {
                return Err(Error::invalid("--daemonize is not supported: run ringblk in the foreground under a service manager (systemd, a container runtime)"));
            }
            if name == "--nbd-server" {
                return Err(Error::invalid(
                    "--nbd-server: ringblk serves vhost-user-blk exports only",
                ));
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("{name}: requires an argument")))?,
            };
            options.push((name, value));
        }
        Ok(QsdArgs { options })
    }
}

/// What the command line asked for besides the objects themselves.
#[derive(Default)]
pub struct QsdSetup {
    /// Written once everything is set up; removed at exit.
    pub pidfile: Option<PathBuf>,
    /// "ringblk: listening on ..." lines for the banner.
    pub exports: Vec<String>,
}

struct Chardev {
    id: String,
    path: PathBuf,
}

/// Apply every option to `daemon`, in order.
/// Build `daemon` from `args`; `passed` are the sockets systemd passed,
/// which `addr.type=fd,addr.str=NAME` exports take by name.
pub fn build(
    daemon: &mut StorageDaemon,
    args: &QsdArgs,
    passed: &mut PassedFds,
) -> Result<QsdSetup, Error> {
    let mut setup = QsdSetup::default();
    let mut chardevs = Vec::new();
    // Wherever it stands, it applies to every --blockdev.
    let mut lock_wait = DEFAULT_LOCK_WAIT;
    for (name, value) in &args.options {
        if name == "--lock-wait" {
            lock_wait = parse_lock_wait(value)
                .map_err(|e| Error::invalid(format!("{name} {value}: {e}")))?;
        }
    }
    for (name, value) in &args.options {
        let implied = match name.as_str() {
            "--object" => Some("qom-type"),
            "--chardev" => Some("backend"),
            "--export" => Some("type"),
            "--monitor" => Some("chardev"),
            _ => None,
        };
        let ctx = |e: Error| e.context(format!("{name} {value}"));
        if name == "--pidfile" {
            setup.pidfile = Some(PathBuf::from(value));
            continue;
        }
        if name == "--lock-wait" {
            continue;
        }
        if name == "--metrics" {
            let addr = value.parse().map_err(ctx)?;
            daemon.start_metrics(&addr).map_err(ctx)?;
            continue;
        }
        let map = keyval::parse(value, implied).map_err(ctx)?;
        match name.as_str() {
            "--blockdev" => {
                daemon
                    .state()
                    .graph()
                    .blockdev_add_waiting(Value::Object(map), lock_wait)
                    .map_err(ctx)?;
            }
            "--object" => daemon.state().add_object(map).map_err(ctx)?,
            "--chardev" => chardevs.push(chardev(map).map_err(ctx)?),
            "--monitor" => monitor(daemon, map, &chardevs).map_err(ctx)?,
            "--export" => setup
                .exports
                .push(export(daemon, map, passed).map_err(ctx)?),
            _ => unreachable!("QsdArgs::parse admits only OPTIONS"),
        }
    }
    Ok(setup)
}

fn chardev(map: Map<String, Value>) -> Result<Chardev, Error> {
    let mut o = Opts::new(map);
    let backend = o.required_string("backend")?;
    if backend != "socket" {
        return Err(Error::invalid(format!(
            "chardev backend '{backend}' is not supported (only socket)"
        )));
    }
    let id = o.required_string("id")?;
    let path = PathBuf::from(o.required_string("path")?);
    if !o.bool("server", false)? {
        return Err(Error::invalid("only server=on sockets are supported"));
    }
    if o.bool("wait", true)? {
        return Err(Error::invalid("wait=on is not supported: give wait=off"));
    }
    o.finish()?;
    Ok(Chardev { id, path })
}

fn monitor(
    daemon: &mut StorageDaemon,
    map: Map<String, Value>,
    chardevs: &[Chardev],
) -> Result<(), Error> {
    let mut o = Opts::new(map);
    let id = o.required_string("chardev")?;
    o.choice("mode", &["control"])?;
    o.bool("pretty", false)?;
    o.finish()?;
    let c = chardevs
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| Error::invalid(format!("chardev '{id}' not found")))?;
    daemon.start_control(&c.path, super::DEFAULT_CONTROL_CLIENTS)
}

/// `addr.type=fd` with a name instead of a number (`addr.str=vda`): the
/// socket systemd passed under that name (`FileDescriptorName=`).
fn name_passed_fd(map: &mut Map<String, Value>, passed: &mut PassedFds) -> Result<(), Error> {
    let Some(Value::Object(addr)) = map.get_mut("addr") else {
        return Ok(());
    };
    if addr.get("type").and_then(Value::as_str) != Some("fd") {
        return Ok(());
    }
    let Some(Value::String(name)) = addr.get("str") else {
        return Ok(());
    };
    if name.parse::<i32>().is_ok() {
        return Ok(());
    }
    let fd = passed.take_named(name).ok_or_else(|| {
        Error::not_found(format!(
            "addr.str: no socket called '{name}' was passed (LISTEN_FDNAMES)"
        ))
    })?;
    addr.insert("str".into(), Value::String(fd.to_string()));
    Ok(())
}

/// `--export type=vhost-user-blk,...`; returns its banner line.
fn export(
    daemon: &mut StorageDaemon,
    mut map: Map<String, Value>,
    passed: &mut PassedFds,
) -> Result<String, Error> {
    name_passed_fd(&mut map, passed)?;
    let state = daemon.state();
    let ExportOptions { config, iothreads } = ExportOptions::parse(state.graph(), map)?;
    let iothreads = state.iothreads_for(&iothreads)?;
    let line = format!(
        "ringblk: listening on {} (export {}, node {}, {} queue(s){})",
        config.listener.describe(),
        config.id,
        config.root.name(),
        config.num_queues,
        if config.read_only { ", read-only" } else { "" }
    );
    state.add_export(config, iothreads)?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_with_and_without_equals() {
        let a = QsdArgs::parse(&args(&[
            "--blockdev",
            "driver=null-co,node-name=n",
            "--pidfile=/p",
        ]))
        .unwrap();
        assert_eq!(a.options[0].0, "--blockdev");
        assert_eq!(a.options[1], ("--pidfile".into(), "/p".into()));
    }

    #[test]
    fn unknown_and_unsupported_options_are_named() {
        let e = QsdArgs::parse(&args(&["--bogus", "x"])).err().unwrap();
        assert!(e.message().contains("--bogus"), "{e}");
        let e = QsdArgs::parse(&args(&["--daemonize"])).err().unwrap();
        assert!(e.message().contains("--daemonize"), "{e}");
        let e = QsdArgs::parse(&args(&["--export"])).err().unwrap();
        assert!(e.message().contains("requires an argument"), "{e}");
    }
}

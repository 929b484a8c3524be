//! The QMP commands, by name. Each runs on its client's thread under the
//! big control lock, so graph changes never interleave.

mod blockdev;
mod blockstats;
mod drain;
mod export;
mod job;
mod object;
mod query;
mod resize;
mod snapshot;
mod target;

use std::sync::Arc;

use serde_json::{json, Value};

use super::args::Args;
use super::qmp::{self, CmdResult, QmpError, Return};
use super::server::{Monitor, Sections};

/// Every command after negotiation, for `query-commands` (and the man
/// page).
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-block-exports",
    "query-named-block-nodes",
    "query-blockstats",
    "query-iothreads",
    "blockdev-add",
    "blockdev-del",
    "block-export-add",
    "block-export-del",
    "block_resize",
    "block-drain",
    "block-drained-begin",
    "block-drained-end",
    "blockdev-snapshot-sync",
    "blockdev-snapshot",
    "transaction",
    "block-commit",
    "query-jobs",
    "query-block-jobs",
    "job-complete",
    "job-finalize",
    "job-cancel",
    "job-dismiss",
    "block-job-complete",
    "block-job-finalize",
    "block-job-cancel",
    "block-job-dismiss",
    "object-add",
    "object-del",
    "qom-get",
    "qom-set",
    "quit",
];

/// Whether `name` runs under the graph lock, taken by the caller. Graph
/// changes do, one at a time. Queries and drained sections do not: they
/// must never wait behind another client's graph change (a drained
/// section's end would keep a guest stopped for as long). Snapshots and
/// transactions take the lock themselves, once their overlay files exist;
/// block-export-del takes it once the export's requests have completed.
pub(super) fn holds_graph_lock(name: &str) -> bool {
    !(name.starts_with("query-")
        || matches!(
            name,
            "qmp_capabilities"
                | "quit"
                | "block-drain"
                | "block-drained-begin"
                | "block-drained-end"
                | "block-export-del"
                | "qom-get"
                | "qom-set"
                | "blockdev-snapshot-sync"
                | "blockdev-snapshot"
                | "transaction"
        ))
}

pub(super) fn execute(
    mon: &Arc<Monitor>,
    sections: &mut Sections,
    name: &str,
    mut args: Args,
) -> Result<Return, QmpError> {
    if name == "query-blockstats" {
        let nodes = args.opt_bool("query-nodes")?.unwrap_or(false);
        return args
            .finish()
            .map(|_| Return::Text(blockstats::blockstats(mon, nodes)));
    }
    run(mon, sections, name, args).map(Return::Value)
}

fn run(mon: &Arc<Monitor>, sections: &mut Sections, name: &str, mut args: Args) -> CmdResult {
    // Commands without arguments refuse any before running.
    let no_args = |args: Args| args.finish();
    match name {
        "qmp_capabilities" => Err(QmpError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        )),
        "query-commands" => no_args(args)
            .map(|_| Value::Array(COMMANDS.iter().map(|c| json!({ "name": c })).collect())),
        "query-version" => no_args(args).map(|_| qmp::version()),
        "query-block-exports" => no_args(args).map(|_| query::block_exports(mon)),
        "query-named-block-nodes" => {
            let flat = args.opt_bool("flat")?.unwrap_or(false);
            args.finish()
                .map(|_| query::named_block_nodes(mon.state.graph(), flat))
        }
        "query-iothreads" => no_args(args).map(|_| query::iothreads(mon)),
        "blockdev-add" => blockdev::add(mon.state.graph(), args),
        "blockdev-del" => blockdev::del(mon.state.graph(), args),
        "block-export-add" => export::add(mon, args),
        "block-export-del" => export::del(mon, args),
        "block_resize" => resize::block_resize(mon, args),
        "block-drain" => drain::block_drain(mon, args),
        "block-drained-begin" => drain::drained_begin(mon, sections, args),
        "block-drained-end" => drain::drained_end(mon, sections, args),
        "blockdev-snapshot-sync" => snapshot::blockdev_snapshot_sync(mon, args),
        "blockdev-snapshot" => snapshot::blockdev_snapshot(mon.state.graph(), args),
        "transaction" => snapshot::transaction_cmd(mon, args),
        "block-commit" => job::block_commit(mon, args),
        "query-jobs" => no_args(args).map(|_| mon.state.graph().jobs().query_jobs()),
        "query-block-jobs" => no_args(args).map(|_| mon.state.graph().jobs().query_block_jobs()),
        "job-complete" | "job-finalize" | "job-cancel" | "job-dismiss" => {
            job::verb(mon.state.graph().jobs(), name, args)
        }
        "block-job-complete" | "block-job-finalize" | "block-job-cancel" | "block-job-dismiss" => {
            job::block_job_verb(mon.state.graph().jobs(), name, args)
        }
        "object-add" => object::add(mon, args),
        "object-del" => object::del(mon, args),
        "qom-get" => object::qom_get(mon, args),
        "qom-set" => object::qom_set(mon, args),
        // The caller starts the shutdown once the reply is out.
        "quit" => no_args(args).map(|_| json!({})),

        other => Err(QmpError::command_not_found(format!(
            "The command {other} has not been found"
        ))),
    }
}

//! `block-commit` and the job commands (`query-jobs`, `job-complete`,
//! `job-finalize`, `job-cancel`, `job-dismiss` and their `block-job-*`
//! forms).

use serde_json::json;

use crate::control::args::Args;
use crate::control::qmp::{CmdResult, ErrorClass, QmpError};
use crate::control::server::Monitor;
use crate::error::Error;
use crate::graph::{start_commit, CommitOptions, Jobs};

fn reply(r: Result<(), Error>) -> CmdResult {
    r.map(|()| json!({})).map_err(QmpError::from)
}

pub(super) fn block_commit(mon: &Monitor, mut a: Args) -> CmdResult {
    let job_id = a.opt_str("job-id")?;
    let device = a.str("device")?;
    let base_node = a.opt_str("base-node")?;
    let base_file = a.opt_str("base")?;
    let top_node = a.opt_str("top-node")?;
    let top_file = a.opt_str("top")?;
    let speed = a.take("speed");
    let auto_finalize = a.opt_bool("auto-finalize")?.unwrap_or(true);
    let auto_dismiss = a.opt_bool("auto-dismiss")?.unwrap_or(true);
    let backing_file = a.opt_str("backing-file")?;
    let filter_node_name = a.opt_str("filter-node-name")?;
    let on_error = a.opt_str("on-error")?;
    a.finish()?;
    if on_error.as_deref().is_some_and(|e| e != "report") {
        return Err(QmpError::generic(
            "ringblk's jobs end with an error on an I/O error: 'on-error' can only be 'report'",
        ));
    }
    if speed.is_some_and(|s| s != json!(0)) {
        return Err(QmpError::generic(
            "ringblk does not limit a job's speed; leave out 'speed' or give 0",
        ));
    }
    if base_file.is_some() || top_file.is_some() || backing_file.is_some() {
        return Err(QmpError::generic(
            "Name nodes with 'base-node' and 'top-node'; 'base', 'top' and 'backing-file' are not supported",
        ));
    }
    let top = mon
        .state
        .graph()
        .lookup_node(Some(&device), Some(&device))
        .ok_or_else(|| QmpError::not_found(format!("Device '{device}' not found")))?;
    if let Some(t) = top_node {
        if t != top.name() {
            return Err(QmpError::generic(format!(
                "ringblk commits only the active layer: 'top-node' must be '{}' (the root of '{device}')",
                top.name()
            )));
        }
    }
    let base = match base_node {
        Some(b) => Some(mon.state.graph().find_node(&b).ok_or_else(|| {
            QmpError::generic(format!("Cannot find device='' nor node-name='{b}'"))
        })?),
        None => None,
    };
    reply(start_commit(CommitOptions {
        job_id: job_id.unwrap_or_else(|| device.clone()),
        top,
        base,
        filter_node_name,
        auto_finalize,
        auto_dismiss,
    }))
}

fn run_verb(jobs: &Jobs, verb: &str, id: &str) -> CmdResult {
    reply(match verb {
        "complete" => jobs.complete(id),
        "finalize" => jobs.finalize(id),
        "cancel" => jobs.cancel(id),
        _ => jobs.dismiss(id),
    })
}

/// `job-complete`, `job-finalize`, `job-cancel`, `job-dismiss`: `{"id"}`.
pub(super) fn verb(jobs: &Jobs, name: &str, mut a: Args) -> CmdResult {
    let id = a.str("id")?;
    a.finish()?;
    run_verb(jobs, name.trim_start_matches("job-"), &id)
}

/// `block-job-complete`, `block-job-cancel` (`{"device"}`, which names
/// the job), `block-job-finalize`, `block-job-dismiss` (`{"id"}`).
pub(super) fn block_job_verb(jobs: &Jobs, name: &str, mut a: Args) -> CmdResult {
    let verb = name.trim_start_matches("block-job-");
    let id = match verb {
        "complete" | "cancel" => a.str("device")?,
        _ => a.str("id")?,
    };
    if verb == "cancel" {
        a.opt_bool("force")?;
    }
    a.finish()?;
    if !jobs.exists(&id) {
        return Err(QmpError {
            class: ErrorClass::DeviceNotActive,
            desc: format!("Block job '{id}' not found"),
        });
    }
    run_verb(jobs, verb, &id)
}

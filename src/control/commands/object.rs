//! object-add, object-del, qom-get and qom-set for the objects ringblk
//! has: `throttle-group` (its `limits`, changed live) and `iothread`.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::control::args::Args;
use crate::control::qmp::{CmdResult, QmpError};
use crate::control::server::Monitor;

pub(super) fn add(mon: &Arc<Monitor>, args: Args) -> CmdResult {
    let Value::Object(props) = args.into_value() else {
        return Err(QmpError::generic("Invalid arguments"));
    };
    mon.state.add_object(props)?;
    Ok(json!({}))
}

pub(super) fn del(mon: &Arc<Monitor>, mut args: Args) -> CmdResult {
    let id = args.str("id")?;
    args.finish()?;
    mon.state.del_object(&id)?;
    Ok(json!({}))
}

/// QOM paths name objects as `/objects/ID` or, unambiguously, `ID`.
fn object_id(path: &str) -> &str {
    path.strip_prefix("/objects/").unwrap_or(path)
}

fn no_such_path(path: &str) -> QmpError {
    QmpError::not_found(format!("Device '{path}' not found"))
}

pub(super) fn qom_get(mon: &Arc<Monitor>, mut args: Args) -> CmdResult {
    let path = args.str("path")?;
    let property = args.str("property")?;
    args.finish()?;
    match mon.state.object_property(object_id(&path), &property) {
        Some(v) => Ok(v?),
        None => Err(no_such_path(&path)),
    }
}

pub(super) fn qom_set(mon: &Arc<Monitor>, mut args: Args) -> CmdResult {
    let path = args.str("path")?;
    let property = args.str("property")?;
    let value = args
        .take("value")
        .ok_or_else(|| QmpError::generic("Parameter 'value' is missing"))?;
    args.finish()?;
    match mon
        .state
        .set_object_property(object_id(&path), &property, value)
    {
        Some(r) => {
            r?;
            Ok(json!({}))
        }
        None => Err(no_such_path(&path)),
    }
}

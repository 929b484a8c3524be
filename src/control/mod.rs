//! The QMP control socket: protocol framing, the server and its commands,
//! and the `ringblk ctl` client.

mod args;
mod client;
mod commands;

pub use commands::COMMANDS;
pub mod ctl;
pub(crate) mod json_stream;
pub(crate) mod qmp;
pub(crate) mod server;

pub(crate) use server::{ControlServer, Monitor};

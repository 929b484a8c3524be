//! `ringblk generate-docs DIR`: the man pages and shell completions,
//! generated from the command-line definition (`cli.rs`), the
//! qemu-storage-daemon options (`daemon::qsd::OPTIONS`) and the QMP
//! commands (`control::COMMANDS`), so that none of them is written twice.
//! `scripts/package` runs it.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use ringblk::control::COMMANDS;
use ringblk::daemon::qsd::OPTIONS;

/// Text for roff: backslashes and hyphens escaped, no line starting with
/// a control character.
fn roff(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// What clap cannot say: qemu-storage-daemon's command line and the QMP
/// commands, as sections of ringblk(1).
fn extra_sections(w: &mut dyn Write) -> io::Result<()> {
    writeln!(w, ".SH \"QEMU-STORAGE-DAEMON FORM\"")?;
    writeln!(
        w,
        "{}",
        roff(
            "ringblk also takes qemu-storage-daemon's command line, the binary's name changed \
             (ringblk --blockdev ... --export ...). Options are applied in order; an unknown \
             option, driver or key is an error naming it."
        )
    )?;
    for (name, help) in OPTIONS {
        writeln!(w, ".TP\n\\fB{}\\fR\n{}", roff(name), roff(help))?;
    }
    writeln!(w, ".SH \"QMP COMMANDS\"")?;
    writeln!(
        w,
        "{}",
        roff(
            "serve --control PATH, or --chardev and --monitor, open a QMP socket (QEMU's \
             monitor protocol). Commands, with their arguments and replies in \
             docs/reference.md:"
        )
    )?;
    for c in COMMANDS {
        writeln!(w, ".br\n{}", roff(c))?;
    }
    writeln!(w, ".SH SIGNALS")?;
    writeln!(
        w,
        "{}",
        roff(
            "SIGTERM and SIGINT shut down cleanly (requests complete, images are flushed and \
             closed). SIGUSR1 exits for a restart: guests with an inflight region keep their \
             requests, which the next daemon on the same socket runs. Under systemd with an \
             fd store (FileDescriptorStoreMax=), SIGUSR1 hands each connected session to the \
             store instead, and the next daemon goes on with the same connection."
        )
    )?;
    Ok(())
}

pub fn generate(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut page = File::create(dir.join("ringblk.1"))?;
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    extra_sections(&mut page)?;
    man.render_version_section(&mut page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("ringblk-{}", sub.get_name());
        let mut f = File::create(dir.join(format!("{name}.1")))?;
        let sub = sub.clone().display_name(&name).bin_name(&name);
        clap_mangen::Man::new(sub).render(&mut f)?;
    }
    let mut cmd = cmd;
    for (shell, file) in [
        (Shell::Bash, "ringblk.bash"),
        (Shell::Zsh, "_ringblk"),
        (Shell::Fish, "ringblk.fish"),
    ] {
        let mut f = File::create(dir.join(file))?;
        clap_complete::generate(shell, &mut cmd, "ringblk", &mut f);
    }
    Ok(())
}

//! Whether standard error goes to systemd's journal: systemd sets
//! `JOURNAL_STREAM` to the device and inode of the stream it connected,
//! and a process whose stderr is still that stream should log without
//! timestamps (the journal adds its own) and with syslog priority prefixes
//! (`<3>` for errors), which the journal turns into priorities.

use std::os::fd::AsRawFd;

pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on our own stderr into a zero-initialised struct.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(std::io::stderr().as_raw_fd(), &mut st) != 0 {
            return false;
        }
        st
    };
    st.st_dev == dev && st.st_ino == ino
}

/// The syslog priority of a log level (sd-daemon(3)'s `<N>` prefixes).
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

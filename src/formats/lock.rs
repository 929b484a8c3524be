//! Image locking that QEMU's `file` driver understands.
//!
//! QEMU expresses who may do what to an image as permission bits and takes
//! one shared OFD lock per bit: on byte 100 + bit for each permission it
//! holds, and on byte 200 + bit for each permission it refuses to share
//! with others. Before using an image, an opener checks that nobody holds a
//! lock on 200 + bit for a permission it wants, nor on 100 + bit for a
//! permission it does not share. All locks are read locks, so holders never
//! conflict on taking them; the check is an F_OFD_GETLK probe for a write
//! lock, which sees other open file descriptions' read locks but not ours.
//! Using the same bytes and bits lets ringblk, QEMU, qemu-img, qemu-io and
//! qemu-storage-daemon see one another. The locks belong to the open file
//! description, so they go away when the file is closed or the process exits.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::OpenError;

/// QEMU's block permissions (`BLK_PERM_*`), as a set of bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Perms(u8);

impl Perms {
    pub(crate) const CONSISTENT_READ: Perms = Perms(1 << 0);
    pub(crate) const WRITE: Perms = Perms(1 << 1);
    pub(crate) const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    pub(crate) const RESIZE: Perms = Perms(1 << 3);
    pub(crate) const ALL: Perms = Perms(0x0f);

    pub(crate) const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    fn has_bit(self, bit: usize) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// QEMU's names for the permission bits, as its lock errors print them.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// Lock byte of "this process holds permission bit i".
const PERM_BASE: i64 = 100;
/// Lock byte of "this process does not share permission bit i".
const SHARED_BASE: i64 = 200;

/// What an opener of an image holds and what it lets others hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ImageLock {
    pub perm: Perms,
    pub shared: Perms,
    /// How long taking the lock waits for conflicting holders to go away
    /// (zero: fail at once). A daemon starting right after its predecessor
    /// was killed waits: the kernel keeps the dead process's image open,
    /// and so its locks, until the I/O it had submitted has finished.
    pub wait: Duration,
}

impl ImageLock {
    /// The locks ringblk takes on an image file. A writable image is read,
    /// written and resized by us alone, so others may only read it (a guest
    /// device in QEMU, and qcow2 metadata, share the same way); a read-only
    /// image (an export or a backing file) must not change under us. With
    /// `force_share` (read-only use only, as qemu-img's `-U`), we share
    /// everything and only announce that we read.
    pub(crate) fn for_open(read_only: bool, force_share: bool) -> ImageLock {
        let perm = if read_only {
            Perms::CONSISTENT_READ
        } else {
            Perms::CONSISTENT_READ
                .union(Perms::WRITE)
                .union(Perms::RESIZE)
        };
        let shared = if force_share {
            Perms::ALL
        } else {
            Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED)
        };
        ImageLock {
            perm,
            shared,
            wait: Duration::ZERO,
        }
    }

    /// The same locks, waiting up to `wait` for conflicting holders.
    pub(crate) fn waiting(self, wait: Duration) -> ImageLock {
        ImageLock { wait, ..self }
    }

    /// Take the locks on `file`, then check that nobody else's locks
    /// conflict, for up to `self.wait` while they do. On error the caller
    /// drops the file, which releases ours.
    pub(crate) fn apply(self, file: &File, path: &Path) -> Result<(), OpenError> {
        // Polled: nothing tells us when another process's OFD lock goes
        // (F_OFD_SETLKW would wait for it, but without a bound).
        const POLL: Duration = Duration::from_millis(10);
        let start = Instant::now();
        loop {
            match self.try_apply(file, path) {
                Err(OpenError::Locked { .. }) if start.elapsed() < self.wait => {
                    if start.elapsed() < POLL {
                        log::info!(
                            "{}: image is locked by another process; waiting up to {:?} for it to let go",
                            path.display(),
                            self.wait
                        );
                    }
                    // The last sleep ends at the bound, and one more try
                    // follows: the whole wait is given, not a poll less.
                    std::thread::sleep(POLL.min(self.wait.saturating_sub(start.elapsed())));
                }
                r => {
                    if r.is_ok() && start.elapsed() >= POLL {
                        log::info!(
                            "{}: lock taken after waiting {} ms",
                            path.display(),
                            start.elapsed().as_millis()
                        );
                    }
                    return r;
                }
            }
        }
    }

    fn try_apply(self, file: &File, path: &Path) -> Result<(), OpenError> {
        let err = |source: io::Error| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        for byte in self.bytes() {
            set_read_lock(file, byte).map_err(err)?;
        }
        let conflict = |reason: String| OpenError::Locked {
            path: path.to_path_buf(),
            reason,
        };
        for (bit, name) in PERM_NAMES.iter().enumerate() {
            if self.perm.has_bit(bit)
                && locked_by_other(file, SHARED_BASE + bit as i64).map_err(err)?
            {
                return Err(conflict(format!(
                    "failed to get \"{name}\" lock: another process has it open and does not share \"{name}\""
                )));
            }
        }
        for (bit, name) in PERM_NAMES.iter().enumerate() {
            if !self.shared.has_bit(bit)
                && locked_by_other(file, PERM_BASE + bit as i64).map_err(err)?
            {
                return Err(conflict(format!(
                    "failed to get shared \"{name}\" lock: another process has it open with \"{name}\" permission"
                )));
            }
        }
        Ok(())
    }
}

impl ImageLock {
    /// The lock bytes this holder keeps.
    fn bytes(self) -> impl Iterator<Item = i64> {
        (0..PERM_NAMES.len()).flat_map(move |bit| {
            let held = self.perm.has_bit(bit).then_some(PERM_BASE + bit as i64);
            let unshared = (!self.shared.has_bit(bit)).then_some(SHARED_BASE + bit as i64);
            held.into_iter().chain(unshared)
        })
    }

    /// Change the locks held on `file` from `self` to `new` (a reopen):
    /// take and check the new ones first, then let go of the bytes only
    /// the old ones used. On a conflict the old locks are left as they were.
    pub(crate) fn change_to(
        self,
        new: ImageLock,
        file: &File,
        path: &Path,
    ) -> Result<(), OpenError> {
        if let Err(e) = new.apply(file, path) {
            for b in new.bytes().filter(|b| !self.bytes().any(|o| o == *b)) {
                let _ = unlock(file, b);
            }
            return Err(e);
        }
        for b in self.bytes().filter(|b| !new.bytes().any(|n| n == *b)) {
            unlock(file, b).map_err(|source| OpenError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// Let go of every lock byte on `file` (before the same process takes
    /// them on another open file description of the image, which would
    /// otherwise see these as someone else's).
    pub(crate) fn release(self, file: &File) {
        for b in self.bytes() {
            let _ = unlock(file, b);
        }
    }
}

fn unlock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(libc::F_UNLCK, byte);
    // SAFETY: fcntl with a valid fd and a pointer to an initialised flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn flock_at(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value, and the
    // fields that matter are set below (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_read_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_at(libc::F_RDLCK, byte);
    // SAFETY: fcntl with a valid fd and a pointer to an initialised flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot lock byte {byte} (OFD locks): {e}"),
        ));
    }
    Ok(())
}

/// True if another open file description holds a lock on `byte`.
fn locked_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(libc::F_WRLCK, byte);
    // SAFETY: fcntl with a valid fd and a pointer to an initialised flock,
    // which F_OFD_GETLK overwrites with the first conflicting lock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ringblk-lock-{name}-{}", std::process::id()));
        File::create(&p).unwrap().set_len(4096).unwrap();
        p
    }

    fn open(p: &Path, write: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_that_need_consistency() {
        let p = scratch("writers");
        let a = open(&p, true);
        ImageLock::for_open(false, false).apply(&a, &p).unwrap();

        let b = open(&p, true);
        let e = ImageLock::for_open(false, false).apply(&b, &p).unwrap_err();
        assert!(e.to_string().contains("\"write\""), "{e}");
        assert!(e.to_string().contains(p.to_str().unwrap()), "{e}");

        let c = open(&p, false);
        let e = ImageLock::for_open(true, false).apply(&c, &p).unwrap_err();
        assert!(
            e.to_string().contains("shared \"write\" lock"),
            "a reader that does not share write sees the writer: {e}"
        );
        // Force-share reads anyway.
        let d = open(&p, false);
        ImageLock::for_open(true, true).apply(&d, &p).unwrap();

        // Closing the writer releases its locks.
        drop(a);
        drop(b);
        drop(c);
        let e = open(&p, true);
        ImageLock::for_open(false, false).apply(&e, &p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_waiting_lock_is_taken_once_the_holder_lets_go_and_not_later_than_its_bound() {
        let p = scratch("wait");
        let holder = open(&p, true);
        ImageLock::for_open(false, false)
            .apply(&holder, &p)
            .unwrap();
        // Bounded: still held after the wait, the error of today.
        let b = open(&p, true);
        let start = Instant::now();
        let e = ImageLock::for_open(false, false)
            .waiting(Duration::from_millis(100))
            .apply(&b, &p)
            .unwrap_err();
        assert!(matches!(e, OpenError::Locked { .. }), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(90));
        assert!(start.elapsed() < Duration::from_secs(2));
        // The holder goes while another thread waits: the wait ends with
        // the lock, well before its bound.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || {
                let c = open(&p, true);
                tx.send(()).unwrap();
                let start = Instant::now();
                let r = ImageLock::for_open(false, false)
                    .waiting(Duration::from_secs(20))
                    .apply(&c, &p);
                (r, start.elapsed(), c)
            })
        };
        rx.recv().unwrap();
        drop(holder);
        drop(b);
        let (r, waited, _c) = waiter.join().unwrap();
        r.unwrap();
        assert!(waited < Duration::from_secs(10), "waited {waited:?}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn readers_share_with_readers() {
        let p = scratch("readers");
        let a = open(&p, false);
        ImageLock::for_open(true, false).apply(&a, &p).unwrap();
        let b = open(&p, false);
        ImageLock::for_open(true, false).apply(&b, &p).unwrap();
        // ... but a writer is refused while they read.
        let c = open(&p, true);
        let e = ImageLock::for_open(false, false).apply(&c, &p).unwrap_err();
        assert!(
            e.to_string().contains("failed to get \"write\" lock"),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_reopen_changes_locks_without_a_gap_and_keeps_them_on_a_conflict() {
        let p = scratch("change");
        let a = open(&p, true);
        let rw = ImageLock::for_open(false, false);
        let ro = ImageLock::for_open(true, false);
        rw.apply(&a, &p).unwrap();
        let reader = open(&p, false);
        assert!(ro.apply(&reader, &p).is_err(), "a writer keeps readers out");
        rw.change_to(ro, &a, &p).unwrap();
        ro.apply(&reader, &p).unwrap();
        // Writing again while a reader that does not share write holds the
        // file: refused, and our locks stay the read-only ones.
        let e = ro.change_to(rw, &a, &p).unwrap_err();
        assert!(e.to_string().contains("\"write\""), "{e}");
        let other = open(&p, false);
        ro.apply(&other, &p).unwrap();
        drop(reader);
        drop(other);
        ro.change_to(rw, &a, &p).unwrap();
        let late = open(&p, false);
        assert!(ro.apply(&late, &p).is_err(), "writing again");
        std::fs::remove_file(&p).unwrap();
    }
}

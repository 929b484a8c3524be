//! Surviving a file that shrinks under a shared mapping of it.
//!
//! Guest memory is the frontend's file (a memfd, usually) mapped shared,
//! and on tmpfs an image's tables are written through a shared mapping
//! (`formats/mapped.rs`). If another process truncates such a file, our
//! next CPU access to a page past the new end raises SIGBUS, which would
//! kill the daemon and every export with it. Refusing unsealed memfds
//! would refuse libblkio, whose memory is not sealed; so instead every such
//! mapping is registered here, and a SIGBUS inside one of them is
//! absorbed: the handler maps a private zero page over the faulting page
//! (the access completes, reading zeros or writing into nothing), marks the
//! mapping poisoned and signals its owner's eventfd, if it gave one; the
//! owner then gives up on that file (a session hangs up on its frontend, an
//! image fails the write). A SIGBUS anywhere else is a real bug and still
//! kills the process.
//!
//! The registry is a fixed array of slots read by the handler without
//! locks: each slot is a small seqlock (an even sequence number means
//! stable), so the handler never sees a half-written slot.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Mappings alive at once: guest memory over all sessions (509 slots
/// each) and one per writable image on tmpfs.
const SLOTS: usize = 4096;

struct Slot {
    /// Odd while the slot is being written.
    seq: AtomicU32,
    /// Zero when free.
    start: AtomicUsize,
    len: AtomicUsize,
    /// The mapping's page size (a huge page on hugetlbfs).
    page: AtomicUsize,
    /// An eventfd the handler signals, or -1.
    notify_fd: AtomicI32,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    seq: AtomicU32::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    notify_fd: AtomicI32::new(-1),
    poisoned: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
/// Serialises writers (registration is rare); the handler never takes it.
static WRITERS: Mutex<()> = Mutex::new(());
/// Mappings ever poisoned: lets the data path skip its check with one
/// relaxed load while nothing happened.
static POISON_EVENTS: AtomicU32 = AtomicU32::new(0);
static INSTALL: Once = Once::new();

/// A registered mapping; dropping it unregisters (before the caller
/// unmaps).
pub(crate) struct Registration {
    slot: usize,
}

/// Whether any mapping was ever poisoned: one relaxed load, for the data
/// path to skip the per-mapping check.
pub(crate) fn any_poisoned() -> bool {
    POISON_EVENTS.load(Ordering::Relaxed) != 0
}

impl Registration {
    /// Whether a SIGBUS hit this mapping.
    pub(crate) fn poisoned(&self) -> bool {
        REGISTRY[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _w = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
        let s = &REGISTRY[self.slot];
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.start.store(0, Ordering::Release);
        s.notify_fd.store(-1, Ordering::Release);
        s.seq.fetch_add(1, Ordering::AcqRel);
    }
}

/// Register `[start, start + len)`, a shared mapping with pages of `page`
/// bytes; a SIGBUS inside it signals `notify_fd` (an eventfd that must
/// stay open as long as the registration; -1 for none).
pub(crate) fn register(
    start: usize,
    len: usize,
    page: usize,
    notify_fd: i32,
) -> io::Result<Registration> {
    INSTALL.call_once(install_handler);
    let _w = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = REGISTRY
        .iter()
        .position(|s| s.start.load(Ordering::Acquire) == 0)
        .ok_or_else(|| io::Error::other(format!("more than {SLOTS} shared file mappings")))?;
    let s = &REGISTRY[slot];
    s.seq.fetch_add(1, Ordering::AcqRel);
    s.len.store(len, Ordering::Release);
    s.page.store(page, Ordering::Release);
    s.notify_fd.store(notify_fd, Ordering::Release);
    s.poisoned.store(false, Ordering::Release);
    s.start.store(start, Ordering::Release);
    s.seq.fetch_add(1, Ordering::AcqRel);
    Ok(Registration { slot })
}

/// Replaces whatever SIGBUS handler was there: the Rust runtime's, which
/// only reports stack overflows (those raise SIGSEGV on Linux) and
/// otherwise restores the default action, as `fall_back_to_default` does.
fn install_handler() {
    // SAFETY: a zeroed sigaction is a valid starting point; we set the
    // handler, SA_SIGINFO (it takes three arguments) and an empty mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            log::error!(
                "cannot install the SIGBUS handler: {}; a frontend that shrinks its memory \
                 will crash the daemon",
                io::Error::last_os_error()
            );
        }
    }
}

/// The slot whose mapping holds `addr`, read consistently.
fn find(addr: usize) -> Option<&'static Slot> {
    REGISTRY.iter().find(|s| loop {
        let seq = s.seq.load(Ordering::Acquire);
        if seq & 1 == 1 {
            // A writer in another thread is mid-update (this thread
            // faulted on guest memory, which registry writers never
            // touch), and finishes without waiting for anything: spin.
            std::hint::spin_loop();
            continue;
        }
        let (start, len) = (
            s.start.load(Ordering::Acquire),
            s.len.load(Ordering::Acquire),
        );
        if s.seq.load(Ordering::Acquire) != seq {
            continue;
        }
        break start != 0 && addr >= start && addr - start < len;
    })
}

/// Not a fault we absorb: restore the default action. On return the
/// faulting instruction runs again and the default action (terminate with
/// a core) takes the process, as if we had never been installed.
fn fall_back_to_default() {
    // SAFETY: sigaction is async-signal-safe; a zeroed sigaction with
    // SIG_DFL and an empty mask is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// SIGBUS. Only async-signal-safe work: atomics, mmap, write, sigaction;
/// errno is saved and restored around them.
extern "C" fn on_sigbus(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; its location is valid for this thread.
    let saved_errno = unsafe { *libc::__errno_location() };
    absorb(info);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

fn absorb(info: *mut libc::siginfo_t) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // BUS_ADRERR is "beyond the end of the file"; anything else (hardware
    // errors, alignment) is not ours to hide.
    let slot = (code == libc::BUS_ADRERR).then(|| find(addr)).flatten();
    let Some(slot) = slot else {
        fall_back_to_default();
        return;
    };
    let page = slot.page.load(Ordering::Acquire).max(1);
    let base = addr & !(page - 1);
    // SAFETY: `base..base + page` lies inside a live guest mapping: the
    // faulting thread was accessing it, and mappings are unregistered
    // before they are unmapped and only once no one holds them, so it is
    // still mapped (and its slot still describes it) while we run. It is
    // a shared file mapping holding only guest data that we access
    // volatilely, so replacing one page with a private anonymous zero page
    // breaks no Rust invariant; MAP_FIXED over our own mapping cannot hit
    // anything else. mmap is a plain system call (no locks in libc).
    let r = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        // Out of mappings (vm.max_map_count), say: we cannot absorb it.
        fall_back_to_default();
        return;
    }
    slot.poisoned.store(true, Ordering::Release);
    POISON_EVENTS.fetch_add(1, Ordering::Release);
    let fd = slot.notify_fd.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the fd is the session's
        // non-blocking eventfd, open for as long as the registration (see
        // `register`), which outlives this fault as argued above. A full
        // counter (EAGAIN) is already signalled.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_poisoned() {
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"ringblk-fault-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: eventfd; checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(efd >= 0);
        let len = 4 * 4096;
        // SAFETY: sizing and mapping our own memfd.
        let p = unsafe {
            assert_eq!(libc::ftruncate(fd, len as i64), 0);
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        } as *mut u8;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        let reg = register(p as usize, len, 4096, efd).unwrap();
        // SAFETY: inside the mapping; the file still backs it.
        unsafe { std::ptr::write_volatile(p.add(3 * 4096), 7) };
        assert!(!reg.poisoned());
        // SAFETY: shrinking our own memfd to one page.
        assert_eq!(unsafe { libc::ftruncate(fd, 4096) }, 0);
        // SAFETY: inside the mapping; past the file's end, so SIGBUS,
        // which the handler absorbs.
        let v = unsafe { std::ptr::read_volatile(p.add(3 * 4096)) };
        assert_eq!(v, 0);
        assert!(reg.poisoned());
        let mut n = 0u64;
        // SAFETY: 8-byte read into a u64 from our eventfd.
        let r = unsafe { libc::read(efd, &mut n as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!((r, n), (8, 1), "the session's eventfd was signalled");
        drop(reg);
        // SAFETY: unmapping and closing what we created.
        unsafe {
            libc::munmap(p as *mut libc::c_void, len);
            libc::close(fd);
            libc::close(efd);
        }
    }

    #[test]
    fn a_sigbus_outside_guest_memory_still_kills() {
        // Install the handler, as a daemon with guest memory has.
        drop(register(0x1000, 0x1000, 4096, -1).unwrap());
        // SAFETY: the child only makes system calls and touches its own
        // mapping before _exit or dying; no locks, no allocation.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above, all in the child.
            unsafe {
                let fd = libc::memfd_create(c"ringblk-fault-child".as_ptr(), 0);
                libc::ftruncate(fd, 4096);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                ) as *const u8;
                libc::ftruncate(fd, 0);
                std::ptr::read_volatile(p);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "child status {status:#x}"
        );
    }
}

//! An asymmetric fence for the Dekker pattern between requests and drain.
//!
//! A request stores its in-flight count and then loads the drain's flag; a
//! drain stores its flag and then loads the counts. Each side needs a full
//! fence between its store and its load, or both may miss the other. The
//! request side runs millions of times a second, the drain side rarely, so
//! the drain pays for both: `heavy()` is membarrier(2) with
//! MEMBARRIER_CMD_PRIVATE_EXPEDITED, which makes every thread of the
//! process run a full memory barrier before it returns, and `light()` is
//! then only a compiler fence. Where membarrier is missing (old kernels,
//! seccomp filters), both are full fences.
//!
//! Why this holds: if the barrier that `heavy()` forces on a requesting
//! thread falls after that thread's store, the drain's later loads see the
//! store; if it falls before, the thread's later load sees the drain's
//! earlier store. Either way one side sees the other. Two light sides
//! order nothing between themselves (see `InFlight::drop`).
//!
//! No unit test here: a store-buffer litmus test on these VMs showed no
//! reordering in 20,000 rounds even with compiler fences alone, so it
//! could not fail. The drain tests (`graph/drain_tests.rs`, the QMP drain
//! tests under load) exercise the pairing end to end.

use std::sync::atomic::{compiler_fence, fence, Ordering};
use std::sync::OnceLock;

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Whether the process registered for private expedited membarriers.
static EXPEDITED: OnceLock<bool> = OnceLock::new();

fn membarrier(cmd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn expedited() -> bool {
    *EXPEDITED.get_or_init(
        || match membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) {
            Ok(()) => true,
            Err(e) => {
                log::info!("membarrier unavailable ({e}): requests use full fences");
                false
            }
        },
    )
}

/// Decide the fences' kind now (iothreads call this at start, so the
/// registration system call never lands on a request).
pub(crate) fn init() {
    expedited();
}

/// The frequent side's fence: orders this thread's earlier stores before
/// its later loads, provided the other side uses [`heavy`].
#[inline]
pub(crate) fn light() {
    if expedited() {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The rare side's fence: after it returns, every thread's stores from
/// before its last [`light`] are visible here, and every thread's loads
/// after its next [`light`] see this thread's earlier stores.
pub(crate) fn heavy() {
    if !expedited() {
        fence(Ordering::SeqCst);
        return;
    }
    if let Err(e) = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        // Registered, so the kernel cannot refuse; if it did anyway,
        // requests' light fences order nothing and drain could miss one.
        panic!("membarrier failed after registration: {e}");
    }
}

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
//! earlier store. Either way one side sees the other.

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
pub fn init() {
    expedited();
}

/// The frequent side's fence: orders this thread's earlier stores before
/// its later loads, provided the other side uses [`heavy`].
#[inline]
pub fn light() {
    if expedited() {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The rare side's fence: after it returns, every thread's stores from
/// before its last [`light`] are visible here, and every thread's loads
/// after its next [`light`] see this thread's earlier stores.
pub fn heavy() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32};
    use std::sync::Arc;

    /// The Dekker pattern itself: two threads each store their flag,
    /// fence, and load the other's; at least one must see the other's.
    #[test]
    fn one_side_always_sees_the_other() {
        const ROUNDS: u32 = 20_000;
        let flags = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let round = Arc::new(AtomicU32::new(0));
        let done = Arc::new(AtomicU32::new(0));
        let light_side = {
            let (flags, round, done) = (flags.clone(), round.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen_heavy = Vec::with_capacity(ROUNDS as usize);
                for r in 1..=ROUNDS {
                    while round.load(Ordering::Acquire) != r {
                        std::hint::spin_loop();
                    }
                    flags[0].store(true, Ordering::Relaxed);
                    light();
                    seen_heavy.push(flags[1].load(Ordering::Relaxed));
                    done.fetch_add(1, Ordering::AcqRel);
                }
                seen_heavy
            })
        };
        let mut seen_light = Vec::with_capacity(ROUNDS as usize);
        for r in 1..=ROUNDS {
            flags[0].store(false, Ordering::Relaxed);
            flags[1].store(false, Ordering::Relaxed);
            round.store(r, Ordering::Release);
            flags[1].store(true, Ordering::Relaxed);
            heavy();
            seen_light.push(flags[0].load(Ordering::Relaxed));
            while done.load(Ordering::Acquire) != r {
                std::hint::spin_loop();
            }
        }
        let seen_heavy = light_side.join().unwrap();
        let missed = (0..ROUNDS as usize)
            .filter(|&i| !seen_light[i] && !seen_heavy[i])
            .count();
        assert_eq!(missed, 0, "rounds where neither side saw the other");
    }
}

//! The AioContext: one io_uring ring plus a small single-threaded executor per
//! iothread. Everything an iothread waits for (kicks, file I/O, messages from
//! other threads) arrives as a completion on its ring; the ring is the only
//! place the thread sleeps.

mod eventfd;
mod executor;
pub(crate) mod fence;
mod iothread;
mod iovec;
mod lock;
pub(crate) mod ops;
mod poll;
mod reactor;
mod slot;
mod task;

pub use eventfd::signal_eventfd;
pub use executor::{
    add_poller, block_on, now, on_iothread, on_turn_end, remove_poller, spawn, spawn_with,
    yield_now, LoopTimes,
};
pub use iothread::{find_iothreads, IoThread, IoThreadHandle};
pub use iovec::{AlignedBuf, IoVec, KeepAlive, IOV_MAX};
pub use lock::AsyncMutex;
pub use poll::{DriverPollDetector, Poller, PollingDriver};
pub use slot::{thread_slot, THREAD_SLOTS};

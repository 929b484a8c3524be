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

pub(crate) use eventfd::signal_eventfd;
pub use executor::block_on;
pub(crate) use executor::{
    add_poller, now, on_iothread, on_turn_end, remove_poller, spawn, spawn_with, yield_now,
};
pub(crate) use iothread::{find_iothreads, IoThread, IoThreadHandle};
pub(crate) use iovec::IOV_MAX;
pub use iovec::{AlignedBuf, IoVec};
pub(crate) use lock::AsyncMutex;
pub(crate) use poll::{DriverPollDetector, Poller, PollingDriver};
pub(crate) use slot::{thread_slot, THREAD_SLOTS};

//! A value the vhost thread replaces now and then (the guest's memory
//! table, a queue's call eventfd) and a queue's iothread reads on every
//! request or notification: the iothread keeps its own copy and takes the
//! lock only when the shared generation says the value was replaced.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The shared side: the current value and a generation that every
/// `publish` moves on (under the lock, so `load` reads the two together).
#[derive(Default)]
pub(crate) struct Published<T> {
    current: Mutex<T>,
    generation: AtomicU64,
}

impl<T: Clone> Published<T> {
    pub(crate) fn new(value: T) -> Self {
        Published {
            current: Mutex::new(value),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn publish(&self, value: T) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = value;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// One atomic load, no locked instruction.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The value and its generation, read together under the lock.
    pub(crate) fn load(&self) -> (u64, T) {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        (self.generation.load(Ordering::Acquire), current.clone())
    }
}

/// One thread's copy of a [`Published`] value, with the generation it was
/// read at, behind an `Rc` of that thread's own: handing it out is a plain
/// add, where cloning the shared `Arc` would be a locked one.
pub(crate) struct LocalCopy<T> {
    copy: RefCell<(u64, Rc<T>)>,
}

impl<T: Clone> LocalCopy<T> {
    /// A copy of what [`Published::load`] returned.
    pub(crate) fn new((generation, value): (u64, T)) -> Self {
        LocalCopy {
            copy: RefCell::new((generation, Rc::new(value))),
        }
    }

    /// The value as `from` has it now, reloaded only if its generation
    /// moved since this copy was made.
    pub(crate) fn get(&self, from: &Published<T>) -> Rc<T> {
        let generation = from.generation();
        let mut copy = self.copy.borrow_mut();
        if copy.0 != generation {
            let (generation, value) = from.load();
            *copy = (generation, Rc::new(value));
        }
        copy.1.clone()
    }

    /// The generation of the value [`LocalCopy::get`] last returned.
    pub(crate) fn generation(&self) -> u64 {
        self.copy.borrow().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_follows_each_publish_and_keeps_the_value_it_handed_out() {
        let shared = Published::new(1u32);
        let copy = LocalCopy::new(shared.load());
        let first = copy.get(&shared);
        assert_eq!((*first, copy.generation()), (1, 0));
        shared.publish(2);
        assert_eq!(*copy.get(&shared), 2);
        assert_eq!(copy.generation(), 1);
        assert_eq!(*first, 1, "a value handed out stays as it was");
    }
}

//! I/O throttling as qemu-storage-daemon offers it: `throttle-group`
//! objects holding the limits (`limits.rs`, QEMU's ThrottleLimits and its
//! validation), kept as leaky buckets (`bucket.rs`), shared by the
//! `throttle` filter nodes that name them (`filter.rs`), which take turns
//! in their group (`group.rs`). A drained section parks queued requests
//! instead of releasing them past the limit.

mod bucket;
mod filter;
mod group;
mod limits;

use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) use filter::ThrottleDriver;
pub(crate) use group::ThrottleGroup;
pub(crate) use limits::Limits;

use crate::error::Error;

/// The throttle groups of a graph, by id (QEMU keeps them under
/// `/objects`).
#[derive(Default)]
pub struct ThrottleGroups(Mutex<Vec<Arc<ThrottleGroup>>>);

impl ThrottleGroups {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<ThrottleGroup>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `object-add qom-type=throttle-group`: `limits` are valid already.
    pub fn add(&self, id: &str, limits: Limits) -> Result<(), Error> {
        let mut all = self.lock();
        if all.iter().any(|g| g.name() == id) {
            return Err(Error::invalid(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        all.push(ThrottleGroup::new(id, limits));
        Ok(())
    }

    pub(crate) fn find(&self, id: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().iter().find(|g| g.name() == id).cloned()
    }

    /// Whether a group is called `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    /// `object-del`: refused while a filter node uses the group.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        let mut all = self.lock();
        let i = all
            .iter()
            .position(|g| g.name() == id)
            .ok_or_else(|| Error::not_found(format!("object '{id}' not found")))?;
        if all[i].member_count() > 0 {
            return Err(Error::busy(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        all.remove(i);
        Ok(())
    }

    /// The limits of group `id` (`qom-get ID limits`).
    pub fn limits(&self, id: &str) -> Option<Limits> {
        self.find(id).map(|g| g.limits())
    }

    /// `qom-set ID limits {...}`: the members given change, the others
    /// keep their values; the result must be valid as a whole.
    pub fn update_limits(
        &self,
        id: &str,
        update: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), Error> {
        let g = self
            .find(id)
            .ok_or_else(|| Error::not_found(format!("Device '{id}' not found")))?;
        let limits = g.limits().updated(update)?;
        g.set_limits(limits);
        Ok(())
    }

    /// Shutdown: every group lets its queued requests go without limits.
    pub fn release_all(&self) {
        for g in self.lock().iter() {
            g.release();
        }
    }

    /// The ids of every group.
    pub fn ids(&self) -> Vec<String> {
        self.lock().iter().map(|g| g.name().to_string()).collect()
    }
}

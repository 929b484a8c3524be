//! A split virtqueue's avail and used rings as the per-request path touches
//! them: through host addresses found once per guest-memory generation.
//! vm-memory's accessors look the region up on every access, which was ~10%
//! of a polling-client profile (three lookups per request, plus building a
//! descriptor chain object per pop that we never used). virtio-queue's
//! `Queue` still holds the queue's configuration and indices and serves
//! setup; this only reads and writes ring fields.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};

use crate::vhost::memory::GuestRam;
use crate::vhost::vring::ring_sizes;

/// Where one queue's avail and used rings are mapped, in the memory
/// generation `gen`. Field offsets follow the virtio 1.x split ring:
/// avail = flags, idx, ring[size] (u16 each), used_event;
/// used = flags, idx, ring[size] of {id: u32, len: u32}, avail_event.
#[derive(Clone, Copy)]
pub(super) struct RingView {
    gen: u64,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
}

impl RingView {
    /// The rings of a queue of `size` entries at guest addresses
    /// `avail_gpa` and `used_gpa`; None unless each lies inside one region
    /// of `mem`, aligned as the spec requires (2 and 4 bytes: virtio-queue
    /// refused other addresses when they were set, checked again here as
    /// every access below relies on it).
    ///
    /// # Safety
    /// The view points into `mem`'s mappings: the caller must keep `mem`
    /// alive as long as it uses the view (the queue keeps the memory of
    /// generation `gen` while its view says `gen`).
    pub(super) unsafe fn new(
        mem: &GuestRam,
        gen: u64,
        avail_gpa: u64,
        used_gpa: u64,
        size: u16,
        event_idx: bool,
    ) -> Option<Self> {
        if size == 0 || !avail_gpa.is_multiple_of(2) || !used_gpa.is_multiple_of(4) {
            return None;
        }
        let sizes = ring_sizes(size, event_idx);
        let avail = mem.host_range(avail_gpa, sizes.avail)?;
        let used = mem.host_range(used_gpa, sizes.used)?;
        // Mappings are page-aligned, so host addresses keep the guest
        // addresses' alignment; checked all the same, cheaply, once.
        if !(avail as usize).is_multiple_of(2) || !(used as usize).is_multiple_of(4) {
            return None;
        }
        Some(RingView {
            gen,
            avail,
            used,
            size,
        })
    }

    /// The memory generation the view was made in.
    pub(super) fn generation(&self) -> u64 {
        self.gen
    }

    /// The u16 field at byte `off` of the ring at `base` (one of ours).
    fn u16_at(&self, base: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: `base` is one of this view's rings and every caller
        // passes an offset inside it (`new` checked the ring's whole
        // length, with used_event/avail_event only when EVENT_IDX made them
        // part of it, and the callers only use those then), 2-aligned since
        // the base is; the mapping outlives the view (`new`'s contract), and
        // the driver writes these fields concurrently, hence atomics.
        unsafe { &*(base.add(off) as *const AtomicU16) }
    }

    /// The u32 at byte `off` of the used ring.
    fn used_u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: as `u16_at`; used-ring elements are 4-aligned (base
        // 4-aligned, 4 + 8·i offsets).
        unsafe { &*(self.used.add(off) as *const AtomicU32) }
    }

    /// The driver's avail index. Acquire: the ring entries it published
    /// before the index are visible after this load.
    pub(super) fn avail_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 2).load(Ordering::Acquire))
    }

    /// The head the driver put at avail position `pos` (modulo the size).
    pub(super) fn avail_head(&self, pos: u16) -> u16 {
        let off = 4 + 2 * (pos % self.size) as usize;
        u16::from_le(self.u16_at(self.avail, off).load(Ordering::Relaxed))
    }

    fn avail_flags(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 0).load(Ordering::Relaxed))
    }

    /// Turn the driver's kicks on or off: with EVENT_IDX, kicks resume
    /// once the driver passes `next_avail` (off needs no write: a driver
    /// kicks only when it crosses avail_event, which stays behind); without,
    /// the used ring's NO_NOTIFY flag. Returns, when turning them on,
    /// whether chains arrived meanwhile (the driver may have looked at the
    /// flag before our write: those come without a kick).
    pub(super) fn set_kicks(&self, on: bool, event_idx: bool, next_avail: u16) -> bool {
        match (on, event_idx) {
            (true, true) => self
                .u16_at(self.used, 4 + 8 * self.size as usize)
                .store(next_avail.to_le(), Ordering::Relaxed),
            (true, false) => self.u16_at(self.used, 0).store(0, Ordering::Relaxed),
            (false, true) => return false,
            (false, false) => self
                .u16_at(self.used, 0)
                .store((VRING_USED_F_NO_NOTIFY as u16).to_le(), Ordering::Relaxed),
        }
        if !on {
            return false;
        }
        // Our write before the driver's index is read again.
        fence(Ordering::SeqCst);
        self.avail_idx() != next_avail
    }

    /// Write used entry number `slot` (modulo the size) and publish the
    /// used index `slot + 1`. Release: the entry, and the data and status
    /// the request wrote before, are visible to a driver that sees the index.
    pub(super) fn put_used(&self, slot: u16, head: u16, len: u32) {
        let off = 4 + 8 * (slot % self.size) as usize;
        self.used_u32_at(off)
            .store(u32::from(head).to_le(), Ordering::Relaxed);
        self.used_u32_at(off + 4)
            .store(len.to_le(), Ordering::Relaxed);
        self.u16_at(self.used, 2)
            .store(slot.wrapping_add(1).to_le(), Ordering::Release);
    }

    /// Whether the driver wants a notification now that the used index
    /// went from `old` to `new`: with EVENT_IDX, if used_event lies in
    /// `[old, new)` (the spec's rule, in the inequality form drivers rely
    /// on for batched additions); without, unless it set NO_INTERRUPT.
    pub(super) fn wants_notification(&self, event_idx: bool, old: u16, new: u16) -> bool {
        // Our used entries before the driver's fields are read.
        fence(Ordering::SeqCst);
        if !event_idx {
            return self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0;
        }
        let off = 4 + 2 * self.size as usize;
        let used_event = u16::from_le(self.u16_at(self.avail, off).load(Ordering::Relaxed));
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn ram() -> GuestRam {
        GuestRam::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap())
    }

    fn write_u16(mem: &GuestRam, gpa: u64, v: u16) {
        let p = mem.host_range(gpa, 2).unwrap();
        // SAFETY: 2 bytes of the test's own mapping.
        unsafe { std::ptr::write_volatile(p as *mut u16, v.to_le()) };
    }

    fn read_u16(mem: &GuestRam, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        assert!(mem.read(gpa, &mut b));
        u16::from_le_bytes(b)
    }

    fn read_u32(mem: &GuestRam, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(mem.read(gpa, &mut b));
        u32::from_le_bytes(b)
    }

    fn view(mem: &GuestRam, size: u16, event_idx: bool) -> RingView {
        // SAFETY: `mem` outlives the view in every test.
        unsafe { RingView::new(mem, 1, AVAIL, USED, size, event_idx) }.unwrap()
    }

    #[test]
    fn rings_outside_memory_or_misaligned_have_no_view() {
        let mem = ram();
        // SAFETY: no view is made.
        let none = |a, u, size| unsafe { RingView::new(&mem, 1, a, u, size, true) }.is_none();
        assert!(none(0x3ff0, USED, 16), "avail ring runs past the end");
        assert!(none(AVAIL, 0x3f00, 64), "used ring runs past the end");
        assert!(none(AVAIL + 1, USED, 16), "odd avail address");
        assert!(none(AVAIL, USED + 2, 16), "used ring not 4-aligned");
        assert!(none(AVAIL, USED, 0), "size 0");
    }

    #[test]
    fn reads_heads_at_the_driver_positions_modulo_the_size() {
        let mem = ram();
        let v = view(&mem, 4, false);
        for (i, head) in [7u16, 8, 9, 10].iter().enumerate() {
            write_u16(&mem, AVAIL + 4 + 2 * i as u64, *head);
        }
        write_u16(&mem, AVAIL + 2, 65535);
        assert_eq!(v.avail_idx(), 65535);
        assert_eq!(v.avail_head(0), 7);
        assert_eq!(v.avail_head(5), 8, "position 5 of a 4-entry ring is slot 1");
        assert_eq!(v.avail_head(65535), 10);
    }

    #[test]
    fn a_used_entry_is_written_before_its_index_and_wraps() {
        let mem = ram();
        let v = view(&mem, 4, true);
        v.put_used(65535, 3, 4097);
        assert_eq!(read_u32(&mem, USED + 4 + 8 * 3), 3, "slot 65535 % 4");
        assert_eq!(read_u32(&mem, USED + 4 + 8 * 3 + 4), 4097);
        assert_eq!(read_u16(&mem, USED + 2), 0, "the index wraps to 0");
    }

    #[test]
    fn kicks_follow_event_idx_or_the_no_notify_flag() {
        let mem = ram();
        let v = view(&mem, 8, false);
        assert!(!v.set_kicks(false, false, 0));
        assert_eq!(read_u16(&mem, USED), VRING_USED_F_NO_NOTIFY as u16);
        write_u16(&mem, AVAIL + 2, 1);
        assert!(v.set_kicks(true, false, 0), "a chain arrived while off");
        assert_eq!(read_u16(&mem, USED), 0);
        assert!(!v.set_kicks(true, false, 1));

        let v = view(&mem, 8, true);
        assert!(!v.set_kicks(true, true, 1));
        assert_eq!(read_u16(&mem, USED + 4 + 8 * 8), 1, "avail_event");
    }

    #[test]
    fn notifications_follow_used_event_or_no_interrupt() {
        let mem = ram();
        let v = view(&mem, 8, true);
        write_u16(&mem, AVAIL + 4 + 2 * 8, 5);
        assert!(
            v.wants_notification(true, 5, 6),
            "used_event 5 just crossed"
        );
        assert!(v.wants_notification(true, 3, 9), "crossed within a batch");
        assert!(!v.wants_notification(true, 6, 8), "already past it");
        assert!(!v.wants_notification(true, 2, 5), "not reached yet");
        write_u16(&mem, AVAIL + 4 + 2 * 8, 65535);
        assert!(v.wants_notification(true, 65534, 1), "across the wrap");

        let v = view(&mem, 8, false);
        assert!(v.wants_notification(false, 0, 1));
        write_u16(&mem, AVAIL, VRING_AVAIL_F_NO_INTERRUPT as u16);
        assert!(!v.wants_notification(false, 0, 1));
    }
}

//! The frontend's memory as the backend maps it: regions passed as fds,
//! mapped shared, addressed by guest-physical address. Vring addresses come
//! in the frontend's virtual addresses and are translated here.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;

use super::published::Published;
use crate::os::sigbus;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion, VolatileSlice,
};

/// A region (or table of regions) that is wrong whatever else is mapped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RegionError {
    #[error("memory region gpa {gpa:#x} size {size:#x}: size is zero or the region wraps around")]
    Empty { gpa: u64, size: u64 },
    #[error("memory regions at gpa {a:#x} and {b:#x} overlap in {space} addresses")]
    Overlap { a: u64, b: u64, space: &'static str },
}

/// Zero size, or a region whose guest-physical, frontend-virtual or file
/// range wraps around the address space.
pub(crate) fn check_region(r: &VhostUserMemoryRegion) -> Result<(), RegionError> {
    let (gpa, size) = (r.guest_phys_addr, r.memory_size);
    let wraps = |start: u64| start.checked_add(size).is_none();
    if size == 0 || wraps(gpa) || wraps(r.user_addr) || wraps(r.mmap_offset) {
        return Err(RegionError::Empty { gpa, size });
    }
    Ok(())
}

/// Regions must each be valid and must not overlap in guest-physical nor
/// in frontend-virtual addresses. Quadratic, but tables are small (at most
/// a few hundred slots).
pub(crate) fn check_disjoint(regions: &[VhostUserMemoryRegion]) -> Result<(), RegionError> {
    regions.iter().try_for_each(check_region)?;
    // check_region made start + size overflow-free for both spaces.
    let overlap = |a0: u64, b0: u64, size_a: u64, size_b: u64| a0 < b0 + size_b && b0 < a0 + size_a;
    for (k, a) in regions.iter().enumerate() {
        for b in &regions[k + 1..] {
            let (sa, sb) = (a.memory_size, b.memory_size);
            let space = if overlap(a.guest_phys_addr, b.guest_phys_addr, sa, sb) {
                "guest-physical"
            } else if overlap(a.user_addr, b.user_addr, sa, sb) {
                "frontend-virtual"
            } else {
                continue;
            };
            return Err(RegionError::Overlap {
                a: a.guest_phys_addr,
                b: b.guest_phys_addr,
                space,
            });
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("memory region gpa {gpa:#x} size {size:#x}: {reason}")]
    BadRegion { gpa: u64, size: u64, reason: String },
    #[error("no memory region at gpa {gpa:#x} size {size:#x}")]
    NotFound { gpa: u64, size: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RegionInfo {
    gpa: u64,
    size: u64,
    user_addr: u64,
    mmap_offset: u64,
}

/// A guest memory region as the data path sees it: where it lives here.
#[derive(Clone, Copy)]
struct HostRegion {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// Guest memory for the data path: vm-memory's map (for the virtqueue
/// rings) plus a flat table for fast, bounds-checked address translation.
pub(crate) struct GuestRam {
    mmap: GuestMemoryMmap,
    regions: Vec<HostRegion>,
    /// The mappings `mmap` borrows (empty when vm-memory owns them).
    mappings: Vec<Arc<GuestMapping>>,
}

// SAFETY: the host pointers point into mappings owned by `mmap`, which is
// Send + Sync; GuestRam only hands them out as raw pointers.
unsafe impl Send for GuestRam {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    pub(crate) fn new(mmap: GuestMemoryMmap) -> Self {
        let regions = mmap
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(HostRegion {
                    gpa: r.start_addr().0,
                    len: r.len(),
                    host,
                })
            })
            .collect();
        GuestRam {
            mmap,
            regions,
            mappings: Vec::new(),
        }
    }

    fn with_mappings(mmap: GuestMemoryMmap, mappings: Vec<Arc<GuestMapping>>) -> Self {
        GuestRam {
            mappings,
            ..Self::new(mmap)
        }
    }

    /// Whether the frontend shrank a file under this memory (our accesses
    /// past its end read zeros since): time to hang up on it. One relaxed
    /// load unless some mapping was ever poisoned.
    pub(crate) fn poisoned(&self) -> bool {
        sigbus::any_poisoned() && self.mappings.iter().any(|m| m.poisoned())
    }

    pub(crate) fn empty() -> Self {
        Self::new(GuestMemoryMmap::new())
    }

    pub(crate) fn mmap(&self) -> &GuestMemoryMmap {
        &self.mmap
    }

    /// Host address of `[gpa, gpa + len)` if it lies inside one region.
    pub(crate) fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)?;
        let off = gpa - r.gpa;
        if len > r.len - off {
            return None;
        }
        // SAFETY: off < r.len, so the pointer stays inside the mapping.
        Some(unsafe { r.host.add(off as usize) })
    }

    /// Visit the host pieces of `[gpa, gpa + len)` (a range may span
    /// adjacent regions). False if any byte is outside guest memory.
    pub(crate) fn for_each_piece(
        &self,
        mut gpa: u64,
        mut len: u64,
        mut f: impl FnMut(*mut u8, usize),
    ) -> bool {
        while len > 0 {
            let Some(r) = self
                .regions
                .iter()
                .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
            else {
                return false;
            };
            let off = gpa - r.gpa;
            let n = len.min(r.len - off);
            // SAFETY: off < r.len and n <= r.len - off: inside the mapping.
            f(unsafe { r.host.add(off as usize) }, n as usize);
            gpa += n;
            len -= n;
        }
        true
    }

    /// Copy guest bytes at `gpa` into `out`; false if outside guest memory.
    pub(crate) fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        // Request headers: one 16-byte volatile load instead of a copy loop.
        if let Ok(header) = <&mut [u8; 16]>::try_from(&mut *out) {
            if let Some(p) = self.host_range(gpa, 16) {
                // SAFETY: p is valid for 16 bytes of guest memory
                // (host_range), read once, volatilely, with alignment 1.
                *header = unsafe { std::ptr::read_volatile(p as *const [u8; 16]) };
                return true;
            }
        }
        let mut done = 0;
        self.for_each_piece(gpa, out.len() as u64, |p, n| {
            // SAFETY: p is valid for n bytes of guest memory (for_each_piece),
            // which we only ever access volatilely (the guest may change it
            // at any time).
            let piece = unsafe { VolatileSlice::new(p, n) };
            done += piece.copy_to(&mut out[done..]);
        })
    }

    /// Store one byte at `gpa`; false if outside guest memory.
    pub(crate) fn write_u8(&self, gpa: u64, v: u8) -> bool {
        match self.host_range(gpa, 1) {
            Some(p) => {
                // SAFETY: p is a valid byte of guest memory.
                unsafe { std::ptr::write_volatile(p, v) };
                true
            }
            None => false,
        }
    }
}

impl AsRef<GuestRam> for GuestRam {
    fn as_ref(&self) -> &GuestRam {
        self
    }
}

/// An immutable snapshot of the frontend's memory; changes build a new one.
#[derive(Clone)]
pub(crate) struct MemoryMap {
    regions: Vec<Mapped>,
    mem: Arc<GuestRam>,
    /// Signalled by the SIGBUS handler when a region shrinks (see os::sigbus).
    poison_fd: Option<Arc<OwnedFd>>,
}

impl Default for MemoryMap {
    fn default() -> Self {
        MemoryMap {
            regions: Vec::new(),
            mem: Arc::new(GuestRam::empty()),
            poison_fd: None,
        }
    }
}

/// A guest memory region mapped by us (so that it is registered for
/// SIGBUS survival before anyone touches it, and unregistered before it is
/// unmapped). vm-memory's region borrows it; whoever holds that region
/// holds this too.
pub(crate) struct GuestMapping {
    ptr: *mut u8,
    len: usize,
    registration: Option<sigbus::Registration>,
    /// The session's eventfd the SIGBUS handler signals; open while registered.
    _notify: Option<Arc<OwnedFd>>,
}

// SAFETY: the mapping is plain shared memory, usable from any thread; the
// raw pointer is only handed to munmap on drop.
unsafe impl Send for GuestMapping {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Whether the frontend shrank the file under this mapping.
    pub(crate) fn poisoned(&self) -> bool {
        self.registration.as_ref().is_some_and(|r| r.poisoned())
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // Unregister first: once unmapped, the addresses may be reused.
        drop(self.registration.take());
        // SAFETY: our own mapping, created in `map_region`; nothing uses it
        // any more (this is the last reference).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The filesystem `file` lives on: (magic, block size), if fstatfs works.
fn filesystem_of(file: &File) -> Option<(libc::__fsword_t, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs into a zeroed struct we own; the fd is open.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0)
        .then_some((st.f_type, st.f_bsize as usize))
}

/// The page size of a mapping on filesystem `fs`: huge pages on hugetlbfs.
fn page_size_on(fs: Option<(libc::__fsword_t, usize)>) -> usize {
    // SAFETY: sysconf has no side effects.
    let base = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    match fs {
        Some((magic, bsize)) if magic == libc::HUGETLBFS_MAGIC => bsize.max(base),
        _ => base,
    }
}

/// One region of the map: what the frontend said, vm-memory's view, and
/// the mapping behind it.
#[derive(Clone)]
struct Mapped {
    info: RegionInfo,
    region: Arc<GuestRegionMmap>,
    mapping: Arc<GuestMapping>,
    /// The frontend's file, kept open for an upgrade's hand-over.
    file: Arc<File>,
}

fn map_region(
    r: &VhostUserMemoryRegion,
    fd: OwnedFd,
    notify: Option<&Arc<OwnedFd>>,
) -> Result<Mapped, MemoryError> {
    use std::os::fd::AsRawFd;
    let (gpa, size, user_addr, offset) =
        (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
    let bad = |reason: &str| MemoryError::BadRegion {
        gpa,
        size,
        reason: reason.to_string(),
    };
    check_region(r)?;
    let size_usize = usize::try_from(size).map_err(|_| bad("too large"))?;
    let file_offset = libc::off_t::try_from(offset).map_err(|_| bad("offset too large"))?;
    let file = File::from(fd);
    // Touching a mapping beyond the end of its file is SIGBUS: refuse a
    // region its file cannot back (offset + size cannot wrap: check_region).
    // The file may still shrink later: see os::sigbus.
    let meta = file
        .metadata()
        .map_err(|e| bad(&format!("cannot stat its fd: {e}")))?;
    if meta.is_file() && meta.len() < offset + size {
        return Err(bad(&format!("its file is only {} bytes", meta.len())));
    }
    let fs = filesystem_of(&file);
    // A FUSE file's pages come from its server, which may be the frontend:
    // it could stall our every access to guest memory (and the iothread
    // making it) for as long as it likes.
    if fs.is_some_and(|(magic, _)| magic == libc::FUSE_SUPER_MAGIC) {
        return Err(bad(
            "its file is on FUSE, whose server could stall our accesses",
        ));
    }
    let page = page_size_on(fs);
    let (prot, flags) = (
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    );
    // SAFETY: a new mapping at an address the kernel picks; the result is
    // checked. The fd may be closed afterwards (the mapping keeps the file).
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size_usize,
            prot,
            flags,
            file.as_raw_fd(),
            file_offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(bad(&format!(
            "mmap failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut mapping = GuestMapping {
        ptr: ptr as *mut u8,
        len: size_usize,
        registration: None,
        _notify: notify.cloned(),
    };
    let notify_fd = notify.map_or(-1, |f| f.as_raw_fd());
    mapping.registration = Some(
        sigbus::register(ptr as usize, size_usize, page, notify_fd)
            .map_err(|e| bad(&e.to_string()))?,
    );
    let mapping = Arc::new(mapping);
    // SAFETY: `ptr..ptr + size` is the mapping just created with `prot`
    // and `flags`; every holder of the region also holds `mapping`, which
    // unmaps it only when the last of them is gone.
    let raw = unsafe { MmapRegion::build_raw(ptr as *mut u8, size_usize, prot, flags) }
        .map_err(|e| bad(&format!("mmap failed: {e}")))?;
    let region =
        GuestRegionMmap::new(raw, GuestAddress(gpa)).ok_or_else(|| bad("invalid region"))?;
    Ok(Mapped {
        info: RegionInfo {
            gpa,
            size,
            user_addr,
            mmap_offset: offset,
        },
        region: Arc::new(region),
        mapping,
        file: Arc::new(file),
    })
}

impl MemoryMap {
    /// No memory yet; a SIGBUS in regions added later signals `poison_fd`.
    pub(crate) fn empty_with_poison_fd(poison_fd: Arc<OwnedFd>) -> Self {
        MemoryMap {
            poison_fd: Some(poison_fd),
            ..MemoryMap::default()
        }
    }

    fn rebuild(&self, regions: Vec<Mapped>) -> Result<Self, MemoryError> {
        let poison_fd = self.poison_fd.clone();
        if regions.is_empty() {
            // vm-memory refuses an empty collection; no regions is valid here
            // (the frontend removed its last one).
            return Ok(MemoryMap {
                poison_fd,
                ..MemoryMap::default()
            });
        }
        let mem =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|m| m.region.clone()).collect())
                .map_err(|e| MemoryError::BadRegion {
                gpa: 0,
                size: 0,
                reason: format!("regions overlap or are invalid: {e}"),
            })?;
        let mappings = regions.iter().map(|m| m.mapping.clone()).collect();
        Ok(MemoryMap {
            regions,
            mem: Arc::new(GuestRam::with_mappings(mem, mappings)),
            poison_fd,
        })
    }

    #[cfg(test)]
    /// SET_MEM_TABLE: replace everything (without a poison eventfd).
    pub(crate) fn from_table(
        table: Vec<(VhostUserMemoryRegion, OwnedFd)>,
    ) -> Result<Self, MemoryError> {
        MemoryMap::default().replaced_by(table)
    }

    /// SET_MEM_TABLE: replace everything, keeping the poison eventfd.
    pub(crate) fn replaced_by(
        &self,
        table: Vec<(VhostUserMemoryRegion, OwnedFd)>,
    ) -> Result<Self, MemoryError> {
        let infos: Vec<_> = table.iter().map(|(r, _)| *r).collect();
        check_disjoint(&infos)?;
        let mut regions = table
            .into_iter()
            .map(|(r, fd)| map_region(&r, fd, self.poison_fd.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        regions.sort_by_key(|m| m.info.gpa);
        self.rebuild(regions)
    }

    /// ADD_MEM_REG.
    pub(crate) fn with_region(
        &self,
        r: &VhostUserMemoryRegion,
        fd: OwnedFd,
    ) -> Result<Self, MemoryError> {
        let mut infos: Vec<_> = self
            .regions
            .iter()
            .map(|m| VhostUserMemoryRegion::new(m.info.gpa, m.info.size, m.info.user_addr, 0))
            .collect();
        infos.push(*r);
        check_disjoint(&infos)?;
        let mut regions = self.regions.clone();
        regions.push(map_region(r, fd, self.poison_fd.as_ref())?);
        regions.sort_by_key(|m| m.info.gpa);
        self.rebuild(regions)
    }

    /// REM_MEM_REG. Requests still using the region keep it mapped until
    /// they complete (they hold the old snapshot).
    pub(crate) fn without_region(&self, r: &VhostUserMemoryRegion) -> Result<Self, MemoryError> {
        let (gpa, size) = (r.guest_phys_addr, r.memory_size);
        let mut regions = self.regions.clone();
        let before = regions.len();
        let user_addr = r.user_addr;
        regions.retain(|m| {
            let i = &m.info;
            !(i.gpa == gpa && i.size == size && i.user_addr == user_addr)
        });
        if regions.len() == before {
            return Err(MemoryError::NotFound { gpa, size });
        }
        self.rebuild(regions)
    }

    pub(crate) fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// Every region as the frontend described it, with its file (what an
    /// upgrade hands the next daemon).
    pub(crate) fn regions(&self) -> Vec<(VhostUserMemoryRegion, &File)> {
        self.regions
            .iter()
            .map(|m| {
                let i = &m.info;
                let r = VhostUserMemoryRegion::new(i.gpa, i.size, i.user_addr, i.mmap_offset);
                (r, &*m.file)
            })
            .collect()
    }

    #[cfg(test)]
    /// Translate a frontend virtual address to a guest-physical address.
    pub(crate) fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .map(|m| &m.info)
            .find(|i| va >= i.user_addr && va - i.user_addr < i.size)
            .map(|i| i.gpa + (va - i.user_addr))
    }

    /// Translate `[va, va + len)` to guest-physical addresses, if the whole
    /// range lies in one region (so it is contiguous in both spaces).
    pub(crate) fn va_range_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        self.regions
            .iter()
            .map(|m| &m.info)
            .find(|i| va >= i.user_addr && va - i.user_addr < i.size)
            .filter(|i| len <= i.size - (va - i.user_addr))
            .map(|i| i.gpa + (va - i.user_addr))
    }

    pub(crate) fn guest_memory(&self) -> &Arc<GuestRam> {
        &self.mem
    }
}

/// The current memory snapshot, shared with the queue iothreads, which
/// keep their own copy (see [`Published`]).
pub(crate) type SharedMemory = Published<Arc<GuestRam>>;

/// A `SharedMemory` holding no memory yet.
pub(crate) fn new_shared_memory() -> Arc<SharedMemory> {
    Arc::new(Published::new(Arc::new(GuestRam::empty())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous file of `len` bytes (unique per call: tests run in parallel).
    fn region_file(len: u64) -> OwnedFd {
        // SAFETY: memfd_create with a NUL-terminated name; we own the result.
        let fd = unsafe { libc::memfd_create(c"ringblk-mem-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let f = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        f.set_len(len).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn regions_map_translate_and_refuse_what_their_file_cannot_back() {
        let r = VhostUserMemoryRegion::new(0x10_0000, 0x2000, 0x7f00_0000_0000, 0);
        let map = MemoryMap::default()
            .with_region(&r, region_file(0x2000))
            .unwrap();
        assert_eq!(map.va_to_gpa(0x7f00_0000_1000), Some(0x10_1000));
        assert_eq!(map.va_to_gpa(0x7f00_0000_2000), None);
        let ram = map.guest_memory();
        assert!(ram.host_range(0x10_1ff0, 16).is_some());
        assert!(
            ram.host_range(0x10_1ff0, 17).is_none(),
            "range past the region end"
        );
        assert!(!ram.write_u8(0x10_2000, 1));
        // A region bigger than its file, or overflowing, is refused.
        let big = VhostUserMemoryRegion::new(0x20_0000, 0x4000, 0x7f00_1000_0000, 0);
        assert!(map.with_region(&big, region_file(0x2000)).is_err());
        let wrap = VhostUserMemoryRegion::new(u64::MAX - 0x100, 0x2000, 0, 0);
        assert!(map.with_region(&wrap, region_file(0x2000)).is_err());
        // Removing the region leaves no memory behind.
        let empty = map.without_region(&r).unwrap();
        assert_eq!(empty.num_regions(), 0);
        assert!(empty.guest_memory().host_range(0x10_0000, 1).is_none());
        assert!(empty.without_region(&r).is_err());
    }

    #[test]
    fn added_regions_must_not_overlap_the_map_in_either_space() {
        let r = VhostUserMemoryRegion::new(0x10_0000, 0x2000, 0x7f00_0000_0000, 0);
        let map = MemoryMap::default()
            .with_region(&r, region_file(0x2000))
            .unwrap();
        // Disjoint guest-physical, overlapping frontend-virtual: refused.
        let va = VhostUserMemoryRegion::new(0x40_0000, 0x1000, 0x7f00_0000_1000, 0);
        assert!(map.with_region(&va, region_file(0x1000)).is_err());
        // Tables may come in any order; translation sees them sorted.
        let lo = VhostUserMemoryRegion::new(0, 0x1000, 0x1000_0000, 0);
        let hi = VhostUserMemoryRegion::new(0x2000, 0x1000, 0x2000_0000, 0);
        let map = MemoryMap::from_table(vec![(hi, region_file(0x1000)), (lo, region_file(0x1000))])
            .unwrap();
        assert_eq!(map.va_range_to_gpa(0x2000_0800, 0x800), Some(0x2800));
        assert_eq!(
            map.va_range_to_gpa(0x2000_0800, 0x801),
            None,
            "past the region"
        );
        // Removal matches the frontend-virtual address too.
        let wrong_va = VhostUserMemoryRegion::new(0x2000, 0x1000, 0x3000_0000, 0);
        assert!(map.without_region(&wrong_va).is_err());
        assert_eq!(map.without_region(&hi).unwrap().num_regions(), 1);
    }
}

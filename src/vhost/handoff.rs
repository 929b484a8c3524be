//! Upgrade without a reconnect: a vhost-user session handed to the next
//! daemon through systemd's file descriptor store.
//!
//! On SIGUSR1 under systemd, each session stops its queues (as for any
//! restart: tracked requests stay marked in the inflight region, the rest
//! complete), then sends systemd (`FDSTORE=1`) every descriptor the session
//! lives on: the connected socket, the guest memory files, kick and call
//! eventfds, the inflight region, the backend channel; and last a sealed
//! memfd holding the rest of the session ([`SessionState`]: features,
//! memory table, ring addresses and indices) and which descriptor is which.
//! systemd starts the new binary with them (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`); it rebuilds each session before it accepts anyone on
//! that export and goes on reading the same connection, so the frontend
//! never sees a disconnect.
//!
//! Names: `ringblk-session.<export>.<k>`, where k = 0 is the state and k ≥ 1
//! the descriptors it refers to. systemd keeps one copy of a descriptor
//! passed twice, so each open file description is sent once (`kcmp`).
//! A state this binary cannot read (another version, a missing
//! descriptor, anything that fails) closes the connection instead: the
//! frontend reconnects, as after any restart.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::os::activation::PassedFds;
use crate::os::notify::Notifier;

/// The state format this binary writes and reads.
pub(crate) const VERSION: u32 = 1;
/// What the names of handed-over descriptors start with.
const PREFIX: &str = "ringblk-session.";
/// More than any real session's state (509 regions, a few hundred rings).
const MAX_STATE: u64 = 1 << 20;
/// Descriptors one session may hand over: the socket, the backend channel,
/// the inflight region, 509 memory regions, two per ring.
const MAX_FDS: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionState {
    pub version: u32,
    pub export: String,
    pub features: u64,
    pub features_set: bool,
    pub protocol: u64,
    pub regions: Vec<RegionState>,
    pub vrings: Vec<VringState>,
    pub inflight: Option<InflightState>,
    /// Descriptor indices (k ≥ 1) of the connection and backend channel.
    pub socket: usize,
    pub backend: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RegionState {
    pub gpa: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub fd: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct VringState {
    pub size: u16,
    pub base: u16,
    /// desc, used, avail in frontend virtual addresses.
    pub addr: Option<(u64, u64, u64)>,
    pub enabled: bool,
    pub kick: Option<usize>,
    pub call: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct InflightState {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
    pub fd: usize,
}

impl InflightState {
    /// The region's layout; `fd` is filled in when it is handed over.
    pub(crate) fn new(mmap_size: u64, mmap_offset: u64, num_queues: u16, queue_size: u16) -> Self {
        InflightState {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
            fd: 0,
        }
    }
}

/// The descriptors a state refers to, each open file description once.
#[derive(Default)]
pub(crate) struct FdTable(Vec<RawFd>);

impl FdTable {
    /// The index (k ≥ 1) under which `fd` is handed over.
    pub(crate) fn add(&mut self, fd: RawFd) -> usize {
        let i = self.0.iter().position(|&f| same_file(f, fd));
        i.unwrap_or_else(|| {
            self.0.push(fd);
            self.0.len() - 1
        }) + 1
    }
}

/// Whether two of our descriptors share one open file description.
fn same_file(a: RawFd, b: RawFd) -> bool {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp compares two descriptors of this process; no memory.
    let pid = unsafe { libc::getpid() };
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) == 0 }
}

/// Whether `export` fits in a descriptor name: systemd takes at most 255
/// printable characters without ':' (`LISTEN_FDNAMES` separates names
/// with it). QEMU's ids fit.
fn storable(export: &str) -> bool {
    let fits = |c: char| c.is_ascii_alphanumeric() || "-_.+@".contains(c);
    !export.is_empty() && export.len() <= 200 && export.chars().all(fits)
}

fn name(export: &str, k: usize) -> String {
    format!("{PREFIX}{export}.{k}")
}

/// Hand `state` and `fds` to systemd's store: the descriptors first, the
/// state last, so that a state in the store means everything it names is.
pub(crate) fn store(n: &Notifier, state: &SessionState, fds: &FdTable) -> Result<(), Error> {
    let export = &state.export;
    if !storable(export) {
        return Err(Error::invalid(format!(
            "export id '{export}' cannot name a descriptor in systemd's fd store"
        )));
    }
    let err = |what: &str, e: io::Error| {
        Error::io(format!("{what}: {e}")).context(format!("export {export}"))
    };
    let json = serde_json::to_vec(state).map_err(|e| Error::io(e.to_string()))?;
    let memfd = sealed_memfd(&json).map_err(|e| err("writing the session state", e))?;
    for (i, &fd) in fds.0.iter().enumerate() {
        n.send_fd(&format!("FDSTORE=1\nFDNAME={}", name(export, i + 1)), fd)
            .map_err(|e| err("handing a descriptor to systemd", e))?;
    }
    n.send_fd(
        &format!("FDSTORE=1\nFDNAME={}", name(export, 0)),
        memfd.as_raw_fd(),
    )
    .map_err(|e| err("handing the session state to systemd", e))
}

fn sealed_memfd(data: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: NUL-terminated name; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"ringblk-session".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    File::from(fd.try_clone()?).write_all(data)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our own memfd.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A session the previous daemon handed over: its state and descriptors
/// (by index k; `fds[k - 1]`).
pub(crate) struct Restored {
    pub state: SessionState,
    fds: Vec<Option<OwnedFd>>,
}

impl Restored {
    /// A copy of descriptor `k` (one may be named more than once: regions
    /// in one memfd share a description, which was handed over once).
    pub(crate) fn fd(&self, k: usize) -> Result<OwnedFd, Error> {
        let fd = k
            .checked_sub(1)
            .and_then(|i| self.fds.get(i))
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "the handed-over state names descriptor {k}, which is missing"
                ))
            })?;
        fd.try_clone()
            .map_err(|e| Error::io(format!("descriptor {k}: {e}")))
    }
}

/// Sessions passed by systemd, by export, until their exports take them.
#[derive(Default)]
pub struct HandedOver(HashMap<String, Vec<(usize, OwnedFd)>>);

impl HandedOver {
    /// Take the descriptors systemd passed under our names out of `passed`
    /// (before anything looks for listening sockets there: a handed-over
    /// connection's socket is bound to an export's path too).
    pub fn take_from(passed: &mut PassedFds) -> HandedOver {
        HandedOver::from_passed(passed.take_prefixed(PREFIX))
    }

    /// Sort the passed descriptors named like ours by export. `passed`
    /// yields (fd, name) pairs this process owns from now on.
    fn from_passed(passed: Vec<(RawFd, String)>) -> HandedOver {
        let mut by_export: HashMap<String, Vec<(usize, OwnedFd)>> = HashMap::new();
        for (raw, n) in passed {
            // SAFETY: the caller hands each passed descriptor over once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let Some(rest) = n.strip_prefix(PREFIX) else {
                continue;
            };
            let Some((export, k)) = rest.rsplit_once('.') else {
                continue;
            };
            let Ok(k) = k.parse::<usize>() else { continue };
            let v = by_export.entry(export.to_string()).or_default();
            if v.len() < MAX_FDS + 1 {
                v.push((k, fd));
            }
        }
        HandedOver(by_export)
    }

    /// The session of export `id`, if one was handed over; systemd is told
    /// to forget its descriptors either way once read.
    pub(crate) fn take(&mut self, id: &str) -> Option<Result<Restored, Error>> {
        let fds = self.0.remove(id)?;
        forget(id, fds.iter().map(|(k, _)| *k));
        Some(
            read(id, fds)
                .map_err(|e| e.context(format!("export {id}: cannot take over the session"))),
        )
    }

    /// Sessions no export took (their exports are gone): closed.
    pub(crate) fn leftovers(&mut self) -> Vec<String> {
        let ids: Vec<String> = self.0.keys().cloned().collect();
        for (id, fds) in self.0.drain() {
            forget(&id, fds.iter().map(|(k, _)| *k));
        }
        ids
    }
}

/// FDSTOREREMOVE: the store must not hand these to a later process.
fn forget(export: &str, ks: impl Iterator<Item = usize>) {
    let Ok(Some(n)) = Notifier::from_env() else {
        return;
    };
    for k in ks {
        if let Err(e) = n.send(&format!("FDSTOREREMOVE=1\nFDNAME={}", name(export, k))) {
            log::warn!("export {export}: telling systemd to drop a handed-over descriptor: {e}");
        }
    }
}

fn read(id: &str, fds: Vec<(usize, OwnedFd)>) -> Result<Restored, Error> {
    let mut state_fd = None;
    let mut numbered: Vec<Option<OwnedFd>> = Vec::new();
    for (k, fd) in fds {
        if k == 0 {
            state_fd = Some(fd);
            continue;
        }
        if k > MAX_FDS {
            return Err(Error::invalid(format!("descriptor {k} is past {MAX_FDS}")));
        }
        if numbered.len() < k {
            numbered.resize_with(k, || None);
        }
        numbered[k - 1] = Some(fd);
    }
    let state_fd = state_fd.ok_or_else(|| Error::invalid("no session state was handed over"))?;
    // SAFETY: fcntl on a descriptor we own.
    let seals = unsafe { libc::fcntl(state_fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_WRITE == 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(Error::invalid("the session state is not a sealed memfd"));
    }
    let mut json = Vec::new();
    let mut file = File::from(state_fd);
    // From the start: the writer's offset travels with the description.
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.take(MAX_STATE + 1).read_to_end(&mut json))
        .map_err(|e| Error::io(format!("reading the session state: {e}")))?;
    if json.len() as u64 > MAX_STATE {
        return Err(Error::invalid(format!(
            "the session state is over {MAX_STATE} bytes"
        )));
    }
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(&json)
        .map_err(|e| Error::invalid(format!("the session state does not parse: {e}")))?;
    if v.version != VERSION {
        return Err(Error::invalid(format!(
            "the session state is version {}, this daemon reads {VERSION}",
            v.version
        )));
    }
    let state: SessionState = serde_json::from_slice(&json)
        .map_err(|e| Error::invalid(format!("the session state does not parse: {e}")))?;
    if state.export != id {
        return Err(Error::invalid(format!(
            "the session state is export {}'s",
            state.export
        )));
    }
    Ok(Restored {
        state,
        fds: numbered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> OwnedFd {
        // SAFETY: plain syscall, checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    #[test]
    fn a_description_passed_twice_is_one_entry() {
        let (a, b) = (eventfd(), eventfd());
        let a2 = a.try_clone().unwrap();
        let mut t = FdTable::default();
        assert_eq!(t.add(a.as_raw_fd()), 1);
        assert_eq!(t.add(b.as_raw_fd()), 2);
        assert_eq!(t.add(a2.as_raw_fd()), 1, "a dup is the same description");
    }

    fn state(export: &str, version: u32) -> SessionState {
        SessionState {
            version,
            export: export.into(),
            features: 1 << 32,
            features_set: true,
            protocol: 3,
            regions: vec![],
            vrings: vec![VringState {
                size: 256,
                base: 7,
                addr: Some((1, 2, 3)),
                enabled: true,
                kick: Some(2),
                call: None,
            }],
            inflight: None,
            socket: 1,
            backend: None,
        }
    }

    fn handed(s: &SessionState) -> Vec<(usize, OwnedFd)> {
        let json = serde_json::to_vec(s).unwrap();
        vec![
            (0, sealed_memfd(&json).unwrap()),
            (1, eventfd()),
            (2, eventfd()),
        ]
    }

    #[test]
    fn a_state_reads_back_with_its_descriptors() {
        let r = read("e0", handed(&state("e0", VERSION))).unwrap();
        assert_eq!(r.state.vrings[0].base, 7);
        assert!(r.fd(2).is_ok());
        assert!(r.fd(2).is_ok(), "named twice, copied twice");
        assert!(r.fd(3).is_err(), "never handed over");
        assert!(r.fd(0).is_err(), "0 is the state");
    }

    #[test]
    fn states_it_cannot_read_are_refused_by_name() {
        let e = read("e0", handed(&state("e0", VERSION + 1))).err().unwrap();
        assert!(e.to_string().contains("version 2"), "{e}");
        let e = read("e1", handed(&state("e0", VERSION))).err().unwrap();
        assert!(e.to_string().contains("export e0's"), "{e}");
        let mut fds = handed(&state("e0", VERSION));
        fds.remove(0);
        let e = read("e0", fds).err().unwrap();
        assert!(e.to_string().contains("no session state"), "{e}");
        // Not sealed: anyone holding it could have changed it.
        let e = read("e0", vec![(0, eventfd())]).err().unwrap();
        assert!(e.to_string().contains("sealed"), "{e}");
    }

    #[test]
    fn only_ids_systemd_takes_as_names_are_stored() {
        assert!(storable("vda") && storable("disk-1.part_2"));
        assert!(!storable("a:b"), "':' separates LISTEN_FDNAMES");
        assert!(!storable("a b") && !storable("") && !storable(&"x".repeat(201)));
    }

    #[test]
    fn names_sort_by_export_and_index() {
        let pairs = vec![
            (eventfd(), "ringblk-session.vd.a.0".to_string()),
            (eventfd(), "ringblk-session.vd.a.3".to_string()),
            (eventfd(), "something-else".to_string()),
        ];
        let passed = pairs
            .into_iter()
            .map(|(fd, n)| (std::os::fd::IntoRawFd::into_raw_fd(fd), n))
            .collect();
        let h = HandedOver::from_passed(passed);
        let ks: Vec<usize> = h.0["vd.a"].iter().map(|(k, _)| *k).collect();
        assert_eq!(ks, [0, 3]);
        assert_eq!(h.0.len(), 1);
    }
}

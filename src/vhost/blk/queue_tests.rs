//! A virtqueue driven by a fake guest: descriptor chains written straight
//! into guest memory, served by a real queue task on a real iothread.
//! Each hostile-input case must be answered (or the queue stopped) without
//! disturbing later requests.

#[cfg(test)]
mod fake_guest {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::super::config::seg_max_for;
    use super::super::queue::{self, QueueControl};
    use super::super::request::*;
    use super::super::state::ExportState;
    use crate::graph::{open_null, BlockBackend, Graph};
    use crate::uring::IoThread;
    use crate::vhost::device::RunningQueue;
    use crate::vhost::memory::{new_shared_memory, GuestRam};
    use crate::vhost::vring::{CallFd, QueueSetup};

    const QSIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const MEM: usize = 1 << 20;
    const DISK: u64 = 1 << 20;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    /// size_max of the test device.
    const SEG: u32 = 1 << 16;

    /// Non-blocking, as the session makes every kick and call fd
    /// (`notify_fd::accept`): call writes are tried only on those.
    fn eventfd() -> File {
        // SAFETY: plain syscall, checked below, then owned by the File.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        unsafe { File::from_raw_fd(fd) }
    }

    fn signal(f: &File) {
        let one: u64 = 1;
        // SAFETY: 8-byte write from a valid u64.
        assert_eq!(
            unsafe { libc::write(f.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) },
            8
        );
    }

    /// Block until `f` is signalled or 10 s pass; true if signalled.
    fn wait_signalled(f: &File) -> bool {
        let mut p = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 10_000) } != 1 {
            return false;
        }
        let mut v = 0u64;
        // SAFETY: 8-byte read into a valid u64.
        unsafe { libc::read(f.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        true
    }

    struct Guest {
        ram: Arc<GuestRam>,
        kick: Arc<File>,
        call: File,
        call_fd: Arc<CallFd>,
        control: Arc<QueueControl>,
        export: Arc<ExportState>,
        avail_idx: u16,
        _thread: IoThread,
    }

    impl Guest {
        fn new(read_only: bool, event_idx: bool) -> Guest {
            let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let ram = Arc::new(GuestRam::new(mmap));
            let shared = new_shared_memory();
            shared.publish(ram.clone());
            let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
            serial[..6].copy_from_slice(b"serial");
            let limits = Limits {
                block_size: 512,
                size_max: SEG,
                seg_max: seg_max_for(QSIZE),
                max_discard_sectors: 1 << 16,
                max_write_zeroes_sectors: 1 << 16,
                max_segments: 1,
                serial,
            };
            let backend = BlockBackend::new("test", open_null(&Graph::new(), DISK), read_only);
            let export = ExportState::new("test", backend, limits, QSIZE as usize, 1);
            let state = export.clone();
            let thread = IoThread::start("test-queue", std::time::Duration::ZERO).unwrap();
            let kick = Arc::new(eventfd());
            let call = eventfd();
            let call_fd = Arc::new(CallFd::default());
            call_fd.publish(Some(Arc::new(call.try_clone().unwrap())));
            let setup = QueueSetup {
                index: 0,
                size: QSIZE,
                desc_table: DESC,
                avail_ring: AVAIL,
                used_ring: USED,
                next_avail: 0,
                event_idx,
                indirect: true,
                kick: kick.clone(),
                call: call_fd.clone(),
                inflight: None,
                dirty_log: crate::vhost::dirty_log::DirtyLog::new(1),
            };
            let control = queue::start(setup, shared, export, &thread.handle()).unwrap();
            Guest {
                ram,
                kick,
                call,
                call_fd,
                control,
                export: state,
                avail_idx: 0,
                _thread: thread,
            }
        }

        fn mem(&self) -> &GuestMemoryMmap {
            self.ram.mmap()
        }

        fn desc(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem()
                .write_slice(&raw, GuestAddress(table + idx as u64 * 16))
                .unwrap();
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem().write_slice(&h, GuestAddress(at)).unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem().read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
        }

        /// Offer `head`, kick, wait for the used ring to advance; returns the
        /// used length.
        fn submit(&mut self, head: u16) -> u32 {
            let slot = self.offer(head);
            while self.used_idx() != self.avail_idx {
                assert!(wait_signalled(&self.call), "no completion for head {head}");
            }
            let elem = USED + 4 + (slot as u64) * 8;
            assert_eq!(
                self.mem().read_obj::<u32>(GuestAddress(elem)).unwrap(),
                head as u32
            );
            self.mem().read_obj::<u32>(GuestAddress(elem + 4)).unwrap()
        }

        /// Offer `head` and kick, asking for an interrupt on its completion;
        /// returns its avail slot.
        fn offer(&mut self, head: u16) -> u16 {
            // Ask for an interrupt on the next completion (EVENT_IDX used_event),
            // as a driver does before it waits.
            let used = self.used_idx();
            self.mem()
                .write_obj(used, GuestAddress(AVAIL + 4 + 2 * QSIZE as u64))
                .unwrap();
            let slot = self.avail_idx % QSIZE;
            self.mem()
                .write_obj(head, GuestAddress(AVAIL + 4 + slot as u64 * 2))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem()
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            signal(&self.kick);
            slot
        }

        fn status(&self, at: u64) -> u8 {
            self.mem().read_obj::<u8>(GuestAddress(at)).unwrap()
        }

        /// A well-formed 4 KiB read at `sector`: header, data, status.
        fn read_chain(&self, sector: u64) {
            self.header(0x10000, VIRTIO_BLK_T_IN, sector);
            self.desc(DESC, 0, 0x10000, 16, NEXT, 1);
            self.desc(DESC, 1, 0x20000, 4096, NEXT | WRITE, 2);
            self.desc(DESC, 2, 0x30000, 1, WRITE, 0);
            self.mem().write_obj(0xffu8, GuestAddress(0x30000)).unwrap();
        }

        /// A write of `len` bytes at sector 0: header, data, status.
        fn write_chain(&self, len: u32) {
            self.header(0x10000, VIRTIO_BLK_T_OUT, 0);
            self.desc(DESC, 0, 0x10000, 16, NEXT, 1);
            self.desc(DESC, 1, 0x20000, len, NEXT, 2);
            self.desc(DESC, 2, 0x30000, 1, WRITE, 0);
        }

        /// A request with a header and a status byte only (flush, bad types).
        fn bare_chain(&self, kind: u32) {
            self.header(0x10000, kind, 0);
            self.desc(DESC, 0, 0x10000, 16, NEXT, 1);
            self.desc(DESC, 1, 0x30000, 1, WRITE, 0);
            self.mem().write_obj(0xffu8, GuestAddress(0x30000)).unwrap();
        }

        /// Requests refused before reaching the disk, per the queue's stats.
        fn invalid(&self) -> u64 {
            self.export.stats[0].snapshot().invalid
        }

        /// Submit `head` and expect an IOERR status at `status`, counted
        /// as invalid.
        fn refused(&mut self, head: u16, status: u64, what: &str) {
            let before = self.invalid();
            self.mem().write_obj(0xffu8, GuestAddress(status)).unwrap();
            assert_eq!(self.submit(head), 1, "{what}: used length");
            assert_eq!(self.status(status), VIRTIO_BLK_S_IOERR, "{what}");
            assert_eq!(self.invalid(), before + 1, "{what}: invalid counter");
        }

        /// An indirect chain in the table at `table`: a header of `kind`,
        /// `segs` data descriptors of `len` bytes (all over the same guest
        /// buffer) with `data_flags`, and a status byte.
        fn indirect_chain(&self, table: u64, kind: u32, segs: u16, len: u32, data_flags: u16) {
            self.header(0x10000, kind, 0);
            self.desc(table, 0, 0x10000, 16, NEXT, 1);
            for i in 1..=segs {
                self.desc(table, i, 0x40000, len, NEXT | data_flags, i + 1);
            }
            self.desc(table, segs + 1, 0x30000, 1, WRITE, 0);
            self.desc(DESC, 0, table, 16 * (segs as u32 + 2), INDIRECT, 0);
        }

        fn still_serves(&mut self) {
            self.read_chain(0);
            assert_eq!(self.submit(0), 4097);
            assert_eq!(self.status(0x30000), VIRTIO_BLK_S_OK);
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            self.control.stop_and_wait();
        }
    }

    #[test]
    fn well_formed_read_and_flush() {
        let mut g = Guest::new(false, true);
        g.mem()
            .write_slice(&[0xaa; 4096], GuestAddress(0x20000))
            .unwrap();
        g.read_chain(8);
        assert_eq!(g.submit(0), 4097);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_OK);
        let mut data = [0u8; 4096];
        g.mem()
            .read_slice(&mut data, GuestAddress(0x20000))
            .unwrap();
        assert!(data.iter().all(|&b| b == 0), "null disk reads zeros");
        g.bare_chain(VIRTIO_BLK_T_FLUSH);
        assert_eq!(g.submit(0), 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn a_call_fd_replaced_while_the_queue_runs_gets_the_next_notification() {
        let mut g = Guest::new(false, true);
        g.bare_chain(VIRTIO_BLK_T_FLUSH);
        assert_eq!(g.submit(0), 1);
        // Whether or not submit waited for it, the first fd is quiet now.
        let mut v = 0u64;
        // SAFETY: 8-byte read into a valid u64 (non-blocking fd).
        unsafe {
            libc::read(
                g.call.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        let old = std::mem::replace(&mut g.call, eventfd());
        g.call_fd
            .publish(Some(Arc::new(g.call.try_clone().unwrap())));
        g.bare_chain(VIRTIO_BLK_T_FLUSH);
        g.offer(0);
        assert!(wait_signalled(&g.call), "the new call fd was not signalled");
        assert_eq!(g.used_idx(), g.avail_idx);
        let mut p = libc::pollfd {
            fd: old.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd, without waiting.
        assert_eq!(
            unsafe { libc::poll(&mut p, 1, 0) },
            0,
            "the replaced fd was signalled"
        );
    }

    #[test]
    fn each_completion_notifies_a_driver_without_event_idx_once() {
        const N: u64 = 4;
        let mut g = Guest::new(false, false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for _ in 0..N {
            g.bare_chain(VIRTIO_BLK_T_FLUSH);
            g.offer(0);
            // Leave the call counter alone: it adds up every notification.
            while g.used_idx() != g.avail_idx {
                assert!(std::time::Instant::now() < deadline, "no completion");
                std::hint::spin_loop();
            }
        }
        // Every notification of the first N - 1 requests was sent before the
        // loop turn that popped the next one; the last one's first is what
        // we wait for.
        let mut count = 0u64;
        while count < N {
            assert!(
                std::time::Instant::now() < deadline,
                "only {count} notifications"
            );
            let mut v = 0u64;
            // SAFETY: 8-byte read into a valid u64 (non-blocking fd).
            if unsafe {
                libc::read(
                    g.call.as_raw_fd(),
                    &mut v as *mut u64 as *mut libc::c_void,
                    8,
                )
            } == 8
            {
                count += v;
            }
        }
        assert_eq!(count, N, "a completion notified the driver more than once");
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mut g = Guest::new(false, false);
        g.header(0x10000, VIRTIO_BLK_T_GET_ID, 0);
        g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
        g.desc(DESC, 1, 0x20000, 20, NEXT | WRITE, 2);
        g.desc(DESC, 2, 0x30000, 1, WRITE, 0);
        assert_eq!(g.submit(0), 21);
        let mut id = [0u8; 20];
        g.mem().read_slice(&mut id, GuestAddress(0x20000)).unwrap();
        assert_eq!(&id[..7], b"serial\0");
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let mut g = Guest::new(false, true);
        g.bare_chain(99);
        assert_eq!(g.submit(0), 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_UNSUPP);
        g.still_serves();
    }

    #[test]
    fn missing_status_descriptor_completes_with_zero_length() {
        let mut g = Guest::new(false, true);
        g.header(0x10000, VIRTIO_BLK_T_OUT, 0);
        g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
        g.desc(DESC, 1, 0x20000, 512, 0, 0);
        assert_eq!(g.submit(0), 0);
        g.still_serves();
    }

    #[test]
    fn short_header_is_an_io_error() {
        let mut g = Guest::new(false, true);
        g.desc(DESC, 0, 0x10000, 8, NEXT, 1);
        g.desc(DESC, 1, 0x30000, 1, WRITE, 0);
        assert_eq!(g.submit(0), 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        g.still_serves();
    }

    #[test]
    fn data_outside_guest_memory_is_an_io_error() {
        let mut g = Guest::new(false, true);
        for addr in [MEM as u64 - 100, MEM as u64 + 0x1000, u64::MAX - 10] {
            g.header(0x10000, VIRTIO_BLK_T_IN, 0);
            g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
            g.desc(DESC, 1, addr, 512, NEXT | WRITE, 2);
            g.desc(DESC, 2, 0x30000, 1, WRITE, 0);
            assert_eq!(g.submit(0), 1, "buffer at {addr:#x}");
            assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        }
        // A status byte outside guest memory: nothing to write, length 0.
        g.header(0x10000, VIRTIO_BLK_T_FLUSH, 0);
        g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
        g.desc(DESC, 1, MEM as u64 + 8, 1, WRITE, 0);
        assert_eq!(g.submit(0), 0);
        g.still_serves();
    }

    #[test]
    fn ranges_past_the_end_or_overflowing_are_io_errors() {
        let mut g = Guest::new(false, true);
        for sector in [DISK / 512, DISK / 512 - 1, u64::MAX / 512, u64::MAX] {
            g.read_chain(sector);
            assert_eq!(g.submit(0), 1, "sector {sector}");
            assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR, "sector {sector}");
        }
        g.still_serves();
    }

    #[test]
    fn unaligned_length_is_an_io_error() {
        let mut g = Guest::new(false, true);
        g.write_chain(100);
        assert_eq!(g.submit(0), 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        g.still_serves();
    }

    #[test]
    fn looping_and_malformed_chains_complete_with_zero_length() {
        let mut g = Guest::new(false, true);
        // A loop.
        g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
        g.desc(DESC, 1, 0x20000, 16, NEXT, 0);
        assert_eq!(g.submit(0), 0);
        // Readable after writable.
        g.desc(DESC, 0, 0x30000, 1, NEXT | WRITE, 1);
        g.desc(DESC, 1, 0x10000, 16, 0, 0);
        assert_eq!(g.submit(0), 0);
        // next beyond the table.
        g.desc(DESC, 0, 0x10000, 16, NEXT, 500);
        assert_eq!(g.submit(0), 0);
        // Indirect table with a bad length, and one outside guest memory.
        g.desc(DESC, 0, 0x8000, 24, INDIRECT, 0);
        assert_eq!(g.submit(0), 0);
        g.desc(DESC, 0, MEM as u64 + 0x1000, 32, INDIRECT, 0);
        assert_eq!(g.submit(0), 0);
        // A huge descriptor: a chain over 4 GiB is an oversized request.
        g.header(0x10000, VIRTIO_BLK_T_OUT, 0);
        g.desc(DESC, 0, 0x10000, u32::MAX, NEXT, 1);
        g.desc(DESC, 1, 0x30000, 1, WRITE, 0);
        g.refused(0, 0x30000, "4 GiB write");
        g.still_serves();
    }

    #[test]
    fn well_formed_indirect_chain() {
        let mut g = Guest::new(false, true);
        g.header(0x10000, VIRTIO_BLK_T_IN, 0);
        g.desc(0x8000, 0, 0x10000, 16, NEXT, 1);
        g.desc(0x8000, 1, 0x20000, 1024, NEXT | WRITE, 2);
        g.desc(0x8000, 2, 0x30000, 1, WRITE, 0);
        g.desc(DESC, 0, 0x8000, 48, INDIRECT, 0);
        assert_eq!(g.submit(0), 1025);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn discard_and_write_zeroes_validation() {
        let mut g = Guest::new(false, true);
        let seg = |g: &Guest, sector: u64, n: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            g.mem().write_slice(&s, GuestAddress(0x20000)).unwrap();
        };
        let chain = |g: &Guest, kind: u32, payload: u32| {
            g.header(0x10000, kind, 0);
            g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
            g.desc(DESC, 1, 0x20000, payload, NEXT, 2);
            g.desc(DESC, 2, 0x30000, 1, WRITE, 0);
        };
        seg(&g, 0, 8, 0);
        chain(&g, VIRTIO_BLK_T_DISCARD, 16);
        assert_eq!(g.submit(0), 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_OK);
        seg(&g, 0, 8, 1); // the unmap flag is not defined for discard
        chain(&g, VIRTIO_BLK_T_DISCARD, 16);
        g.submit(0);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_UNSUPP);
        seg(&g, 0, 8, 1);
        chain(&g, VIRTIO_BLK_T_WRITE_ZEROES, 16);
        g.submit(0);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_OK);
        chain(&g, VIRTIO_BLK_T_WRITE_ZEROES, 32); // two segments, max one
        g.submit(0);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_UNSUPP);
        chain(&g, VIRTIO_BLK_T_WRITE_ZEROES, 20); // not whole segments
        g.submit(0);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        seg(&g, DISK / 512 - 4, 8, 0); // past the end
        chain(&g, VIRTIO_BLK_T_WRITE_ZEROES, 16);
        g.submit(0);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        seg(&g, 0, u32::MAX, 0); // over the advertised maximum
        chain(&g, VIRTIO_BLK_T_DISCARD, 16);
        g.submit(0);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        g.still_serves();
    }

    #[test]
    fn read_only_export_fails_writes() {
        let mut g = Guest::new(true, true);
        g.write_chain(512);
        assert_eq!(g.submit(0), 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_IOERR);
        g.still_serves();
    }

    #[test]
    fn avail_index_beyond_the_queue_stops_only_that_queue() {
        let mut g = Guest::new(false, true);
        g.still_serves();
        // The driver claims QSIZE + 5 new entries: impossible, so the queue stops.
        g.mem()
            .write_obj(g.avail_idx.wrapping_add(QSIZE + 5), GuestAddress(AVAIL + 2))
            .unwrap();
        let used_before = g.used_idx();
        signal(&g.kick);
        // Stopping still works and reports where it stopped: nothing was popped.
        assert_eq!(g.control.stop_and_wait(), g.avail_idx);
        assert_eq!(g.used_idx(), used_before);
        // A fresh queue (as after the frontend sets the ring up again) serves.
        let mut g2 = Guest::new(false, true);
        g2.still_serves();
    }

    #[test]
    fn head_index_out_of_range_is_dropped() {
        let mut g = Guest::new(false, true);
        let slot = g.avail_idx % QSIZE;
        g.mem()
            .write_obj(999u16, GuestAddress(AVAIL + 4 + slot as u64 * 2))
            .unwrap();
        g.avail_idx = g.avail_idx.wrapping_add(1);
        g.mem()
            .write_obj(g.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        signal(&g.kick);
        // The next good request completes; the bogus head never appears.
        g.read_chain(0);
        g.mem()
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * QSIZE as u64))
            .unwrap();
        let slot = g.avail_idx % QSIZE;
        g.mem()
            .write_obj(0u16, GuestAddress(AVAIL + 4 + slot as u64 * 2))
            .unwrap();
        g.avail_idx = g.avail_idx.wrapping_add(1);
        g.mem()
            .write_obj(g.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        signal(&g.kick);
        while g.used_idx() != 1 {
            assert!(wait_signalled(&g.call));
        }
        let id = g.mem().read_obj::<u32>(GuestAddress(USED + 4)).unwrap();
        assert_eq!(id, 0);
    }

    #[test]
    fn segments_over_size_max_and_requests_over_the_cap_are_refused() {
        let mut g = Guest::new(false, true);
        let seg_max = seg_max_for(QSIZE) as u16;
        // A segment just over size_max, both directions.
        g.write_chain(SEG + 512);
        g.refused(0, 0x30000, "write segment over size_max");
        g.header(0x10000, VIRTIO_BLK_T_IN, 0);
        g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
        g.desc(DESC, 1, 0x40000, SEG + 512, NEXT | WRITE, 2);
        g.desc(DESC, 2, 0x30000, 1, WRITE, 0);
        g.refused(0, 0x30000, "read segment over size_max");
        // Exactly the cap: seg_max segments of size_max.
        g.indirect_chain(0x8000, VIRTIO_BLK_T_IN, seg_max, SEG, WRITE);
        assert_eq!(g.submit(0), seg_max as u32 * SEG + 1);
        assert_eq!(g.status(0x30000), VIRTIO_BLK_S_OK);
        // One segment more: over seg_max and over seg_max × size_max.
        g.indirect_chain(0x8000, VIRTIO_BLK_T_IN, seg_max + 1, SEG, WRITE);
        g.refused(0, 0x30000, "read over the cap");
        g.indirect_chain(0x8000, VIRTIO_BLK_T_OUT, seg_max + 1, 512, 0);
        g.refused(0, 0x30000, "write with too many segments");
        g.still_serves();
    }

    #[test]
    fn a_two_thousand_descriptor_chain_is_refused_and_the_queue_goes_on() {
        let mut g = Guest::new(false, true);
        for (kind, flags) in [(VIRTIO_BLK_T_IN, WRITE), (VIRTIO_BLK_T_OUT, 0)] {
            g.indirect_chain(0x80000, kind, 1998, 512, flags);
            g.refused(0, 0x30000, "2,000 descriptors");
            g.still_serves();
        }
    }

    #[test]
    fn data_in_the_wrong_direction_is_refused() {
        let mut g = Guest::new(false, true);
        // A read whose data the device would read.
        g.header(0x10000, VIRTIO_BLK_T_IN, 0);
        g.desc(DESC, 0, 0x10000, 16, NEXT, 1);
        g.desc(DESC, 1, 0x20000, 512, NEXT, 2);
        g.desc(DESC, 2, 0x30000, 1, WRITE, 0);
        g.refused(0, 0x30000, "read with device-readable data");
        // A write whose data the device would write.
        g.header(0x10000, VIRTIO_BLK_T_OUT, 0);
        g.desc(DESC, 1, 0x20000, 512, NEXT | WRITE, 2);
        g.refused(0, 0x30000, "write with device-writable data");
        // Reads and writes without data.
        g.bare_chain(VIRTIO_BLK_T_IN);
        g.refused(0, 0x30000, "read without data");
        g.bare_chain(VIRTIO_BLK_T_OUT);
        g.refused(0, 0x30000, "write without data");
        // Flush with data either way; get-id reading data or without room.
        for flags in [NEXT, NEXT | WRITE] {
            g.header(0x10000, VIRTIO_BLK_T_FLUSH, 0);
            g.desc(DESC, 1, 0x20000, 512, flags, 2);
            g.refused(0, 0x30000, "flush with data");
        }
        g.header(0x10000, VIRTIO_BLK_T_GET_ID, 0);
        g.desc(DESC, 1, 0x20000, 20, NEXT, 2);
        g.refused(0, 0x30000, "get-id with device-readable data");
        g.bare_chain(VIRTIO_BLK_T_GET_ID);
        g.refused(0, 0x30000, "get-id without a buffer");
        // Discard whose segment the device would write.
        g.header(0x10000, VIRTIO_BLK_T_DISCARD, 0);
        g.desc(DESC, 1, 0x20000, 16, NEXT | WRITE, 2);
        g.refused(0, 0x30000, "discard with device-writable data");
        g.still_serves();
    }
}

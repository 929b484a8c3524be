use super::*;
use vhost::vhost_user::message::VhostUserInflight;

fn header(request: FrontendReq, size: usize) -> Header {
    Header {
        request: request as u32,
        flags: FLAG_VERSION_1,
        size: size as u32,
    }
}

fn region(gpa: u64, size: u64, va: u64) -> [u8; REGION_LEN] {
    let mut raw = [0u8; REGION_LEN];
    raw.copy_from_slice(VhostUserMemoryRegion::new(gpa, size, va, 0).as_slice());
    raw
}

fn table(regions: &[[u8; REGION_LEN]]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 4]);
    for r in regions {
        p.extend_from_slice(r);
    }
    p
}

#[test]
fn huge_sizes_and_bad_versions_break_the_stream() {
    let mut raw = [0u8; HEADER_LEN];
    raw[0..4].copy_from_slice(&(FrontendReq::SET_FEATURES as u32).to_le_bytes());
    raw[4..8].copy_from_slice(&1u32.to_le_bytes());
    raw[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(parse_header(&raw).is_err());
    raw[8..12].copy_from_slice(&9u32.to_le_bytes());
    assert!(
        parse_header(&raw).is_err(),
        "SET_FEATURES payload is 8 bytes"
    );
    raw[8..12].copy_from_slice(&8u32.to_le_bytes());
    assert!(parse_header(&raw).is_ok());
    raw[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert!(parse_header(&raw).is_err(), "version 2");
    // Unknown requests are bounded by the protocol's message size.
    raw[0..4].copy_from_slice(&999u32.to_le_bytes());
    raw[4..8].copy_from_slice(&1u32.to_le_bytes());
    raw[8..12].copy_from_slice(&(MAX_MSG_SIZE as u32 + 1).to_le_bytes());
    assert!(parse_header(&raw).is_err());
}

#[test]
fn payload_sizes_and_fds_must_match_the_request() {
    let h = header(FrontendReq::SET_FEATURES, 4);
    assert!(matches!(
        decode(&h, &[0; 4], 0, 1),
        Err(DecodeError::Size { got: 4, want: 8 })
    ));
    let h = header(FrontendReq::SET_FEATURES, 8);
    assert!(matches!(
        decode(&h, &[0; 8], 0, 1),
        Ok(Request::SetFeatures(0))
    ));
    assert!(matches!(
        decode(&h, &[0; 8], 1, 1),
        Err(DecodeError::Fds { got: 1, .. })
    ));
    let h = header(FrontendReq::SET_VRING_KICK, 8);
    assert!(decode(&h, &0u64.to_le_bytes(), 0, 1).is_err(), "no fd");
    assert!(
        decode(&h, &0x100u64.to_le_bytes(), 1, 1).is_err(),
        "nofd + fd"
    );
    assert!(
        decode(&h, &1u64.to_le_bytes(), 1, 1).is_err(),
        "queue 1 of 1"
    );
    assert!(decode(&h, &0x200u64.to_le_bytes(), 1, 1).is_err(), "bit 9");
    assert!(matches!(
        decode(&h, &0u64.to_le_bytes(), 1, 1),
        Ok(Request::SetVringKick {
            index: 0,
            has_fd: true
        })
    ));
}

#[test]
fn queue_sizes_must_be_powers_of_two_up_to_32768() {
    let h = header(FrontendReq::SET_VRING_NUM, 8);
    let state = |index: u32, num: u32| VhostUserVringState::new(index, num).as_slice().to_vec();
    for bad in [0, 3, 65536, 1 << 31] {
        assert!(decode(&h, &state(0, bad), 0, 2).is_err(), "size {bad}");
    }
    assert!(decode(&h, &state(2, 256), 0, 2).is_err(), "queue 2 of 2");
    assert!(matches!(
        decode(&h, &state(1, 32768), 0, 2),
        Ok(Request::SetVringNum {
            index: 1,
            num: 32768
        })
    ));
}

#[test]
fn memory_tables_are_checked_region_by_region_and_pairwise() {
    let h = |p: &[u8]| header(FrontendReq::SET_MEM_TABLE, p.len());
    let ok = table(&[region(0, 0x1000, 0x10000), region(0x1000, 0x1000, 0x20000)]);
    assert!(decode(&h(&ok), &ok, 2, 1).is_ok());
    assert!(decode(&h(&ok), &ok, 1, 1).is_err(), "one fd missing");
    assert!(decode(&h(&ok), &ok, 3, 1).is_err(), "one fd extra");
    let gpa_overlap = table(&[region(0, 0x2000, 0x10000), region(0x1000, 0x1000, 0x20000)]);
    assert!(decode(&h(&gpa_overlap), &gpa_overlap, 2, 1).is_err());
    let va_overlap = table(&[region(0, 0x1000, 0x10000), region(0x1000, 0x1000, 0x10800)]);
    assert!(decode(&h(&va_overlap), &va_overlap, 2, 1).is_err());
    let zero = table(&[region(0, 0, 0x10000)]);
    assert!(decode(&h(&zero), &zero, 1, 1).is_err());
    let wrap = table(&[region(u64::MAX - 0xfff, 0x2000, 0x10000)]);
    assert!(decode(&h(&wrap), &wrap, 1, 1).is_err());
    let mut short = ok.clone();
    short.pop();
    assert!(decode(&h(&short), &short, 2, 1).is_err());
    let mut lying = ok.clone();
    lying[0] = 3; // claims three regions, carries two
    assert!(decode(&h(&lying), &lying, 3, 1).is_err());
}

#[test]
fn config_accesses_stay_in_range() {
    let cfg = |offset: u32, size: u32, data: usize| {
        let mut p = VhostUserConfig::new(
            offset,
            size,
            vhost::vhost_user::message::VhostUserConfigFlags::empty(),
        )
        .as_slice()
        .to_vec();
        p.extend(std::iter::repeat_n(0u8, data));
        p
    };
    let h = |p: &[u8]| header(FrontendReq::GET_CONFIG, p.len());
    let p = cfg(0, 60, 60);
    assert!(matches!(
        decode(&h(&p), &p, 0, 1),
        Ok(Request::GetConfig {
            offset: 0,
            size: 60
        })
    ));
    for p in [
        cfg(0, 0, 0),
        cfg(200, 100, 100),
        cfg(u32::MAX, 2, 2),
        cfg(0, 60, 10),
    ] {
        assert!(decode(&h(&p), &p, 0, 1).is_err());
    }
}

#[test]
fn reply_bits_and_unknown_requests_are_refused() {
    let mut h = header(FrontendReq::GET_FEATURES, 0);
    h.flags |= FLAG_REPLY;
    assert!(decode(&h, &[], 0, 1).is_err());
    h.flags = FLAG_VERSION_1 | 0x100;
    assert!(decode(&h, &[], 0, 1).is_err());
    let h = Header {
        request: 999,
        flags: FLAG_VERSION_1,
        size: 0,
    };
    assert!(matches!(decode(&h, &[], 0, 1), Err(DecodeError::Unknown)));
}

fn inflight_msg(size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    VhostUserInflight::new(size, offset, num_queues, queue_size)
        .as_slice()
        .to_vec()
}

#[test]
fn inflight_messages_are_sized_and_shaped() {
    assert_eq!(
        INFLIGHT_LEN, 24,
        "QEMU's VhostUserInflight, tail padding included"
    );
    assert_eq!(max_payload(FrontendReq::GET_INFLIGHT_FD as u32), 24);
    assert!(has_payload_reply(FrontendReq::GET_INFLIGHT_FD as u32));
    assert!(!has_payload_reply(FrontendReq::SET_INFLIGHT_FD as u32));

    let get = header(FrontendReq::GET_INFLIGHT_FD, 24);
    assert!(matches!(
        decode(&get, &inflight_msg(0, 0, 2, 128), 0, 2),
        Ok(Request::GetInflightFd {
            num_queues: 2,
            queue_size: 128
        })
    ));
    for (nq, qs, why) in [
        (0, 128, "no queues"),
        (3, 128, "more queues than the device"),
        (1, 0, "queue size 0"),
        (1, 96, "not a power of two"),
    ] {
        assert!(
            decode(&get, &inflight_msg(0, 0, nq, qs), 0, 2).is_err(),
            "{why}"
        );
    }
    assert!(
        decode(&get, &inflight_msg(0, 0, 1, 128), 1, 2).is_err(),
        "GET carries no fd"
    );
    assert!(decode(&header(FrontendReq::GET_INFLIGHT_FD, 20), &[0; 20], 0, 2).is_err());

    let set = header(FrontendReq::SET_INFLIGHT_FD, 24);
    let need = inflight::region_size(2, 128);
    assert!(matches!(
        decode(&set, &inflight_msg(need, 4096, 2, 128), 1, 2),
        Ok(Request::SetInflightFd {
            mmap_size,
            mmap_offset: 4096,
            num_queues: 2,
            queue_size: 128
        }) if mmap_size == need
    ));
    assert!(
        decode(&set, &inflight_msg(need, 0, 2, 128), 0, 2).is_err(),
        "no fd"
    );
    assert!(
        decode(&set, &inflight_msg(need, 0, 2, 128), 2, 2).is_err(),
        "two fds"
    );
    assert!(
        decode(&set, &inflight_msg(need - 1, 0, 2, 128), 1, 2).is_err(),
        "smaller than the layout"
    );
    assert!(
        decode(&set, &inflight_msg(need, 100, 2, 128), 1, 2).is_err(),
        "offset not page-aligned"
    );
    assert!(
        decode(&set, &inflight_msg(u64::MAX, 4096, 2, 128), 1, 2).is_err(),
        "offset + size overflows"
    );
}

fn log_msg(size: u64, offset: u64) -> Vec<u8> {
    let mut p = size.to_le_bytes().to_vec();
    p.extend_from_slice(&offset.to_le_bytes());
    p
}

#[test]
fn set_log_base_is_sized_bounded_and_carries_one_fd() {
    assert_eq!(max_payload(FrontendReq::SET_LOG_BASE as u32), 16);
    let h = header(FrontendReq::SET_LOG_BASE, 16);
    let ok = |p: &[u8], nfds| decode(&h, p, nfds, 1);
    assert!(matches!(
        ok(&log_msg(4096, 8192), 1),
        Ok(Request::SetLogBase {
            mmap_size: 4096,
            mmap_offset: 8192
        })
    ));
    assert!(matches!(
        ok(&log_msg(MAX_LOG_BYTES, 0), 1),
        Ok(Request::SetLogBase { .. })
    ));
    let refused = |p: &[u8], nfds| ok(p, nfds).err().expect("accepted");
    assert!(matches!(
        refused(&log_msg(4096, 0), 0),
        DecodeError::Fds { .. }
    ));
    assert!(matches!(
        refused(&log_msg(4096, 0), 2),
        DecodeError::Fds { .. }
    ));
    assert!(matches!(refused(&log_msg(0, 0), 1), DecodeError::Log(_)));
    assert!(matches!(
        refused(&log_msg(MAX_LOG_BYTES + 1, 0), 1),
        DecodeError::Log(_)
    ));
    assert!(matches!(
        refused(&log_msg(4096, 100), 1),
        DecodeError::Log(_)
    ));
    assert!(matches!(
        refused(&log_msg(4096, u64::MAX - 4095), 1),
        DecodeError::Log(_)
    ));
    // The pre-LOG_SHMFD u64 form.
    let short = header(FrontendReq::SET_LOG_BASE, 8);
    assert!(decode(&short, &[0; 8], 1, 1).is_err());
}

#[test]
fn vring_addresses_may_ask_for_the_used_ring_to_be_logged() {
    let h = header(FrontendReq::SET_VRING_ADDR, ADDR_LEN);
    let addr = |flags: u32, log: u64| {
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&flags.to_le_bytes());
        for a in [0x1000u64, 0x3000, 0x2000, log] {
            p.extend_from_slice(&a.to_le_bytes());
        }
        decode(&h, &p, 0, 1)
    };
    assert!(matches!(
        addr(1, 0x8000),
        Ok(Request::SetVringAddr {
            used_log: Some(0x8000),
            ..
        })
    ));
    // Without the flag the log address is ignored.
    assert!(matches!(
        addr(0, 3),
        Ok(Request::SetVringAddr { used_log: None, .. })
    ));
    assert!(addr(1, 0x8002).is_err(), "misaligned used ring log");
    assert!(addr(2, 0).is_err(), "unknown flag");
}

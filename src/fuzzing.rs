//! Entry points for the fuzz targets under `fuzz/` (not an API): each takes
//! arbitrary bytes and drives one layer that parses hostile input, checking
//! what must hold whatever the input. Kept here so the targets need nothing
//! else of the crate to be public.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::json_stream::{Piece, Splitter};
use crate::control::server::{self, Monitor, Sections};
use crate::graph::{open_null, Node};
use crate::state::DaemonState;
use crate::vhost::blk::chain;
use crate::vhost::blk::config::{seg_max_for, SIZE_MAX};
use crate::vhost::blk::request::{self, Limits, Op, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK};
use crate::vhost::memory::GuestRam;

/// Guest memory of the request target: two adjacent regions (buffers may
/// span them) and one apart, filled from the input; the descriptor table
/// is at guest address 0.
const REGIONS: [(u64, usize); 3] = [(0, 0x4000), (0x4000, 0x4000), (0x10000, 0x1000)];

/// Input bytes of the request target before guest memory: a flags byte
/// (bit 0: indirect descriptors negotiated, bit 1: 4 KiB blocks, bits 2-5:
/// log2 of the queue size), the head index (2 bytes, little endian).
const PARAMS: usize = 3;

/// Walk a descriptor chain in guest memory built from `data` and parse it
/// as a virtio-blk request, as a queue does; then use the result as the
/// queue would (copy into or out of the data buffers, write the status).
/// Returns the status given, or None if the chain itself was refused.
pub fn virtio_blk_request(data: &[u8]) -> Option<u8> {
    if data.len() < PARAMS {
        return None;
    }
    let (params, image) = data.split_at(PARAMS);
    let Ok(mmap) = GuestMemoryMmap::from_ranges(
        &REGIONS
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l))
            .collect::<Vec<_>>(),
    ) else {
        return None;
    };
    let mut rest = image;
    for &(gpa, len) in &REGIONS {
        let n = rest.len().min(len);
        if mmap.write_slice(&rest[..n], GuestAddress(gpa)).is_err() {
            return None;
        }
        rest = &rest[n..];
    }
    let mem = std::rc::Rc::new(GuestRam::new(mmap));
    let queue_size = 1u16 << (1 + (params[0] >> 2) % 15);
    let head = u16::from_le_bytes([params[1], params[2]]);
    let limits = Limits {
        block_size: if params[0] & 2 != 0 { 4096 } else { 512 },
        size_max: SIZE_MAX,
        seg_max: seg_max_for(queue_size),
        max_discard_sectors: 1 << 16,
        max_write_zeroes_sectors: 1 << 16,
        max_segments: 1,
        serial: *b"fuzz-serial-00000000",
    };
    let max_descs = limits.seg_max as usize + 2;
    let walked = chain::walk(
        &mem,
        GuestAddress(0),
        queue_size,
        head,
        params[0] & 1 != 0,
        max_descs,
    );
    let c = walked.ok()?;
    assert!(
        c.readable.len() + c.writable.len() <= max_descs + 1,
        "a chain keeps at most max_descs buffers"
    );
    let (req, action) = request::parse(mem, &c, &limits);
    let status = match action {
        Err(reject) => reject.status,
        Ok(op) => {
            let cap = limits.seg_max as u64 * limits.size_max as u64;
            match &op {
                Op::Read { data, .. } => {
                    assert!(data.len() as u64 <= cap && data.len() as u32 == req.data_written);
                    data.fill_zero();
                }
                Op::Write { data, .. } => {
                    assert!(data.len() as u64 <= cap);
                    let mut out = vec![0u8; data.len()];
                    data.copy_to(&mut out);
                }
                Op::GetId { data } => {
                    assert!(data.len() <= VIRTIO_BLK_ID_BYTES);
                    data.copy_from(&limits.serial);
                }
                Op::Flush | Op::Discard { .. } | Op::WriteZeroes { .. } => {}
            }
            VIRTIO_BLK_S_OK
        }
    };
    let used = req.finish(status);
    assert!(used <= req.data_written.saturating_add(1));
    Some(status)
}

/// What the QMP target works on: a daemon without exports, one iothread,
/// and one `null` node (`null0`) that node-name commands can reach.
fn qmp_daemon() -> &'static (Arc<Monitor>, Arc<Node>) {
    static DAEMON: OnceLock<(Arc<Monitor>, Arc<Node>)> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let state = DaemonState::new();
        state
            .add_iothread("fuzz-qmp", Duration::ZERO)
            .expect("an iothread for the QMP target");
        let null = open_null(state.graph(), 1 << 20);
        (Monitor::new(state, || {}), null)
    })
}

/// Commands that open host files or bind sockets: the fuzzer must not
/// open the machine's disks or litter it with sockets.
const UNFUZZED: [&str; 2] = ["blockdev-add", "block-export-add"];

fn unfuzzed(text: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(text).is_ok_and(|v| {
        v.get("execute")
            .and_then(|e| e.as_str())
            .is_some_and(|e| UNFUZZED.contains(&e))
    })
}

/// Feed `data` to one QMP client as if it arrived on the socket: split it
/// into JSON texts and answer each (negotiation, argument checks, command
/// dispatch). If the first byte is odd the client starts negotiated.
pub fn qmp_input(data: &[u8]) {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let (mon, _null) = qmp_daemon();
    let negotiated = AtomicBool::new(first & 1 == 1);
    let mut sections = Sections::default();
    let mut splitter = Splitter::default();
    let mut pieces = Vec::new();
    // Arrive in pieces, as reads from a socket do.
    for part in input.chunks(((first >> 1) as usize).max(1) * 16) {
        splitter.feed(part, &mut pieces);
    }
    for piece in pieces {
        if let Piece::Text(t) = piece {
            if unfuzzed(&t) {
                continue;
            }
            let (reply, _quit) = server::respond(mon, &negotiated, &mut sections, &t, 0);
            let reply: serde_json::Value =
                serde_json::from_str(&reply).expect("every reply is JSON");
            assert!(reply.get("return").is_some() || reply.get("error").is_some());
        }
    }
    // A client that goes away ends the drained sections it left open.
    sections.end_all();
}

/// One vhost-user frame as it arrives on the socket (header, then payload),
/// preceded by a byte giving the fds attached (low 5 bits) and the queues
/// the device has (1 + the high 3 bits): the header check and the decoder,
/// as a session runs them. Returns whether the request was accepted.
pub fn vhost_user_msg(data: &[u8]) -> bool {
    use crate::vhost::message::{decode, parse_header, HEADER_LEN};
    let Some((&params, frame)) = data.split_first() else {
        return false;
    };
    let Some((raw, payload)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return false;
    };
    let Ok(header) = parse_header(raw) else {
        return false;
    };
    // The socket reads exactly `size` bytes; a shorter frame is truncated.
    let Some(payload) = payload.get(..header.size as usize) else {
        return false;
    };
    let (nfds, num_queues) = ((params & 0x1f) as usize, 1 + (params >> 5) as usize);
    decode(&header, payload, nfds, num_queues).is_ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The committed seeds run clean through their targets (a quick check
    /// that needs no fuzzer).
    fn run_seeds<T>(target: &str, f: fn(&[u8]) -> T) -> Vec<(String, T)> {
        let mut out = Vec::new();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                out.push((name, f(&std::fs::read(&p).unwrap())));
            }
        }
        assert!(!out.is_empty(), "no seeds in {}", dir.display());
        out
    }

    #[test]
    fn virtio_blk_request_seeds() {
        // Seeds mirror real drivers' requests; bad-* ones must be refused.
        for (name, status) in run_seeds("virtio_blk_request", super::virtio_blk_request) {
            let want = if name.starts_with("seed-bad-") {
                crate::vhost::blk::request::VIRTIO_BLK_S_IOERR
            } else {
                super::VIRTIO_BLK_S_OK
            };
            assert_eq!(status, Some(want), "{name}");
        }
    }

    #[test]
    fn qmp_input_seeds() {
        run_seeds("qmp_input", super::qmp_input);
    }

    #[test]
    fn vhost_user_msg_seeds() {
        // Every seed was recorded from a real frontend (libblkio, QEMU).
        for (name, accepted) in run_seeds("vhost_user_msg", super::vhost_user_msg) {
            assert!(accepted, "{name}");
        }
    }
}

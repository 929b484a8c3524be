//! The device side of vhost-user, serving a virtio-blk device.

pub mod blk;
pub mod memory;
pub(crate) mod message;
pub mod ratelimit;
pub mod server;
pub mod session;
pub mod socket;

/// Fuzzing entry point: `data` is one frame as it arrives on the socket
/// (header, then payload), preceded by one byte giving the number of fds
/// attached. Runs the header check and the decoder; returns whether the
/// request was accepted. Not an API.
#[doc(hidden)]
pub fn fuzz_decode_frame(data: &[u8]) -> bool {
    let Some((&nfds, frame)) = data.split_first() else {
        return false;
    };
    let Some((raw, payload)) = frame.split_first_chunk::<{ message::HEADER_LEN }>() else {
        return false;
    };
    let Ok(header) = message::parse_header(raw) else {
        return false;
    };
    // The socket reads exactly `size` bytes; a shorter frame is truncated.
    let Some(payload) = payload.get(..header.size as usize) else {
        return false;
    };
    let num_queues = 1 + (nfds as usize >> 5);
    message::decode(&header, payload, (nfds & 0x1f) as usize, num_queues).is_ok()
}

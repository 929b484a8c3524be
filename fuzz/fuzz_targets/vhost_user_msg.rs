//! Arbitrary bytes as one vhost-user frame (a leading fd-count byte, then
//! header and payload) through the daemon's header check and decoder. A
//! panic, hang or large allocation is a bug; refusals are the expected
//! outcome for garbage.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringblk::fuzzing::vhost_user_msg(data);
});

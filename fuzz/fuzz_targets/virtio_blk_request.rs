//! Arbitrary bytes as guest memory holding a descriptor table (plus a few
//! parameter bytes): walk the chain and parse it as a virtio-blk request,
//! then use the result as a queue would. Any panic or huge allocation is a
//! bug; refusing the request is the expected outcome for garbage.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringblk::fuzzing::virtio_blk_request(data);
});

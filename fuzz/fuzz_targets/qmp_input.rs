//! Arbitrary bytes as what one QMP client sends: framing, JSON, request
//! shape, negotiation, argument checks and command dispatch against a
//! daemon with one null node. Any panic or hang is a bug; error replies
//! are the expected outcome for garbage.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ringblk::fuzzing::qmp_input(data));

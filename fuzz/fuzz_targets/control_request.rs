//! Arbitrary bytes sent on a control-socket connection. The body is `lc_fuzz_common::control_request` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/control_request/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::control_request(data));

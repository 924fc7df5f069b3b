//! Arbitrary bytes as a TCMU command ring fetched by the handler's ring. The body is `lc_fuzz_common::ring_entry` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/ring_entry/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::ring_entry(data));

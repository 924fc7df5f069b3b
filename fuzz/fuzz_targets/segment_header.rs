//! Arbitrary bytes as segment-header copies and a checkpoint header. The body is `lc_fuzz_common::segment_header` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/segment_header/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::segment_header(data));

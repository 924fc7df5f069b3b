//! Arbitrary bytes as lc.toml. The body is `lc_fuzz_common::config` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/config/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::config(data));

//! Arbitrary bytes as a cache superblock copy. The body is `lc_fuzz_common::superblock` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/superblock/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::superblock(data));

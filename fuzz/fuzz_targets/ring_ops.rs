//! Sequences of ring operations between the kernel emulator and the handler's ring.
//! The body is `lc_fuzz_common::ring_ops` (fuzz/common), which `cargo test` also runs
//! over the seeds in fuzz/seeds/ring_ops/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::ring_ops(data));

//! Arbitrary CDB + Data-Out through the SCSI emulation over an in-memory disk. The body is `lc_fuzz_common::scsi_cdb` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/scsi_cdb/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::scsi_cdb(data));

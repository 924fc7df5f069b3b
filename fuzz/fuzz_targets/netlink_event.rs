//! Arbitrary bytes as a TCMU netlink datagram and genl payload. The body is `lc_fuzz_common::netlink_event` (fuzz/common), which
//! `cargo test` also runs over the seeds in fuzz/seeds/netlink_event/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lc_fuzz_common::netlink_event(data));

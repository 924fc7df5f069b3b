//! Arbitrary bytes as a TCMU ring (mailbox head + entries) fed to the ring parser:
//! it must refuse or accept, never read outside the mapping or panic.
#![no_main]

use std::os::fd::AsFd;

use libfuzzer_sys::fuzz_target;
use lc::ring::Ring;
use lc::shm::{memfd, SharedMap};

const RING: u32 = 4096;
const MAP: usize = 128 + RING as usize + 8192;

fuzz_target!(|data: &[u8]| {
    let fd = memfd("fuzz", MAP as u64).unwrap();
    let map = SharedMap::map(fd.as_fd(), MAP).unwrap();
    map.write_u16(0, 2).unwrap();
    map.write_u16(2, 0xf).unwrap();
    map.write_u32(4, 128).unwrap();
    map.write_u32(8, RING).unwrap();
    let n = data.len().min(RING as usize);
    map.write(128, &data[..n]).unwrap();
    // Head: an 8-aligned offset taken from the input.
    let head = data.first().map_or(0, |&b| (b as u32 * 8) % RING);
    map.write_u32(12, head).unwrap();
    let view = SharedMap::map(fd.as_fd(), MAP).unwrap();
    if let Ok(mut ring) = Ring::new(view) {
        if let Ok(entries) = ring.fetch() {
            for e in entries {
                if let lc::ring::Fetched::Cmd(c) = e {
                    let _ = ring.gather(&c.iovs);
                    let _ = ring.complete(c.cmd_id, lc::ring::Response { status: 0, sense: vec![], read_len: None });
                }
            }
            let _ = ring.publish();
        }
    }
});

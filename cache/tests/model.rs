//! Model-based randomized tests: random sequences of writes (aligned, partial,
//! multi-line; half from scattered pieces), reads (half into scattered pieces, half of
//! whole lines, so misses are promoted into the cache as clean lines), flushes, FUA
//! writes, discards, drains and tunable changes on several backing devices that start
//! with random data, compared after every read with plain in-memory disks; the
//! per-segment and dirty line counts are checked after every step. Requests often
//! continue where the device's last one ended, so writes past `sequential_cutoff` go
//! around the cache (write-around); the bytes that did are counted over every case.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use lc_cache::{BlockDevice, MemDevice};
use rand::Rng;

/// Lines promoted by reads, over every case (the tests run in parallel: shared).
static PROMOTED: AtomicU64 = AtomicU64::new(0);
/// Bytes written around the cache, over every case.
static BYPASSED: AtomicU64 = AtomicU64::new(0);

struct Case {
    block: u64,
    backing_size: u64,
}

/// Runs one case; returns how many writes and reads the non-blocking calls served.
fn run_case(seed: u64, ops: usize) -> (u64, u64) {
    let mut rng = rng(seed);
    let mut inline_served = (0u64, 0u64);
    let block_size = if rng.gen_bool(0.5) { 512 } else { 4096 };
    let seg = 64 << 10;
    let slots = rng.gen_range(3..12u64);
    let case = Case {
        block: block_size as u64,
        backing_size: rng.gen_range(16..96u64) * 4096,
    };
    let cache = mem_cache(seg * (slots + 1), block_size, seg as u32);
    let ndev = rng.gen_range(1..=3);
    // Random initial content: a promoted line that is stale or misplaced shows.
    let mut model: Vec<Vec<u8>> = (0..ndev)
        .map(|_| (0..case.backing_size).map(|_| rng.gen()).collect())
        .collect();
    let devs: Vec<Arc<dyn BlockDevice>> = model
        .iter()
        .map(|m| Arc::new(MemDevice::from_bytes(m.clone(), "mem")) as Arc<dyn BlockDevice>)
        .collect();
    let mut c = open(
        cache.clone(),
        &devs,
        random_tunables(&mut rng),
        rng.gen_range(2..5),
    );
    let max_blocks = case.backing_size / case.block;
    // Where each device's last request ended: requests often continue there, so
    // sequential streams pass `sequential_cutoff` (writes go around the cache).
    let mut ends = vec![0u64; ndev];
    for step in 0..ops {
        let dev = rng.gen_range(0..ndev);
        let cap = if rng.gen_bool(0.8) { 4 } else { 40 };
        let blocks = rng.gen_range(1..=max_blocks.min(cap));
        let start = request_start(&mut rng, &mut ends[dev], blocks, max_blocks);
        let (mut off, mut len) = (start * case.block, blocks * case.block);
        let ctx = format!("seed {seed} step {step} dev {dev} off {off} len {len}");
        match rng.gen_range(0..100) {
            0..=44 => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let fua = rng.gen_bool(0.1);
                // Half the plain writes take the non-blocking path first, as the
                // daemon's event loop does, and fall back to the blocking one.
                let inline = !fua && rng.gen_bool(0.5);
                // Half of them from scattered pieces (lines and sectors split anywhere).
                let cuts = if rng.gen_bool(0.5) {
                    random_cuts(&mut rng, data.len())
                } else {
                    Vec::new()
                };
                let parts = pieces(&data, &cuts);
                match inline
                    .then(|| c.try_write_vectored(dev as u8, off, &parts))
                    .flatten()
                {
                    Some(r) => {
                        r.expect(&ctx);
                        inline_served.0 += 1;
                    }
                    None if cuts.is_empty() => c.write(dev as u8, off, &data, fua).expect(&ctx),
                    None => c.write_vectored(dev as u8, off, &parts, fua).expect(&ctx),
                }
                model[dev][off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            45..=79 => {
                if rng.gen_bool(0.5) {
                    // Whole lines (misses promote them).
                    let lines = case.backing_size / 4096;
                    let n = rng.gen_range(1..=lines.min(if cap == 4 { 2 } else { 12 }));
                    off = rng.gen_range(0..=lines - n) * 4096;
                    len = n * 4096;
                }
                let ctx = format!("seed {seed} step {step} dev {dev} off {off} len {len}");
                let mut buf = vec![0u8; len as usize];
                let cuts = if rng.gen_bool(0.5) {
                    random_cuts(&mut rng, buf.len())
                } else {
                    Vec::new()
                };
                let inline = rng.gen_bool(0.5);
                let mut parts = pieces_mut(&mut buf, &cuts);
                match inline
                    .then(|| c.try_read_vectored(dev as u8, off, &mut parts))
                    .flatten()
                {
                    Some(r) => {
                        r.expect(&ctx);
                        inline_served.1 += 1;
                    }
                    None => c.read_vectored(dev as u8, off, &mut parts).expect(&ctx),
                }
                assert!(
                    buf == model[dev][off as usize..(off + len) as usize],
                    "read mismatch: {ctx}"
                );
            }
            80..=85 => c.flush().expect(&ctx),
            86..=90 => {
                c.discard(dev as u8, off, len).expect(&ctx);
                model[dev][off as usize..(off + len) as usize].fill(0);
            }
            91..=92 => {
                c.drain(dev as u8, &mut |_| {}).expect(&ctx);
                assert_eq!(c.stats().dirty_lines[dev].1, 0, "{ctx}");
            }
            93..=95 => {
                let t = random_tunables(&mut rng);
                for (k, v) in t.list() {
                    c.set_tunable(k, &v).expect(&ctx);
                }
            }
            96..=97 => c.seal_now().expect(&ctx),
            _ => {
                // Clean close and reopen: recovery of a cleanly closed cache.
                PROMOTED.fetch_add(c.stats().promoted_lines, Ordering::Relaxed);
                BYPASSED.fetch_add(c.stats().bypassed_bytes, Ordering::Relaxed);
                c.close().expect(&ctx);
                c = open(
                    cache.clone(),
                    &devs,
                    random_tunables(&mut rng),
                    rng.gen_range(2..5),
                );
            }
        }
        c.check_line_counts()
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
    }
    // Everything reads back, then after a full drain the backing devices alone hold it.
    for (dev, m) in model.iter().enumerate() {
        let mut buf = vec![0u8; case.backing_size as usize];
        c.read(dev as u8, 0, &mut buf).unwrap();
        assert!(buf == *m, "seed {seed}: final read of dev {dev}");
        c.drain(dev as u8, &mut |_| {}).unwrap();
    }
    PROMOTED.fetch_add(c.stats().promoted_lines, Ordering::Relaxed);
    BYPASSED.fetch_add(c.stats().bypassed_bytes, Ordering::Relaxed);
    c.close().unwrap();
    for (dev, m) in model.iter().enumerate() {
        let mut buf = vec![0u8; case.backing_size as usize];
        devs[dev].read_at(&mut buf, 0).unwrap();
        assert!(buf == *m, "seed {seed}: backing device {dev} after drain");
    }
    inline_served
}

/// The non-blocking calls must actually serve requests, or the model test above
/// checks nothing of them.
fn assert_inline_served(served: (u64, u64)) {
    assert!(
        served.0 > 0 && served.1 > 0,
        "try_write served {}, try_read served {}",
        served.0,
        served.1
    );
    assert!(
        PROMOTED.load(Ordering::Relaxed) > 0,
        "no read miss was promoted"
    );
    assert!(
        BYPASSED.load(Ordering::Relaxed) > 0,
        "no write went around the cache"
    );
}

#[test]
fn engine_matches_reference_disks_under_random_operations() {
    let base = seed("model");
    let n = cases(400);
    let mut served = (0, 0);
    for i in 0..n as u64 {
        let s = run_case(base.wrapping_add(i), 150);
        served = (served.0 + s.0, served.1 + s.1);
    }
    assert_inline_served(served);
}

#[test]
fn long_sequences_wrap_the_ring_many_times() {
    let base = seed("model-long");
    let mut served = (0, 0);
    for i in 0..cases(400) as u64 / 40 {
        let s = run_case(base.wrapping_add(i), 3000);
        served = (served.0 + s.0, served.1 + s.1);
    }
    assert_inline_served(served);
}

//! Read caching: whole lines a READ serves from the backing device are promoted into
//! the cache as clean copies. A promoted line reads from the cache; writes and discards
//! over it read their new data; writeback never writes it and the cleaner never moves
//! it; it is not dirty data; a promotion that raced a write, a discard or a writeback
//! is not inserted; clean lines survive a restart from a checkpoint or a replay.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lc_cache::stats::counter_index;
use lc_cache::{BlockDevice, Cache, Tunables};
use rand::Rng;

const SEG: u64 = 64 << 10; // 15 lines per segment
const LINE: u64 = 4096;

fn random_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = rng(seed);
    (0..len).map(|_| rng.gen()).collect()
}

fn tunables() -> Tunables {
    Tunables {
        writeback_enabled: false,
        flush_interval_s: 0,
        read_promote_threshold: 1,
        ..Tunables::default()
    }
}

/// A cache of `slots` segments over one backing device of `lines` random lines.
fn setup(slots: u64, lines: u64, t: Tunables) -> (Cache, Arc<Gated>, Vec<u8>) {
    let cache = mem_cache(SEG * (slots + 1), 512, SEG as u32);
    let data = random_bytes(lines, lines * LINE);
    let b = Gated::new(data.clone());
    let devs: Vec<Arc<dyn BlockDevice>> = vec![b.clone()];
    (open(cache, &devs, t, 4), b, data)
}

fn read(c: &Cache, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    c.read(0, off, &mut buf).unwrap();
    buf
}

/// Starts `read(c, off, len)` on a thread whose backing read `b` holds (until
/// `b.release()`); returns once the read is held there.
fn held_read(c: &Arc<Cache>, b: &Gated, off: u64, len: u64) -> std::thread::JoinHandle<Vec<u8>> {
    b.hold_next_read();
    let c = c.clone();
    let reader = std::thread::spawn(move || read(&c, off, len));
    b.wait_held();
    reader
}

/// Read hits of whole lines (in RAM or on the cache device).
fn full_read_hits(c: &Cache) -> u64 {
    let s = c.stats();
    s.counters[counter_index(false, true, true, true)]
        + s.counters[counter_index(false, true, false, true)]
}

fn dirty(c: &Cache) -> u64 {
    c.stats().dirty_lines[0].1
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_read_miss_is_promoted_and_the_next_read_hits() {
    let (c, _b, data) = setup(8, 16, tunables());
    assert_eq!(read(&c, 0, 4 * LINE), data[..4 * LINE as usize]);
    let s = c.stats();
    assert_eq!(s.promoted_lines, 4);
    assert_eq!(s.device_promoted_lines, vec![(0, 4)]);
    assert_eq!(s.index_entries, 4);
    assert_eq!(dirty(&c), 0, "clean copies are not dirty");
    assert_eq!(full_read_hits(&c), 0);
    // From the open segment's buffer, then from the cache device.
    assert_eq!(read(&c, 0, 4 * LINE), data[..4 * LINE as usize]);
    assert_eq!(full_read_hits(&c), 4);
    c.seal_now().unwrap();
    assert_eq!(
        read(&c, LINE, 2 * LINE),
        data[LINE as usize..3 * LINE as usize]
    );
    assert_eq!(full_read_hits(&c), 6);
    assert_eq!(c.stats().promoted_lines, 4, "hits are not promoted again");
    // A partial line is not promoted.
    let mut buf = vec![0u8; 512];
    c.read(0, 5 * LINE + 512, &mut buf).unwrap();
    assert_eq!(
        buf,
        data[(5 * LINE + 512) as usize..(5 * LINE + 1024) as usize]
    );
    assert_eq!(c.stats().promoted_lines, 4);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

#[test]
fn promotion_off_and_the_miss_threshold() {
    let mut t = tunables();
    t.read_promote_threshold = 0;
    let (c, _b, data) = setup(8, 16, t);
    read(&c, 0, 4 * LINE);
    assert_eq!(c.stats().promoted_lines, 0);
    c.set_tunable("read_promote_threshold", "3").unwrap();
    for n in 1..=3 {
        assert_eq!(read(&c, 0, 2 * LINE), data[..2 * LINE as usize]);
        let want = if n < 3 { 0 } else { 2 };
        assert_eq!(c.stats().promoted_lines, want, "after miss {n}");
    }
    c.close().unwrap();
}

#[test]
fn reads_continuing_a_long_sequential_stream_are_not_promoted() {
    let mut t = tunables();
    t.sequential_cutoff = 8 * LINE;
    let (c, _b, _) = setup(8, 32, t);
    for l in 0..16 {
        read(&c, l * LINE, LINE);
    }
    assert_eq!(
        c.stats().promoted_lines,
        8,
        "the first 8 lines of the stream only"
    );
    // A random read is promoted again.
    read(&c, 20 * LINE, LINE);
    assert_eq!(c.stats().promoted_lines, 9);
    c.set_tunable("sequential_cutoff", "0").unwrap();
    for l in 21..32 {
        read(&c, l * LINE, LINE);
    }
    assert_eq!(c.stats().promoted_lines, 20, "no cutoff");
    c.close().unwrap();
}

#[test]
fn writes_over_promoted_lines_read_the_new_data() {
    let (c, _b, mut data) = setup(8, 16, tunables());
    read(&c, 0, 8 * LINE);
    // In the open segment (overwritten in place) and, after a seal, on the cache
    // device (a new copy, merging the clean one for a partial write).
    for (round, base) in [(0u64, 0u64), (1, 4)] {
        if round == 1 {
            c.seal_now().unwrap();
        }
        let full = random_bytes(100 + round, LINE);
        c.write(0, base * LINE, &full, false).unwrap();
        data[(base * LINE) as usize..((base + 1) * LINE) as usize].copy_from_slice(&full);
        let part = random_bytes(200 + round, 1024);
        let off = (base + 1) * LINE + 1536;
        c.write(0, off, &part, false).unwrap();
        data[off as usize..off as usize + 1024].copy_from_slice(&part);
        assert_eq!(
            dirty(&c),
            2 * (round + 1),
            "each write over a clean copy adds one"
        );
        assert_eq!(
            read(&c, 0, 8 * LINE),
            data[..8 * LINE as usize],
            "round {round}"
        );
        c.check_line_counts().unwrap();
    }
    // Written back, the data is the backing device's.
    c.set_tunable("writeback_force", "true").unwrap();
    c.drain(0, &mut |_| {}).unwrap();
    assert_eq!(dirty(&c), 0);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

#[test]
fn a_discard_drops_a_promoted_line() {
    let (c, b, mut data) = setup(8, 16, tunables());
    read(&c, 0, 4 * LINE);
    c.discard(0, LINE, 2 * LINE).unwrap();
    data[LINE as usize..3 * LINE as usize].fill(0);
    assert_eq!(read(&c, 0, 4 * LINE), data[..4 * LINE as usize]);
    assert_eq!(dirty(&c), 2, "two discard records");
    assert_eq!(b.bytes(LINE, 2 * LINE), vec![0u8; 2 * LINE as usize]);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

#[test]
fn writeback_never_writes_a_clean_line() {
    let (c, b, data) = setup(8, 64, tunables());
    read(&c, 0, 40 * LINE);
    c.write(0, 50 * LINE, &[7u8; 4096], false).unwrap();
    c.seal_now().unwrap();
    let s = c.stats();
    assert_eq!((s.promoted_lines, dirty(&c)), (40, 1));
    c.set_tunable("writeback_force", "true").unwrap();
    wait_for("writeback of every segment", || {
        let s = c.stats();
        s.last_writeback_id == s.last_flushed_id && s.index_entries == 0
    });
    let s = c.stats();
    assert_eq!(b.writes.load(Ordering::Relaxed), 1, "only the dirty line");
    assert_eq!(s.backing_bytes_written, LINE);
    assert_eq!(s.written_back_lines, 1);
    assert_eq!(dirty(&c), 0);
    assert_eq!(read(&c, 0, 40 * LINE), data[..40 * LINE as usize]);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

#[test]
fn the_cleaner_drops_clean_lines_without_copying_or_writing_them_back() {
    // Reads of a device much larger than the log promote line after line while a small
    // set of dirty lines is rewritten: the log wraps many times, every clean line is
    // dropped for free, the dirty ones are moved, and the backing device gets only the
    // few dirty lines writeback takes.
    let seed = seed("readcache-cleaner");
    let mut rng = rng(seed);
    let slots = 16u64;
    let lines = 2000u64;
    let mut t = tunables();
    t.sequential_cutoff = 0;
    let (c, b, mut data) = setup(slots, lines, t);
    let mut serial = 0u8;
    for _ in 0..3000 {
        let l = rng.gen_range(8..lines);
        assert_eq!(
            read(&c, l * LINE, LINE),
            data[(l * LINE) as usize..((l + 1) * LINE) as usize],
            "seed {seed}"
        );
        if rng.gen_bool(0.1) {
            serial = serial.wrapping_add(1);
            let w = rng.gen_range(0..8u64);
            let buf = vec![serial; LINE as usize];
            c.write(0, w * LINE, &buf, false).unwrap();
            data[(w * LINE) as usize..((w + 1) * LINE) as usize].copy_from_slice(&buf);
        }
    }
    let s = c.stats();
    assert!(
        s.promoted_lines > 3 * slots * 15,
        "seed {seed}: the log did not wrap with promotions: {s:?}"
    );
    // Writeback may still take a tail segment now and then (a writer waiting for
    // space while the cleaner waits for a release): only dirty lines reach the
    // backing device, every one a full line.
    assert_eq!(
        s.backing_bytes_written,
        s.written_back_lines * LINE,
        "seed {seed}: {s:?}"
    );
    assert!(
        s.written_back_lines * 20 < s.promoted_lines,
        "seed {seed}: {s:?}"
    );
    assert!(
        b.writes.load(Ordering::Relaxed) <= s.written_back_lines,
        "seed {seed}: {s:?}"
    );
    assert_eq!(read(&c, 0, lines * LINE), data, "seed {seed}");
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

#[test]
fn a_promotion_racing_a_write_is_not_inserted() {
    for partial in [false, true] {
        let (c, b, mut data) = setup(8, 16, tunables());
        let c = Arc::new(c);
        let reader = held_read(&c, &b, 2 * LINE, LINE);
        // The write lands between the read's plan and its promotion.
        let (off, len) = if partial {
            (2 * LINE + 512, 512)
        } else {
            (2 * LINE, LINE)
        };
        let new = random_bytes(9, len);
        c.write(0, off, &new, false).unwrap();
        b.release();
        let old = reader.join().unwrap();
        assert_eq!(old, data[2 * LINE as usize..3 * LINE as usize]);
        data[off as usize..(off + len) as usize].copy_from_slice(&new);
        assert_eq!(c.stats().promoted_lines, 0);
        assert_eq!(read(&c, 0, 4 * LINE), data[..4 * LINE as usize]);
        assert_eq!(dirty(&c), 1);
        c.check_line_counts().unwrap();
    }
}

#[test]
fn a_promotion_racing_a_discard_of_the_uncached_line_is_not_inserted() {
    let (c, b, mut data) = setup(8, 16, tunables());
    let c = Arc::new(c);
    let reader = held_read(&c, &b, 2 * LINE, LINE);
    // The line has no entry: the discard goes to the backing device alone.
    c.discard(0, 2 * LINE, LINE).unwrap();
    assert_eq!(dirty(&c), 0);
    b.release();
    reader.join().unwrap();
    data[2 * LINE as usize..3 * LINE as usize].fill(0);
    assert_eq!(
        c.stats().promoted_lines,
        0,
        "the read's old data is not cached"
    );
    assert_eq!(read(&c, 0, 4 * LINE), data[..4 * LINE as usize]);
}

#[test]
fn a_promotion_racing_a_writeback_is_not_inserted() {
    let (c, b, mut data) = setup(8, 16, tunables());
    let c = Arc::new(c);
    let reader = held_read(&c, &b, 2 * LINE, LINE);
    // Written, written back and dropped from the index while the read holds old data.
    let new = random_bytes(11, LINE);
    c.write(0, 2 * LINE, &new, false).unwrap();
    data[2 * LINE as usize..3 * LINE as usize].copy_from_slice(&new);
    c.drain(0, &mut |_| {}).unwrap();
    wait_for("the written-back line leaves the index", || {
        c.stats().index_entries == 0
    });
    b.release();
    reader.join().unwrap();
    assert_eq!(
        c.stats().promoted_lines,
        0,
        "the read's old data is not cached"
    );
    assert_eq!(read(&c, 0, 4 * LINE), data[..4 * LINE as usize]);
}

#[test]
fn drain_and_detach_ignore_clean_lines() {
    let (c, _b, _) = setup(8, 32, tunables());
    c.write(0, 0, &[1u8; 4096], false).unwrap();
    read(&c, LINE, 20 * LINE);
    assert_eq!(dirty(&c), 1);
    let mut last = None;
    c.drain(0, &mut |p| last = Some(p)).unwrap();
    assert_eq!(last.map(|p| p.remaining), Some(0));
    assert_eq!(dirty(&c), 0);
    // Promoted after the drain: the device has clean lines only and detaches.
    read(&c, 21 * LINE, 4 * LINE);
    assert!(c.stats().index_entries >= 4);
    c.check_line_counts().unwrap();
    c.detach_backing(0).unwrap();
    assert_eq!(c.stats().index_entries, 0, "its clean lines went with it");
    c.close().unwrap();
}

#[test]
fn clean_lines_survive_a_restart_from_a_checkpoint_or_a_replay() {
    for checkpoints in [true, false] {
        let cache = mem_cache(SEG * 9, 512, SEG as u32);
        let data = random_bytes(5, 32 * LINE);
        let b = Gated::new(data.clone());
        let devs: Vec<Arc<dyn BlockDevice>> = vec![b.clone()];
        let mut t = tunables();
        t.checkpoint_interval_segments = if checkpoints { 256 } else { 0 };
        let c = open(cache.clone(), &devs, t.clone(), 4);
        c.write(0, 0, &[3u8; 4096], false).unwrap();
        read(&c, LINE, 20 * LINE);
        // Stopped as a crash would stop it (a clean stop may write everything back),
        // after a checkpoint or with every segment durable.
        if checkpoints {
            assert!(c.checkpoint().unwrap());
        } else {
            c.seal_now().unwrap();
        }
        c.kill();
        let c = open(cache, &devs, t, 4);
        let s = c.stats();
        assert_eq!(s.index_entries, 21, "checkpoints {checkpoints}");
        assert_eq!(dirty(&c), 1, "checkpoints {checkpoints}");
        let mut want = data.clone();
        want[..4096].fill(3);
        assert_eq!(read(&c, 0, 32 * LINE), want);
        assert!(full_read_hits(&c) >= 21, "served from the cache");
        c.check_line_counts().unwrap();
        c.close().unwrap();
    }
}

#[test]
fn no_promotion_until_a_discard_is_durable_on_the_backing_device() {
    // Until the backing device is flushed a crash could undo the discard there, while
    // a clean copy of its zeros outlived it in the log: the line would read zeros
    // after the crash, then the old data once the copy is dropped.
    let (c, b, _) = setup(8, 16, tunables());
    // The writeback thread flushes a device with unflushed changes when idle: held
    // here, so the discard stays undurable until the flush below.
    b.hold_next_flush();
    c.discard(0, 0, 4 * LINE).unwrap();
    assert_eq!(read(&c, 0, 4 * LINE), vec![0u8; 4 * LINE as usize]);
    assert_eq!(c.stats().promoted_lines, 0);
    b.release();
    c.flush().unwrap();
    assert_eq!(read(&c, 0, 4 * LINE), vec![0u8; 4 * LINE as usize]);
    assert_eq!(c.stats().promoted_lines, 4);
    // A discard over clean copies makes its records durable before the backing
    // device's discard: afterwards they are durable without a flush.
    let before = c.stats();
    c.discard(0, 0, LINE).unwrap();
    let s = c.stats();
    assert!(
        s.last_flushed_id > before.last_flushed_id || s.appends > before.appends,
        "the discard record was made durable first: {s:?}"
    );
    c.close().unwrap();
}

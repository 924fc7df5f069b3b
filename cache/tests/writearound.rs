//! Write-around: a write that continues a sequential stream longer than
//! `sequential_cutoff` goes straight to the backing device when none of its lines is
//! cached, so the cache keeps what it held; a stream over cached lines, a cutoff of 0,
//! or a backing device that fails the write keep the write in the cache; FUA flushes the
//! backing device, and so does a flush, even while another thread's flush of it is under
//! way; a read miss planned before a write around its lines is not promoted.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use lc_cache::{BlockDevice, Cache, Tunables};

const SEG: u64 = 64 << 10; // 14 lines per segment (format 2)
const LINE: u64 = 4096;
const CUTOFF: u64 = 4 * LINE;

/// Writeback off; a threshold of 0 makes the cache always busy, so streams past the
/// cutoff go around it from the start.
fn tunables(cutoff: u64) -> Tunables {
    Tunables {
        writeback_enabled: false,
        writeback_threshold: 0,
        flush_interval_s: 0,
        read_promote_threshold: 1,
        sequential_cutoff: cutoff,
        ..Tunables::default()
    }
}

/// A cache of 8 segments over one backing device of `lines` zeroed lines.
fn setup(lines: u64, cutoff: u64) -> (Arc<Cache>, Arc<Gated>) {
    setup_with(lines, tunables(cutoff))
}

fn setup_with(lines: u64, t: Tunables) -> (Arc<Cache>, Arc<Gated>) {
    let cache = mem_cache(SEG * 9, 512, SEG as u32);
    let b = Gated::new(vec![0u8; (lines * LINE) as usize]);
    let devs: Vec<Arc<dyn BlockDevice>> = vec![b.clone()];
    (Arc::new(open(cache, &devs, t, 4)), b)
}

fn pattern(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i / 512) as u8).collect()
}

fn read(c: &Cache, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    c.read(0, off, &mut buf).unwrap();
    buf
}

/// Writes `chunks` consecutive chunks of `chunk` bytes from `off`, each tagged `tag`.
fn stream(c: &Cache, off: u64, chunk: u64, chunks: u64, tag: u8, fua: bool) -> Vec<u8> {
    let data = pattern(tag, chunk * chunks);
    for i in 0..chunks {
        let at = (i * chunk) as usize;
        c.write(0, off + i * chunk, &data[at..at + chunk as usize], fua)
            .unwrap();
    }
    data
}

fn dirty(c: &Cache) -> u64 {
    c.stats().dirty_lines[0].1
}

#[test]
fn a_stream_past_the_cutoff_goes_around_and_reads_back() {
    let (c, b) = setup(64, CUTOFF);
    let data = stream(&c, 0, 2 * LINE, 8, 1, false);
    let s = c.stats();
    // The first two chunks (8 KiB, 16 KiB of stream) are within the cutoff: cached.
    assert_eq!(dirty(&c), 4, "the stream's first 16 KiB are cached");
    assert_eq!(s.bypassed_bytes, 12 * LINE);
    assert_eq!(s.device_bypassed_bytes, vec![(0, 12 * LINE)]);
    assert_eq!(s.device_bypassed_writes, vec![(0, 6)]);
    // On the backing device already (writeback is off), and read back whole.
    assert_eq!(b.bytes(4 * LINE, 12 * LINE), data[4 * LINE as usize..]);
    assert_eq!(read(&c, 0, 16 * LINE), data);
    // A SYNCHRONIZE CACHE returns with the writes around the cache durable (a flush of
    // the device completed after them: the writeback thread's idle flush may be it).
    c.flush().unwrap();
    assert_eq!(
        b.writes_flushed.load(Ordering::SeqCst),
        b.writes.load(Ordering::SeqCst),
        "writes around the cache left unflushed by a flush"
    );
}

#[test]
fn a_flush_returns_only_once_a_backing_flush_already_under_way_has_completed() {
    // The writeback thread flushes a device written around when it is idle; a SYNCHRONIZE
    // CACHE arriving while that flush is under way must not return before the written
    // around data is durable (a crash test once read an acknowledged write as its older
    // value after recovery: the flush had returned while the other thread's flush of
    // that device had not yet happened).
    let (c, b) = setup(64, CUTOFF);
    b.hold_next_flush();
    stream(&c, 0, 2 * LINE, 4, 1, false);
    assert!(c.stats().bypassed_bytes > 0);
    // The writeback thread's flush of the device has started and is held.
    b.wait_held();
    assert_eq!(b.flushes_done.load(Ordering::SeqCst), 0);
    c.flush().unwrap();
    let done = b.flushes_done.load(Ordering::SeqCst);
    b.release();
    assert!(
        done > 0,
        "SYNCHRONIZE CACHE returned before any flush of the device written around completed"
    );
}

#[test]
fn what_the_cache_held_stays_cached_across_a_long_stream() {
    let (c, b) = setup(256, CUTOFF);
    // Hot data: single writes in descending order (no stream), cached.
    let hot = pattern(7, 8 * LINE);
    for i in (0..8).rev() {
        let at = (i * LINE) as usize;
        c.write(
            0,
            200 * LINE + i * LINE,
            &hot[at..at + LINE as usize],
            false,
        )
        .unwrap();
    }
    // A stream of 128 lines, more than the cache's 8 segments of 15 lines could keep
    // beside the hot data.
    let data = stream(&c, 0, 4 * LINE, 32, 2, false);
    assert_eq!(
        dirty(&c),
        8 + 4,
        "the hot lines and the stream's first 16 KiB"
    );
    assert_eq!(c.stats().bypassed_bytes, 124 * LINE);
    assert_eq!(read(&c, 200 * LINE, 8 * LINE), hot);
    assert_eq!(read(&c, 0, 128 * LINE), data);
    assert_eq!(
        b.bytes(200 * LINE, 8 * LINE),
        vec![0u8; 8 * LINE as usize],
        "hot data not written back"
    );
}

#[test]
fn a_stream_over_cached_lines_stays_in_the_cache() {
    let (c, b) = setup(64, CUTOFF);
    c.write(0, 6 * LINE, &pattern(3, LINE), false).unwrap();
    let data = stream(&c, 0, 2 * LINE, 8, 4, false);
    // Chunks 0-1 within the cutoff; chunk 3 (lines 6-7) overlaps the cached line 6.
    assert_eq!(c.stats().bypassed_bytes, 10 * LINE);
    assert_eq!(dirty(&c), 6);
    assert_eq!(read(&c, 0, 16 * LINE), data);
    assert_eq!(b.bytes(6 * LINE, 2 * LINE), vec![0u8; 2 * LINE as usize]);
}

#[test]
fn cutoff_zero_never_goes_around() {
    let (c, _b) = setup(64, 0);
    let data = stream(&c, 0, 4 * LINE, 8, 5, false);
    assert_eq!(c.stats().bypassed_bytes, 0);
    assert_eq!(dirty(&c), 32);
    assert_eq!(read(&c, 0, 32 * LINE), data);
}

#[test]
fn a_failing_backing_device_gets_the_write_through_the_cache() {
    let (c, b) = setup(64, CUTOFF);
    b.fail_writes.store(true, Ordering::SeqCst);
    let data = stream(&c, 0, 2 * LINE, 8, 6, false);
    assert_eq!(c.stats().bypassed_bytes, 0);
    assert_eq!(dirty(&c), 16, "every line cached");
    b.fail_writes.store(false, Ordering::SeqCst);
    assert_eq!(read(&c, 0, 16 * LINE), data);
}

#[test]
fn fua_around_the_cache_flushes_the_backing_device() {
    let (c, b) = setup(64, CUTOFF);
    stream(&c, 0, 2 * LINE, 2, 8, false);
    stream(&c, 4 * LINE, 2 * LINE, 1, 8, true);
    assert_eq!(c.stats().bypassed_bytes, 2 * LINE);
    assert_eq!(
        b.writes_flushed.load(Ordering::SeqCst),
        b.writes.load(Ordering::SeqCst),
        "FUA returned before the backing device was flushed"
    );
}

#[test]
fn a_read_miss_planned_before_a_write_around_is_not_promoted() {
    let (c, b) = setup(64, CUTOFF);
    // A read of lines 8..10 holds the old data (zeros) in its backing read...
    b.hold_next_read();
    let reader = {
        let c = c.clone();
        std::thread::spawn(move || read(&c, 8 * LINE, 2 * LINE))
    };
    b.wait_held();
    // ...while a stream writes them around the cache.
    let data = stream(&c, 0, 2 * LINE, 8, 9, false);
    b.release();
    let old = reader.join().unwrap();
    assert_eq!(
        old,
        vec![0u8; 2 * LINE as usize],
        "the read planned before the write"
    );
    assert_eq!(c.stats().promoted_lines, 0, "nothing stale promoted");
    // Read misses of the new data are promoted once the device is flushed, which the
    // writeback thread does by itself (no flush request needed).
    let t = std::time::Instant::now();
    while c.stats().promoted_lines == 0 {
        assert_eq!(
            read(&c, 8 * LINE, 2 * LINE),
            data[8 * LINE as usize..10 * LINE as usize]
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "never promoted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(b.flushes.load(Ordering::SeqCst) > 0);
    assert_eq!(c.stats().promoted_lines, 2);
    assert_eq!(
        read(&c, 8 * LINE, 2 * LINE),
        data[8 * LINE as usize..10 * LINE as usize]
    );
}

#[test]
fn a_quiet_cache_absorbs_a_stream_until_it_is_half_the_writeback_threshold_dirty() {
    let (c, _b) = setup_with(
        256,
        Tunables {
            writeback_threshold: 70,
            ..tunables(CUTOFF)
        },
    );
    let data = pattern(11, 120 * LINE);
    for i in 0..30 {
        let at = (i * 4 * LINE) as usize;
        c.write(0, i * 4 * LINE, &data[at..at + 4 * LINE as usize], false)
            .unwrap();
        c.flush().unwrap();
    }
    let bypassed = c.stats().bypassed_bytes / LINE;
    // 8 segments of 14 lines: busy from 3 flushed segments (37 % >= 35 %).
    assert!(dirty(&c) >= 3 * 14, "absorbed {} lines", dirty(&c));
    assert!(bypassed > 0, "then written around");
    assert_eq!(dirty(&c) + bypassed, 120);
    assert_eq!(read(&c, 0, 120 * LINE), data);
}

#[test]
fn a_request_tried_inline_then_blocking_counts_once() {
    let (c, _b) = setup(64, CUTOFF);
    let data = pattern(10, 4 * LINE);
    // Within the cutoff: served inline.
    assert!(c.try_write(0, 0, &data).is_some());
    // Past it: the inline try declines, the blocking call takes it around.
    assert!(c.try_write(0, 4 * LINE, &data).is_none());
    c.write(0, 4 * LINE, &data, false).unwrap();
    assert_eq!(c.stats().bypassed_bytes, 4 * LINE);
    assert_eq!(dirty(&c), 4);
}
